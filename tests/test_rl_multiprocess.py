"""`rec rl` as two processes (one CPU device each, jax.distributed on 127.0.0.1) equals one process
with two devices over the same global batch: same rollouts and rewards, same final parameters."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name, processes, devices_each, args):
    port = _free_port()
    procs, logs = [], []
    for pid in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, WANDB_MODE="disabled",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
        for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
            env.pop(key, None)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(pid))
        log = open(tmp_path / f"{name}.{pid}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "rec", *args], env=env, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=420)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{name}: timed out")
    finally:
        for log in logs:
            log.close()
    for pid, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"{name}.{pid}.log").read_text()[-4000:]


@pytest.mark.slow
def test_rec_rl_two_processes_match_one(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    from rec import checkpoint

    def args(run_dir):
        return ["rl", "--config", "configs/tiny/rl.yaml", f"run.dir={run_dir}", f"data.dir={synth_dataset_dir}",
                f"model.tokenizer={synth_tokenizer_dir}", "run.progress=false", "train.steps=2",
                "train.batch_size=4", "train.micro_batch_size=2", "train.lr=0.003", "train.eps=0.001",
                "rl.generations=4", "rl.tasks=[sid_next]", "rl.eval_limit=0", "data.length_buckets=[96]",
                "data.max_len=96"]

    two, one = tmp_path / "two", tmp_path / "one"
    _launch(tmp_path, "two", 2, 1, args(two))
    _launch(tmp_path, "one", 1, 2, args(one))
    metrics = {}
    for name, run_dir in (("two", two), ("one", one)):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2], name  # written once, by the primary
        metrics[name] = records
    for a, b in zip(metrics["two"], metrics["one"], strict=True):
        for key in ("reward", "hit_rate", "hit@1", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    _, p_two = checkpoint.load_params(str(two), "rl_last")
    _, p_one = checkpoint.load_params(str(one), "rl_last")
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
                 p_two, p_one)
