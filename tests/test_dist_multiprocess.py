"""N processes train exactly like one process over the same global batch.

Two local processes (jax.distributed over 127.0.0.1, 2 fake CPU devices each, a 4-device global
mesh) run the train step with gradient accumulation on parameters sharded across both processes,
save a checkpoint from both, restore it and take one more step; then the real `rec sft` command
(tiny Qwen2, synthetic data) runs on two processes. One process with 4 fake devices runs the same
programs. Losses and final parameters must agree to float tolerance.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(
    """
    import json, os, sys
    out_dir, devices = sys.argv[1], int(sys.argv[2])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from rec import checkpoint, dist
    from rec.config import TrainConfig
    from rec.train.loop import make_train_step
    from rec.train.optim import make_optimizer
    from rec.train.state import abstract_state, init_state

    dist.init_distributed()
    mesh = dist.make_mesh("auto")
    rules = [("w1$", P("fsdp", None)), ("w2$", P(None, "fsdp"))]  # sharded across both processes
    rng = np.random.default_rng(0)
    host_params = {"w1": rng.normal(size=(8, 16)).astype(np.float32) * 0.3,
                   "w2": rng.normal(size=(16, 4)).astype(np.float32) * 0.3, "b": np.zeros(4, np.float32)}
    params = dist.shard_params(host_params, mesh, rules)
    # eps well above float noise: Adam would otherwise turn reduction-order noise in near-zero
    # gradients into full-size (sign) updates
    opt = make_optimizer(TrainConfig(lr=1e-2, eps=1e-3, warmup_steps=1, schedule="linear", grad_clip=1.0), 8)
    state = init_state(params, opt.tx, 7, mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)

    def loss_fn(p, mb, extra):
        hidden = jnp.tanh(mb["x"] @ p["w1"])
        err = ((hidden @ p["w2"] + p["b"] - mb["y"]) ** 2).sum(-1) * mb["weights"]
        count = mb["weights"].sum()
        return err.sum() / jnp.maximum(count, 1.0), {"weight": count}

    step_fn = make_train_step(loss_fn, opt, 2, state_shardings=state_sh, mesh=mesh)
    data = np.random.default_rng(1)
    full = {"x": data.normal(size=(8, 8)).astype(np.float32), "y": data.normal(size=(8, 4)).astype(np.float32),
            "weights": np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)}  # one filler row
    batch = dist.shard_batch(full, mesh)  # every process passes the same global batch

    losses = []
    for _ in range(3):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    run_dir = os.path.join(out_dir, "run")
    checkpoint.save(run_dir, "t", state, int(state.step), {"note": "x"})
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    target = abstract_state(abstract_params, dist.param_shardings(abstract_params, mesh, rules), opt.tx, mesh)
    restored, meta = checkpoint.restore(run_dir, "t", target)
    state, metrics = step_fn(restored, batch)
    losses.append(float(metrics["loss"]))
    params = dist.process_allgather(state.params)
    if dist.is_primary():
        np.savez(os.path.join(out_dir, "params.npz"), **{k: np.asarray(v) for k, v in params.items()})
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"losses": losses, "step": int(state.step), "processes": jax.process_count(),
                       "devices": jax.device_count(), "w1_spec": [str(a) for a in state.params["w1"].sharding.spec]}, f)
    dist.sync("end")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, processes, devices_each):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, WANDB_MODE="disabled")
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
            env.pop(key, None)
        if processes > 1:
            env.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(pid),
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), str(devices_each)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{name}: worker timed out")
        assert p.returncode == 0, f"{name}: worker failed:\n{err[-4000:]}"
    result = json.loads((out / "result.json").read_text())
    params = dict(np.load(out / "params.npz"))
    return result, params


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    multi, multi_params = _run(tmp_path, "two", processes=2, devices_each=2)
    single, single_params = _run(tmp_path, "one", processes=1, devices_each=4)
    assert multi["processes"] == 2 and multi["devices"] == 4
    assert single["processes"] == 1 and single["devices"] == 4
    assert multi["step"] == single["step"] == 4
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    assert multi["losses"][-1] < multi["losses"][0]  # it trains
    assert multi["w1_spec"] == ["fsdp", "None"]
    assert multi_params.keys() == single_params.keys()
    for key in single_params:
        np.testing.assert_allclose(multi_params[key], single_params[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # checkpoint written by both processes: each wrote its own shard file
    files = os.listdir(tmp_path / "two" / "run" / "checkpoints" / "t" / "3" / "params")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(files)


def _run_cli(tmp_path, name, processes, devices_each, args):
    port = _free_port()
    procs, logs = [], []
    for pid in range(processes):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            PYTHONPATH=ROOT,
            WANDB_MODE="disabled",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
        )
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
            env.pop(key, None)
        if processes > 1:
            env.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(pid),
            )
        log = open(tmp_path / f"{name}.{pid}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "rec", *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        )
    for p in procs:
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{name}: timed out")
    for log in logs:
        log.close()
    for pid, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"{name}.{pid}.log").read_text()[-4000:]


@pytest.mark.slow
def test_rec_sft_on_two_processes_matches_one(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    """The real `rec sft` command: data feeding, primary-only files, checkpoints from all processes."""
    from rec import checkpoint
    from rec.train.logging import read_metrics

    def args(run_dir):
        return [
            "sft",
            "--config",
            "configs/tiny/sft.yaml",
            f"run.dir={run_dir}",
            f"data.dir={synth_dataset_dir}",
            f"model.tokenizer={synth_tokenizer_dir}",
            "run.progress=false",
            "data.limit=40",
            "data.max_len=128",
            "data.length_buckets=[128]",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.steps=4",
            "train.eval_every=2",
            "train.eval_limit=8",
        ]

    two, one = tmp_path / "two", tmp_path / "one"
    _run_cli(tmp_path, "two", 2, 2, args(two))
    _run_cli(tmp_path, "one", 1, 4, args(one))
    m2 = [r for r in read_metrics(str(two), "sft") if "loss" in r]
    m1 = [r for r in read_metrics(str(one), "sft") if "loss" in r]
    assert [r["step"] for r in m2] == [1, 2, 3, 4]  # written once, by the primary
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=1e-5)
    _, p2 = checkpoint.load_params(str(two), "sft_last")
    _, p1 = checkpoint.load_params(str(one), "sft_last")
    import jax

    # Adam (eps 1e-8) turns float reduction-order noise in near-zero gradients into visible
    # differences of near-zero parameters; 1e-5 is still 300x below one update (lr 3e-3).
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(
        os.listdir(two / "checkpoints" / "sft_last" / "4" / "params")
    )
    summary = json.loads((two / "run_summary.json").read_text())
    assert summary["train/processes"] == 2 and summary["train/devices"] == 4
