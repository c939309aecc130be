"""One optimizer step for every stage, with gradient accumulation inside a single jit.

SFT, RL and GRPO differ only in their loss function and the contents of the batch:

    loss_fn(params, micro_batch, extra) -> (loss, aux)

- `micro_batch`: a dict of arrays whose leading axis is the micro-batch (sequences or prompts).
- `extra`: whatever the stage passes to the step unchanged (reference params for a KL term, ...);
  it is a jit argument, not a closure, so changing its values does not recompile.
- `loss`: the mean loss of the micro-batch (f32 scalar).
- `aux`: a dict of f32 scalars to report. The reserved key `"weight"` says how much the
  micro-batch counts: its number of target tokens for a token-mean loss, its number of sequences
  for a sequence-mean loss. Gradients, losses and aux values are averaged over micro-batches with
  these weights, so accumulating M micro-batches equals one step on the whole batch. Without a
  weight every micro-batch counts equally.

The global batch ([B, ...], leading axis sharded over data×fsdp) is split into M micro-batches by
striding (micro-batch m holds rows m, m+M, m+2M, ...). With B/M a multiple of the batch devices
every device then contributes equally to every micro-batch and no data moves between devices.
Micro-batches run under `lax.scan`; gradients accumulate in f32.

Also here: `chunked_token_logprobs`, the log-probability of target tokens computed from hidden
states a sequence chunk at a time, so [B, T, V] f32 logits (V = 151k) never exist at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rec.errors import RecError
from rec.train.optim import Optimizer
from rec.train.state import TrainState

LossFn = Callable[[Any, dict, Any], tuple[jax.Array, dict]]
IGNORE_INDEX = -100


def split_micro_batches(batch: dict, num_micro: int) -> dict:
    """[B, ...] -> [M, B/M, ...] with micro-batch m = rows m, m+M, m+2M, ... (no cross-device moves)."""

    def split(x):
        size = x.shape[0]
        if size % num_micro:
            raise RecError(f"batch of {size} rows is not divisible into {num_micro} micro-batches")
        x = x.reshape(size // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: LossFn,
    params: Any,
    batch: dict,
    extra: Any,
    num_micro: int,
    micro_sharding=None,
    grad_shardings=None,
):
    """Weighted mean of loss, aux and gradients over `num_micro` micro-batches (one lax.scan).

    Returns (loss, aux, grads) with grads in f32. aux["weight"] is the total weight.
    `grad_shardings` (the params' shardings) pins the f32 accumulators to the parameter layout, so
    sharding propagation can never leave a replicated full-size copy in the scan carry.
    """

    def pin(tree):
        if grad_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, grad_shardings)

    micro = split_micro_batches(batch, num_micro)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(micro_batch):
        if micro_sharding is not None:
            micro_batch = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, micro_sharding(x.ndim)), micro_batch
            )
        (loss, aux), grads = grad_fn(params, micro_batch, extra)
        aux = dict(aux)
        weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
        return loss.astype(jnp.float32), aux, grads, weight

    # Trace once to learn the aux structure for the scan carry.
    _, aux_shape, _, _ = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
    zeros_grads = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    zeros_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)
    carry0 = (jnp.float32(0), zeros_aux, zeros_grads, jnp.float32(0))

    def body(carry, micro_batch):
        loss_sum, aux_sum, grad_sum, weight_sum = carry
        loss, aux, grads, weight = one(micro_batch)
        aux_sum = jax.tree.map(lambda s, a: s + weight * a.astype(jnp.float32), aux_sum, aux)
        grad_sum = pin(jax.tree.map(lambda s, g: s + weight * g.astype(jnp.float32), grad_sum, grads))
        return (loss_sum + weight * loss, aux_sum, grad_sum, weight_sum + weight), None

    (loss_sum, aux_sum, grad_sum, weight_sum), _ = jax.lax.scan(body, carry0, micro)
    # An all-empty batch (no target tokens) gives zero loss and zero gradients, not NaN.
    denom = jnp.maximum(weight_sum, jnp.float32(1e-12))
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    aux = jax.tree.map(lambda a: a / denom, aux_sum)
    aux["weight"] = weight_sum
    return loss_sum / denom, aux, grads


def train_step(
    state: TrainState,
    batch: dict,
    loss_fn: LossFn,
    optimizer: Optimizer,
    num_micro: int = 1,
    extra: Any = None,
    micro_sharding=None,
    grad_shardings=None,
) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` (pure; see `make_train_step` for the jitted form).

    Metrics: loss, grad_norm (before clipping), lr (used by this update), weight, and the aux
    values of `loss_fn`.
    """
    loss, aux, grads = accumulate_gradients(
        loss_fn, state.params, batch, extra, num_micro, micro_sharding, grad_shardings
    )
    grad_norm = optax.global_norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": optimizer.schedule(state.step), **aux}
    new_state = state.replace(
        params=params,
        opt_state=opt_state,
        step=state.step + 1,
        data_position=state.data_position + 1,
    )
    return new_state, metrics


def make_train_step(
    loss_fn: LossFn,
    optimizer: Optimizer,
    num_micro: int = 1,
    state_shardings: TrainState | None = None,
    mesh=None,
    donate: bool = True,
) -> Callable[..., tuple[TrainState, dict]]:
    """`step(state, batch, extra=None) -> (state, metrics)`, jitted once per batch shape.

    With `state_shardings` the new state keeps exactly the placement of the old one (needed for
    checkpoint/restore symmetry); with `mesh` every micro-batch is constrained to the batch axes.
    The old state's buffers are donated (the caller must not reuse it).
    """
    grad_shardings = getattr(state_shardings, "params", None)
    micro_sharding = None
    if mesh is not None:
        from rec.dist import batch_sharding

        def micro_sharding(ndim: int) -> NamedSharding:
            return batch_sharding(mesh, ndim)

    def step(state, batch, extra):
        return train_step(state, batch, loss_fn, optimizer, num_micro, extra, micro_sharding, grad_shardings)

    out_shardings = None if state_shardings is None else (state_shardings, None)
    jitted = jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=out_shardings)

    def run(state, batch, extra=None):
        return jitted(state, batch, extra)

    return run


def make_eval_step(loss_fn: LossFn, num_micro: int = 1) -> Callable[..., dict]:
    """`evaluate(params, batch, extra=None) -> {"loss", "weight", aux...}` without gradients
    (weighted like the train step, so summing weight*loss over batches gives the dataset mean)."""

    def evaluate(params, batch, extra):
        micro = split_micro_batches(batch, num_micro)

        def body(carry, micro_batch):
            loss_sum, weight_sum = carry
            loss, aux = loss_fn(params, micro_batch, extra)
            weight = jnp.asarray(aux.get("weight", 1.0), jnp.float32)
            return (loss_sum + weight * loss.astype(jnp.float32), weight_sum + weight), None

        (loss_sum, weight_sum), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), micro)
        return {"loss": loss_sum / jnp.maximum(weight_sum, 1e-12), "weight": weight_sum}

    jitted = jax.jit(evaluate)
    return lambda params, batch, extra=None: jitted(params, batch, extra)


# ---------------------------------------------------------------------------------------------
# Losses from hidden states


def shift_labels(labels: jax.Array) -> jax.Array:
    """HF convention: position t predicts labels[t+1]; the last position predicts nothing."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def chunked_token_logprobs(
    hidden: jax.Array,
    targets: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 128,
) -> jax.Array:
    """log p(targets[b, t] | position t) for every position, in f32, [B, T].

    `logits_fn` maps hidden [B, c, H] to f32 logits [B, c, V] (e.g. rec.model's
    `logits_from_hidden`). Positions whose target is negative (IGNORE_INDEX) get 0. The sequence
    is processed `chunk` positions at a time under `jax.checkpoint`, so only one [B, chunk, V]
    block of logits is alive in the forward and backward pass.
    """
    batch, length = targets.shape
    chunk = max(1, min(chunk, length))
    padded = -(-length // chunk) * chunk
    if padded != length:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - length)), constant_values=IGNORE_INDEX)
    n = padded // chunk
    hidden_chunks = jnp.moveaxis(hidden.reshape(batch, n, chunk, hidden.shape[-1]), 1, 0)
    target_chunks = jnp.moveaxis(targets.reshape(batch, n, chunk), 1, 0)

    @jax.checkpoint
    def one(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        safe = jnp.where(t >= 0, t, 0)
        picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        return jnp.where(t >= 0, picked - logz, 0.0)

    _, out = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (hidden_chunks, target_chunks))
    return jnp.moveaxis(out, 0, 1).reshape(batch, padded)[:, :length]


def token_cross_entropy(
    hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int = 128
) -> tuple[jax.Array, dict]:
    """SFT loss: mean negative log-likelihood over label tokens != -100 (labels unshifted, HF style).

    Returns (loss, {"weight": number of target tokens}) for use as a loss_fn result.
    """
    targets = shift_labels(labels)
    logprobs = chunked_token_logprobs(hidden, targets, logits_fn, chunk)
    mask = (targets >= 0).astype(jnp.float32)
    count = mask.sum()
    loss = -(logprobs * mask).sum() / jnp.maximum(count, 1.0)
    return loss, {"weight": count}
