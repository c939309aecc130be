"""N processes train exactly like one process over the same global batch.

Two local processes (jax.distributed over 127.0.0.1, 2 fake CPU devices each, a 4-device global
mesh) run the train step with gradient accumulation on parameters sharded across both processes,
save a checkpoint from both, restore it and take one more step. One process with 4 fake devices
runs the same programs. Losses and final parameters must agree to float tolerance. (The real
commands on N processes are in test_multihost.py.)
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rec.dist.launch import free_port, process_env

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
    from rec.train.step import make_train_step
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


def _run_workers(name, script, processes, args, **env) -> list[str]:
    """Run `script args` as `processes` joined local JAX processes on CPU; their stdouts, once all
    exited 0 (any failure or a 240 s timeout fails the test)."""
    port = free_port()
    base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env)
    procs = [
        subprocess.Popen([sys.executable, str(script), *args], env=process_env(pid, processes, port, base=base),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(processes)
    ]
    stdouts = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{name}: worker timed out")
        assert p.returncode == 0, f"{name}: worker failed:\n{err[-4000:]}"
        stdouts.append(out)
    return stdouts

def _run(tmp_path, name, processes, devices_each):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run_workers(name, script, processes, [str(out), str(devices_each)], WANDB_MODE="disabled")
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


PREEMPTION_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from rec import dist
    from rec.dist.preemption import PreemptionGuard, _sync_manager_available

    dist.init_distributed()
    guard = PreemptionGuard()
    stopped = None
    for step in range(1, 30):
        if dist.is_primary() is False and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is signalled
        if guard.reached(step):
            stopped = step
            break
    guard.close()
    print(f"service={_sync_manager_available()} stopped={stopped}", flush=True)
    dist.sync("end")
    """
)


def test_processes_stop_at_one_step_without_jax_preemption_service(tmp_path):
    """With JAX's preemption service off, a SIGTERM that reaches one process only still stops
    both at the same step (the guard combines the processes' flags every step)."""
    script = tmp_path / "worker.py"
    script.write_text(PREEMPTION_WORKER)
    stdouts = _run_workers("preemption", script, 2, [], JAX_ENABLE_PREEMPTION_SERVICE="false")
    outputs = [line for out in stdouts for line in out.splitlines() if line.startswith("service=")]  # Gloo prints too
    assert outputs == ["service=False stopped=3", "service=False stopped=3"]
