"""Orbax checkpoints: round trip of the whole train state, one step per tag, params-only loading."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec import checkpoint, dist
from rec.config import TrainConfig
from rec.errors import RecError
from rec.model.qwen2 import PARTITION_RULES, SHAPES, init_params, shape_with_vocab
from rec.train.step import make_train_step
from rec.train.optim import make_optimizer
from rec.train.state import TrainState, abstract_state, init_state


def _loss(params, batch, extra):
    err = (batch["x"] @ params["w"] - batch["y"]) ** 2
    return err.mean(), {"weight": jnp.float32(batch["x"].shape[0])}


def _trained_state(steps=3):
    mesh = dist.make_mesh("auto")
    rng = np.random.default_rng(0)
    params = dist.shard_params(
        {"w": rng.normal(size=(4, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}, mesh, []
    )
    opt = make_optimizer(TrainConfig(lr=0.1, warmup_steps=1), 10)
    state = init_state(params, opt.tx, 123, mesh)
    step = make_train_step(_loss, opt, 1, donate=False)
    batch = {"x": rng.normal(size=(4, 4)).astype(np.float32), "y": rng.normal(size=(4, 2)).astype(np.float32)}
    for _ in range(steps):
        state, _ = step(state, batch)
    state, _ = state.split_rng()  # the stage's RNG has moved too
    return state, opt, mesh


def _target(state, opt, mesh):
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    return abstract_state(abstract_params, jax.tree.map(lambda x: x.sharding, state.params), opt.tx, mesh)


def _equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def test_round_trip_restores_params_optimizer_step_rng_position(tmp_path):
    state, opt, mesh = _trained_state()
    run = str(tmp_path / "run")
    path = checkpoint.save(
        run, "sft_last", state, int(state.step), {"data_position": {"epoch": 0}, "note": "x"}
    )
    assert path.endswith(os.path.join("checkpoints", "sft_last", "3"))
    restored, meta = checkpoint.restore(run, "sft_last", _target(state, opt, mesh))
    assert isinstance(restored, TrainState)
    assert _equal_trees(restored, state)
    assert int(restored.step) == 3 and int(restored.data_position) == 3
    assert np.array_equal(np.asarray(restored.rng), np.asarray(state.rng))
    assert meta["note"] == "x" and meta["step"] == 3 and meta["tag"] == "sft_last"
    # the restored optimizer state continues exactly like the original
    step = make_train_step(_loss, opt, 1, donate=False)
    batch = {"x": np.ones((4, 4), np.float32), "y": np.zeros((4, 2), np.float32)}
    a, _ = step(state, batch)
    b, _ = step(restored, batch)
    assert _equal_trees(a, b)


def test_one_step_kept_per_tag_and_partial_steps_ignored(tmp_path):
    state, _, _ = _trained_state(steps=1)
    run = str(tmp_path / "run")
    assert checkpoint.latest_step(run, "sft_last") is None
    checkpoint.save(run, "sft_last", state, 2, {})
    checkpoint.save(run, "sft_last", state, 4, {})
    checkpoint.save(run, "sft_last", state, 4, {})  # same step again: kept as is, no error
    tag_dir = tmp_path / "run" / "checkpoints" / "sft_last"
    assert sorted(p for p in os.listdir(tag_dir) if not p.startswith(".")) == ["4"]
    # a save that died before Orbax finalised it is not a checkpoint
    (tag_dir / "9.orbax-checkpoint-tmp-1").mkdir()
    (tag_dir / "9.orbax-checkpoint-tmp-1" / "junk").write_text("partial")
    assert checkpoint.latest_step(run, "sft_last") == 4
    checkpoint.save(run, "sft_best", {"params": state.params}, 1, {})
    assert checkpoint.list_tags(run) == ["sft_best", "sft_last"]
    assert checkpoint.preferred_tag(run) == "sft_best"


def test_errors_are_rec_errors(tmp_path):
    state, opt, mesh = _trained_state(steps=1)
    with pytest.raises(RecError, match="no checkpoint found"):
        checkpoint.restore(str(tmp_path / "nothing"), "sft_last", _target(state, opt, mesh))
    with pytest.raises(RecError, match="not a plain name"):
        checkpoint.save(str(tmp_path), "../evil", state, 1, {})
    with pytest.raises(RecError, match="no checkpoints"):
        checkpoint.preferred_tag(str(tmp_path))


def test_load_params_reads_model_only_and_casts(tmp_path):
    shape = shape_with_vocab(SHAPES["tiny"], 40)
    params = init_params(shape, jax.random.PRNGKey(1), jnp.float32, vocab_multiple=16)
    mesh = dist.make_mesh("auto")
    params = dist.shard_params(params, mesh, PARTITION_RULES)
    opt = make_optimizer(TrainConfig(), 5)
    state = init_state(params, opt.tx, 0, mesh)
    run = str(tmp_path / "run")
    checkpoint.save(run, "rl_last", state, 5, {"model_config": shape.to_hf_config()})
    got_shape, got = checkpoint.load_params(run, "", mesh=mesh)  # "" = preferred tag (rl_last)
    assert got_shape == shape
    assert _equal_trees(got, state.params)
    _, half = checkpoint.load_params(run, "rl_last", mesh=mesh, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half))
    emb = half["embed_tokens"]["embedding"]
    np.testing.assert_allclose(
        np.asarray(emb, np.float32), np.asarray(params["embed_tokens"]["embedding"]), rtol=1e-2, atol=1e-3
    )
    # a damaged checkpoint (its largest data file emptied, as a disk problem or a bad copy would)
    # is one line naming the step directory, for every reader
    data = max((f for f in (tmp_path / "run/checkpoints/rl_last/5/params").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
    data.write_bytes(b"")
    damaged = rf"{tmp_path}/run/checkpoints/rl_last/5: cannot restore \(.*\)$"
    with pytest.raises(RecError, match=damaged):
        checkpoint.load_params(run, "rl_last", mesh=mesh)
    with pytest.raises(RecError, match=damaged):
        checkpoint.restore(run, "rl_last", _target(state, opt, mesh))
    with pytest.raises(RecError, match=damaged):
        checkpoint.read_arrays(run, "rl_last")


def test_fresh_process_reads_params_without_having_saved(tmp_path):
    """eval/export/RL start in a new process: item metadata and params must load there."""
    import subprocess
    import sys

    shape = shape_with_vocab(SHAPES["tiny"], 24)
    params = init_params(shape, jax.random.PRNGKey(2), jnp.float32)
    run = str(tmp_path / "run")
    checkpoint.save(run, "sft_best", {"params": params}, 7, {"model_config": shape.to_hf_config()})
    code = (
        "import sys, jax; from rec import checkpoint\n"
        "shape, p = checkpoint.load_params(sys.argv[1], 'sft_best')\n"
        "print(shape.vocab_size, checkpoint.latest_step(sys.argv[1], 'sft_best'), p['embed_tokens']['embedding'].shape)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    res = subprocess.run(
        [sys.executable, "-c", code, run], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["24", "7", "(24,", "64)"]
