"""Mesh shapes, parameter/batch placement and the multi-process environment checks."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rec import dist
from rec.errors import RecError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "text,devices,expected",
    [
        ("auto", 8, (1, 8, 1)),
        ("2,-1,1", 8, (2, 4, 1)),
        ("-1,1,2", 8, (4, 1, 2)),
        ("1, 4 ,2", 8, (1, 4, 2)),
        ("AUTO", 1, (1, 1, 1)),
    ],
)
def test_parse_mesh_shape(text, devices, expected):
    assert dist.parse_mesh_shape(text, devices) == expected


@pytest.mark.parametrize(
    "text,match",
    [
        ("2,2", "three sizes"),
        ("a,b,c", "integers"),
        ("-1,-1,2", "at most one"),
        ("3,-1,1", "not divisible"),
        ("2,2,1", "needs 4 devices"),
        ("0,8,1", "positive"),
    ],
)
def test_bad_mesh_shape_is_rec_error(text, match):
    with pytest.raises(RecError, match=match) as info:
        dist.parse_mesh_shape(text, 8)
    assert "mesh.shape" in str(info.value)


def test_spec_fallback_replicates_indivisible_dims():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), dist.AXES)
    rules = [(r"w$", P("fsdp", "tensor"))]
    spec, notes = dist.spec_for("layer/w", (6, 4), mesh, rules)
    assert spec == P("fsdp", "tensor") and not notes
    assert dist.spec_for("other", (3,), mesh, rules)[0] == P(None)


def test_init_distributed_env_checks(monkeypatch):
    for key in dist.ENV_NAMES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dist, "_INITIALISED", False)
    assert dist.expected_process_count() == 1
    assert dist.expected_process_count({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == 4
    assert dist.expected_process_count({"TPU_WORKER_HOSTNAMES": "h0"}) == 1
    assert dist.expected_process_count({"REC_NUM_PROCESSES": "3"}) == 3
    assert dist.expected_process_count({"JAX_NUM_PROCESSES": "2"}) == 2  # the JAX spelling works too
    with pytest.raises(RecError, match="REC_NUM_PROCESSES='two'"):
        dist.expected_process_count({"REC_NUM_PROCESSES": "two"})
    monkeypatch.setenv("REC_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(RecError, match="missing REC_NUM_PROCESSES, REC_PROCESS_ID"):
        dist.init_distributed()
    monkeypatch.setenv("REC_NUM_PROCESSES", "2")
    monkeypatch.setenv("REC_PROCESS_ID", "5")
    with pytest.raises(RecError, match="REC_PROCESS_ID=5 is outside 0..1"):
        dist.init_distributed()
    monkeypatch.setenv("REC_PROCESS_ID", "-1")
    with pytest.raises(RecError, match="REC_PROCESS_ID='-1' must be an integer >= 0"):
        dist.init_distributed()
    monkeypatch.setenv("REC_PROCESS_ID", "--1")
    with pytest.raises(RecError, match="REC_PROCESS_ID='--1' must be an integer >= 0"):
        dist.init_distributed()
    # One process promised, one present: nothing to join, no error.
    monkeypatch.setenv("REC_NUM_PROCESSES", "1")
    monkeypatch.setenv("REC_PROCESS_ID", "0")
    dist.init_distributed()
    monkeypatch.setattr(dist, "_INITIALISED", False)
    # A TPU slice of 4 hosts where JAX finds only this one: stop, do not run on 1/4 of the slice.
    for key in ("REC_COORDINATOR_ADDRESS", "REC_NUM_PROCESSES", "REC_PROCESS_ID"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3")
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: None)
    with pytest.raises(RecError, match="promised 4 processes but JAX sees 1"):
        dist.init_distributed()
    monkeypatch.setattr(dist, "_INITIALISED", False)


MESH_SCRIPT = textwrap.dedent(
    """
    import os, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from rec import dist
    from rec.errors import RecError
    out = {}
    for text in ["auto", "2,-1,1", "2,2,2"]:
        mesh = dist.make_mesh(text)
        out[text] = [mesh.shape[a] for a in dist.AXES]
    try:
        dist.make_mesh("3,3,1")
    except RecError as exc:
        out["bad"] = str(exc)
    mesh = dist.make_mesh("2,2,2")
    params = {"w": np.arange(48.0).reshape(4, 12), "odd": np.ones((3, 5)), "v": np.ones(6)}
    rules = [("w", P("fsdp", "tensor")), ("odd", P("fsdp", "tensor")), ("v", P("fsdp"))]
    placed = dist.shard_params(params, mesh, rules)
    out["specs"] = {k: [str(s) for s in v.sharding.spec] for k, v in placed.items()}
    out["w_ok"] = bool(np.array_equal(np.asarray(placed["w"]), params["w"]))
    full = {"x": np.arange(16).reshape(8, 2)}
    batch = dist.shard_batch(full, mesh)
    out["batch_spec"] = [list(s) if isinstance(s, tuple) else s for s in batch["x"].sharding.spec]
    out["batch_ok"] = bool(np.array_equal(np.asarray(batch["x"]), full["x"]))
    out["rows"] = dist.process_rows(mesh, 8).tolist()
    try:
        dist.process_rows(mesh, 6)
    except RecError as exc:
        out["bad_batch"] = str(exc)
    print(json.dumps(out))
    """
)


def test_mesh_and_placement_on_8_fake_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    res = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["auto"] == [1, 8, 1]
    assert out["2,-1,1"] == [2, 4, 1]
    assert out["2,2,2"] == [2, 2, 2]
    assert "needs 9 devices, but 8 are available" in out["bad"]
    assert out["specs"]["w"] == ["fsdp", "tensor"]
    assert out["specs"]["odd"] == ["None", "None"]  # 3 and 5 not divisible by 2: replicated
    assert out["specs"]["v"] == ["fsdp"]
    assert out["w_ok"] and out["batch_ok"]
    assert out["batch_spec"] == [["data", "fsdp"], None]
    assert out["rows"] == list(range(8))
    assert "cannot be split over 4 devices" in out["bad_batch"]


def test_preemption_guard_single_process_flags_sigterm_and_restores_the_handler():
    import os
    import signal

    from rec.dist.preemption import Preempted, PreemptionGuard

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process keeps running
        assert guard.reached(2)
    assert signal.getsignal(signal.SIGTERM) == before
    assert "step 7" in str(Preempted(7, "runs/x/checkpoints/sft_last/7"))


def test_launch_local_checks_arguments_and_returns_the_failing_exit_code(tmp_path):
    from rec.dist.launch import launch_local, process_env

    with pytest.raises(RecError, match="--processes must be >= 1"):
        launch_local(["data", "check", "x"], 0)
    with pytest.raises(RecError, match="name the rec command"):
        launch_local([], 2)
    env = process_env(1, 2, 1234, cpu_devices=3, base={"JAX_PROCESS_ID": "7", "XLA_FLAGS": "--foo"})
    assert env["REC_PROCESS_ID"] == "1" and env["REC_NUM_PROCESSES"] == "2"
    assert env["REC_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and "JAX_PROCESS_ID" not in env
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=3"
    # a user error in the command (exit 2) comes back as the launcher's exit code, with the logs
    code = launch_local(["data", "check", str(tmp_path / "missing")], 2, log_dir=str(tmp_path / "logs"),
                        echo=False, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert code == 2
    # the first process to fail stops the other, which on a busy machine may not have printed yet
    logs = [(tmp_path / "logs" / f"process_{pid}.log").read_text() for pid in (0, 1)]
    assert any("error:" in log for log in logs)



def test_launch_wait_reports_exit_statuses_like_a_shell(tmp_path, monkeypatch):
    """Real child processes: a signal death is 128+N; a failure beats a 143 (saved and stopped)
    that came first; and the launcher leaves no child behind when it is interrupted."""
    from rec.dist import launch

    def start(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code])

    killed = start("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert launch._wait([killed], None) == 128 + 9
    # process 0 stops with 143 at once, process 1 then fails with 1 while "saving"
    stopped, failing = start("import sys; sys.exit(143)"), start("import sys, time; time.sleep(1); sys.exit(1)")
    assert launch._wait([stopped, failing], None) == 1
    both_saved = [start("import sys; sys.exit(143)"), start("import sys, time; time.sleep(0.5); sys.exit(143)")]
    assert launch._wait(both_saved, None) == 143
    assert launch.exit_status(-15) == 143 and launch.exit_status(2) == 2

    # Ctrl-C while waiting: the children are killed and reaped, not orphaned
    pid_file = tmp_path / "pids"

    def interrupted_wait(procs, deadline):
        pid_file.write_text(" ".join(str(p.pid) for p in procs))
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "_wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        launch.launch_local(["data", "check", str(tmp_path)], 2, echo=False, env=dict(os.environ, PYTHONPATH=ROOT),
                            cwd=ROOT)
    for pid in map(int, pid_file.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone (reaped), not running without a parent


def test_mesh_that_does_not_match_the_run_names_processes_and_devices():
    with pytest.raises(RecError, match=r"needs 16 devices, but 1 are available \(this run: 1 process\(es\), 1 cpu"):
        dist.make_mesh("1,16,1", devices=jax.devices()[:1])
