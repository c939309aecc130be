"""The pre-flight memory estimate: hand-computed terms, the refusal message, and the shipped v6e-16
configs checked on a 16-device mesh."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rec.errors import RecError
from rec.model.qwen2 import ModelShape
from rec.train import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


def test_shard_bytes_counts_one_devices_share():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    tree = {
        "w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None))),
        "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16),
        "s": jax.ShapeDtypeStruct((), jnp.int32),
    }
    assert memory.shard_bytes(tree) == 8 * 4 * 4 + 4 * 2 + 4


def test_activation_bytes_by_hand():
    shape = ModelShape(vocab_size=1000, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                       num_kv_heads=2, head_dim=4)
    rows, seq, cb = 2, 10, 2
    tokens = rows * seq
    qkv = tokens * (4 + 2 * 2) * 4 * cb
    scores = rows * 4 * seq * seq * 4 * 2
    mlp = tokens * 32 * 3 * cb
    layer = qkv + scores + mlp + tokens * 16 * cb * 4
    logits = rows * 10 * 1000 * 4 * 3
    final = tokens * 16 * 4 * 2
    assert memory.activation_bytes(shape, rows, seq, cb, remat=True) == 3 * tokens * 16 * cb + layer + logits + final
    assert memory.activation_bytes(shape, rows, seq, cb, remat=False) == 3 * layer + logits + final


def test_check_fits_refuses_with_the_keys_to_change():
    est = memory.MemoryEstimate(params=1 * GIB, optimizer=2 * GIB, gradients=2 * GIB, activations=30 * GIB,
                                capacity=32 * GIB)
    with pytest.raises(RecError) as err:
        memory.check_fits(est, "train.micro_batch_size", 16, "data.length_buckets", 512)
    message = str(err.value)
    assert "\n" not in message
    assert "35.00 GiB per chip" in message and "of 32.0 GiB" in message
    assert "'train.micro_batch_size' (now 16, e.g. 8)" in message and "'data.length_buckets' (now 512)" in message
    memory.check_fits(memory.MemoryEstimate(1, 1, 1, 1, None), "k", 1, "l", 1)  # unknown capacity: no refusal


def test_sft_refuses_a_config_that_cannot_fit(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rec", "sft", "--config", "configs/tiny/sft.yaml", f"run.dir={run}",
         f"data.dir={synth_dataset_dir}", f"model.tokenizer={synth_tokenizer_dir}", "run.progress=false",
         "data.limit=20", "train.steps=2", "mesh.memory_per_chip_gib=0.001"],
        cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config: estimated") and "does not fit" in last and "train.micro_batch_size" in last
    assert "Traceback" not in result.stderr
    assert not run.exists() or not any(run.iterdir())  # nothing written


ESTIMATE_V6E16 = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
    import jax
    from rec import dist
    from rec.config import load_config
    from rec.model.qwen2 import PARTITION_RULES, get_shape, init_params
    from rec.train import memory
    from rec.train.optim import make_optimizer
    from rec.train.state import abstract_state

    cfg = load_config(sys.argv[1], ["mesh.memory_per_chip_gib=32"])
    mesh = dist.make_mesh(cfg.mesh.shape)
    shape = get_shape(cfg.model.shape)
    params = jax.eval_shape(lambda k: init_params(shape, k, param_dtype=jax.numpy.float32), jax.random.PRNGKey(0))
    tx = make_optimizer(cfg.train, 1000).tx
    state = abstract_state(params, dist.param_shardings(params, mesh, PARTITION_RULES), tx, mesh)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    out = {}
    for rows in (micro, micro * 16):
        est = memory.estimate(state, shape, mesh, rows, max(cfg.data.length_buckets), cfg.model.compute_dtype,
                              cfg.model.remat, configured_gib=32)
        out[rows] = {"params": est.params, "optimizer": est.optimizer, "total": est.total,
                     "capacity": est.capacity}
    # the rollout trainer's check (adds the beam-search KV cache) on the RL config
    from rec.train.common import check_rollout_memory

    rl = load_config(sys.argv[2], ["mesh.memory_per_chip_gib=32"])
    check_rollout_memory(rl, state, shape, mesh, rl.train.micro_batch_size, rl.rl.generations,
                         max(rl.data.length_buckets) + 5, ref_params=state.params)
    print(json.dumps({"params_total": sum(x.size for x in jax.tree.leaves(params)), "estimates": out}))
    """
)


@pytest.mark.slow
def test_v6e16_configs_fit_and_a_16x_micro_batch_does_not(tmp_path):
    script = tmp_path / "estimate.py"
    script.write_text(ESTIMATE_V6E16)
    result = subprocess.run(
        [sys.executable, str(script), "configs/sft/industrial-v6e16.yaml", "configs/rl/industrial-v6e16.yaml"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    n = out["params_total"]
    small, large = (out["estimates"][k] for k in sorted(out["estimates"], key=int))
    # f32 parameters fully sharded over 16 chips; Adam's two moments are twice that
    assert small["params"] == pytest.approx(n * 4 / 16, rel=0.02)
    assert small["optimizer"] == pytest.approx(2 * n * 4 / 16, rel=0.02)
    assert small["total"] < small["capacity"] < large["total"]
