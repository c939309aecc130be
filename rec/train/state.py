"""The training state every stage (SFT, RL, GRPO) checkpoints and resumes.

`TrainState` is a plain pytree of arrays: parameters, optimizer state, the number of optimizer
steps taken, the stage's RNG key (raw uint32 key data, so Orbax stores it like any array) and the
data position (how many global batches the stage has consumed; the stage maps it to epoch/offset).
Saving it and restoring it gives back exactly the same run: nothing the next step depends on lives
outside it, except the config and the data, which are deterministic.

The optimizer transformation itself is not in the state (it is code, rebuilt from the config).
Shardings: parameters follow the model's partition rules; optimizer leaves that mirror a parameter
(Adam moments) take that parameter's sharding; everything else is replicated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates applied
    rng: jax.Array  # uint32[2]: raw PRNG key data for the stage's sampling
    data_position: jax.Array  # int32 scalar: global batches consumed

    def as_dict(self) -> dict:
        """Top-level items as saved by rec.checkpoint (one Orbax item each)."""
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": self.step,
            "rng": self.rng,
            "data_position": self.data_position,
        }

    @classmethod
    def from_dict(cls, items: dict) -> TrainState:
        return cls(**{k: items[k] for k in ("params", "opt_state", "step", "rng", "data_position")})

    def split_rng(self) -> tuple[TrainState, jax.Array]:
        """A fresh key for this step's sampling, and the state with its key advanced."""
        new, sub = jax.random.split(self.rng)
        return self.replace(rng=new), sub


def create_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0 (call under jit with `state_shardings` as out_shardings)."""
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        data_position=jnp.zeros((), jnp.int32),
    )


def state_shardings(
    abstract_params: Any, param_shardings: Any, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """NamedShardings for every leaf of the TrainState built from these params and `tx`."""
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda _leaf, sharding: sharding,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _leaf: replicated,
    )
    return TrainState(
        params=param_shardings,
        opt_state=opt_shardings,
        step=replicated,
        rng=replicated,
        data_position=replicated,
    )


def abstract_state(
    abstract_params: Any, param_shardings: Any, tx: optax.GradientTransformation, mesh: Mesh, seed: int = 0
) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state: the restore target for rec.checkpoint."""
    shapes = jax.eval_shape(lambda p: create_state(p, tx, seed), abstract_params)
    shardings = state_shardings(abstract_params, param_shardings, tx, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, mesh: Mesh) -> TrainState:
    """A fresh state on the mesh; `params` must already be placed (rec.dist.shard_params)."""
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    shardings = state_shardings(params, param_sh, tx, mesh)
    return jax.jit(lambda p: create_state(p, tx, seed), out_shardings=shardings)(params)
