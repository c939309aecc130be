"""Multi-host behaviour of the real commands, run as N local processes (`rec launch`) on fake CPU
devices: the 4-host slice in miniature.

- SFT and recommendation RL on 2 processes x 2 devices equal 1 process x 4 devices over the same
  global batch: the loss of every step to 1e-6 and the final parameters and optimizer state to
  PARAM_ATOL. (Cross-process all-reduces sum in another order than in-process ones; parameters
  whose true gradient is zero, such as the k_proj bias under softmax's shift invariance, get that
  float noise normalised by Adam into differences of a few 1e-6. 1e-5 is 300x below one update.)
- A checkpoint written by 2 processes resumes in 1 process, and one written by 1 process resumes
  in 2; both end in the same state as the uninterrupted run.
- A training process killed with SIGKILL at a random step and restarted with the same command ends
  in exactly the state of the uninterrupted run.
- `rec eval` on 2 processes writes a byte-identical eval_predictions.json.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rec import checkpoint
from rec.dist.launch import launch_local, process_env
from rec.storage import outputs

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]

SFT_STEPS = 8
PARAM_ATOL = 1e-5


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")


def _launch(tmp_path, name: str, processes: int, devices: int, args: list[str]) -> None:
    log_dir = tmp_path / f"{name}.logs"
    code = launch_local(args, processes, devices, log_dir=str(log_dir), timeout=600, echo=False, env=_env(), cwd=str(ROOT))
    if code != 0:
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(log_dir.glob("*.log")))
        pytest.fail(f"{name}: exit {code}\n{logs}")


def _sft_args(run_dir, data_dir, tokenizer_dir, every_steps: int = 4) -> list[str]:
    return [
        "sft", "--config", "configs/tiny/sft.yaml", f"run.dir={run_dir}", f"data.dir={data_dir}",
        f"model.tokenizer={tokenizer_dir}", "run.progress=false", "data.limit=40", "data.max_len=128",
        "data.length_buckets=[128]", "train.batch_size=8", "train.micro_batch_size=4",
        f"train.steps={SFT_STEPS}", "train.eval_every=4", "train.eval_limit=8",
        f"checkpoint.every_steps={every_steps}", "checkpoint.keep=2",
    ]


def _losses(run_dir, stage: str) -> dict[int, float]:
    records = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_same_state(a_dir, b_dir, tag: str, step: int, atol: float = 0.0) -> None:
    a = checkpoint.read_arrays(str(a_dir), tag, step)
    b = checkpoint.read_arrays(str(b_dir), tag, step)
    import jax

    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
    for (path, x), (_, y) in zip(paths_a, paths_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def _resume_from(source, target, tag: str, keep_step: int) -> None:
    """A copy of run `source` as it was when step `keep_step` of `tag` was its newest checkpoint."""
    shutil.copytree(source, target)
    for entry in (target / "checkpoints" / tag).iterdir():
        if entry.name.isdigit() and int(entry.name) > keep_step:
            shutil.rmtree(entry)


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, synth_dataset_dir, synth_tokenizer_dir):
    """The uninterrupted 1-process x 4-device SFT run every other SFT run is compared with."""
    tmp = tmp_path_factory.mktemp("sft_ref")
    run = tmp / "one"
    _launch(tmp, "one", 1, 4, _sft_args(run, synth_dataset_dir, synth_tokenizer_dir))
    return run


def test_sft_two_processes_equal_one_and_checkpoints_cross_restore(
    tmp_path, sft_reference, synth_dataset_dir, synth_tokenizer_dir
):
    one = sft_reference
    two = tmp_path / "two"
    _launch(tmp_path, "two", 2, 2, _sft_args(two, synth_dataset_dir, synth_tokenizer_dir))

    l1, l2 = _losses(one, "sft"), _losses(two, "sft")
    assert sorted(l2) == list(range(1, SFT_STEPS + 1))  # written once, by the primary
    np.testing.assert_allclose([l2[s] for s in sorted(l2)], [l1[s] for s in sorted(l1)], rtol=0, atol=1e-6)
    _assert_same_state(one, two, "sft_last", SFT_STEPS, atol=PARAM_ATOL)
    # every process wrote its own shards into the one checkpoint directory
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(two / "checkpoints" / "sft_last" / "8" / "params"))
    assert sorted(int(s) for s in os.listdir(two / "checkpoints" / "sft_last") if s.isdigit()) == [4, 8]  # keep=2

    # 2-process checkpoint -> 1 process, and 1-process checkpoint -> 2 processes
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    _resume_from(two, two_then_one, "sft_last", 4)
    _resume_from(one, one_then_two, "sft_last", 4)
    _launch(tmp_path, "two_then_one", 1, 4, _sft_args(two_then_one, synth_dataset_dir, synth_tokenizer_dir))
    _launch(tmp_path, "one_then_two", 2, 2, _sft_args(one_then_two, synth_dataset_dir, synth_tokenizer_dir))
    for resumed in (two_then_one, one_then_two):
        _assert_same_state(one, resumed, "sft_last", SFT_STEPS, atol=PARAM_ATOL)
        losses = _losses(resumed, "sft")
        np.testing.assert_allclose([losses[s] for s in range(5, 9)], [l1[s] for s in range(5, 9)], rtol=0, atol=1e-6)


def test_sft_killed_at_a_random_step_resumes_to_the_same_state(
    tmp_path, sft_reference, synth_dataset_dir, synth_tokenizer_dir
):
    """SIGKILL (no clean-up of any kind, possibly mid-save) then the same command again."""
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "rec", *_sft_args(run, synth_dataset_dir, synth_tokenizer_dir, every_steps=2)]
    env = process_env(0, 1, 0, cpu_devices=4, base=_env())
    kill_after = random.SystemRandom().randint(2, SFT_STEPS - 1)
    print(f"killing after step {kill_after}")
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(_losses(run, "sft")) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "killed.log").read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert checkpoint.latest_step(str(run), "sft_last") != SFT_STEPS

    again = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_state(sft_reference, run, "sft_last", SFT_STEPS)  # bit for bit
    losses = _losses(run, "sft")
    assert sorted(losses) == list(range(1, SFT_STEPS + 1))  # replayed steps are not logged twice


def test_rl_two_processes_equal_one(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    def args(run_dir):
        return ["rl", "--config", "configs/tiny/rl.yaml", f"run.dir={run_dir}", f"data.dir={synth_dataset_dir}",
                f"model.tokenizer={synth_tokenizer_dir}", "run.progress=false", "train.steps=3",
                "train.batch_size=4", "train.micro_batch_size=4", "train.lr=0.003", "train.eps=0.001",
                "rl.generations=4", "rl.tasks=[sid_next]", "rl.eval_limit=0", "data.length_buckets=[96]",
                "data.max_len=96"]

    two, one = tmp_path / "two", tmp_path / "one"
    _launch(tmp_path, "two", 2, 2, args(two))
    _launch(tmp_path, "one", 1, 4, args(one))
    records = {}
    for name, run_dir in (("two", two), ("one", one)):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3], name  # written once, by the primary
        records[name] = rows
    for a, b in zip(records["two"], records["one"], strict=True):
        for key in ("loss", "reward", "hit_rate", "kl"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
    _assert_same_state(one, two, "rl_last", 3, atol=PARAM_ATOL)
    assert outputs.completion(str(two))["stage"] == outputs.completion(str(one))["stage"] == "rl"


def test_eval_on_two_processes_writes_identical_bytes(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    def args(out):
        return ["eval", "--config", "configs/tiny/eval.yaml", f"data.dir={synth_dataset_dir}",
                f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={out}", "eval.beams=5", "eval.batch_size=4",
                "eval.limit=22", "run.progress=false"]  # 22 rows: the last batch is ragged

    single, multi = tmp_path / "single", tmp_path / "multi"
    _launch(tmp_path, "single", 1, 4, args(single))
    _launch(tmp_path, "multi", 2, 2, args(multi))
    assert (multi / "eval_predictions.json").read_bytes() == (single / "eval_predictions.json").read_bytes()
    figures = [json.loads((d / "run_summary.json").read_text()) for d in (single, multi)]
    for f in figures:
        f.pop("eval/samples_per_s")
    assert figures[0] == figures[1] and figures[0]["eval/num_samples"] == 22


def test_sft_two_processes_checkpoint_straight_to_gcs(tmp_path, gcs_bucket, sft_reference, synth_dataset_dir,
                                                      synth_tokenizer_dir):
    """run.dir on gs:// (a real fake-gcs-server on loopback): both processes write their shards
    through tensorstore/gcsfs, the primary writes metrics and summary, and the result equals the
    local 1-process run."""
    from rec import storage

    run = f"gs://{gcs_bucket}/runs/sft"
    _launch(tmp_path, "gcs", 2, 2, _sft_args(run, synth_dataset_dir, synth_tokenizer_dir))
    assert checkpoint.latest_step(run, "sft_last") == SFT_STEPS
    _assert_same_state(sft_reference, run, "sft_last", SFT_STEPS, atol=PARAM_ATOL)
    shards = storage.listdir(f"{run}/checkpoints/sft_last/{SFT_STEPS}/params")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(shards)
    summary = json.loads(storage.read_text(f"{run}/run_summary.json"))
    assert summary["train/processes"] == 2 and summary["train/steps"] == SFT_STEPS
    assert outputs.completion(run)["stage"] == "sft"  # written last, once, to the bucket


def test_sigterm_to_two_processes_saves_one_step_and_resumes(tmp_path, sft_reference, synth_dataset_dir,
                                                             synth_tokenizer_dir):
    """A preemption: SIGTERM to `rec launch`, which passes it to both processes (as GKE signals
    every pod). They agree on a step, both save it, exit 143; the same command continues."""
    run = tmp_path / "preempted"
    args = [sys.executable, "-m", "rec", "launch", "-n", "2", "--cpu-devices", "2", "--",
            *_sft_args(run, synth_dataset_dir, synth_tokenizer_dir, every_steps=SFT_STEPS)]
    log = open(tmp_path / "preempted.log", "w")
    proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(_losses(run, "sft")) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    log.close()
    output = (tmp_path / "preempted.log").read_text()
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 2, output[-3000:]  # both processes, the same step
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert all(f"at step {step};" in line for line in stopped) and 2 <= step < SFT_STEPS
    assert checkpoint.latest_step(str(run), "sft_last") == step
    assert outputs.completion(str(run)) is None  # preempted: not finished, `rec rl` would refuse it

    _launch(tmp_path, "preempted-again", 2, 2, _sft_args(run, synth_dataset_dir, synth_tokenizer_dir, every_steps=SFT_STEPS))
    _assert_same_state(sft_reference, run, "sft_last", SFT_STEPS, atol=PARAM_ATOL)
    assert outputs.completion(str(run))["stage"] == "sft"


def test_a_failure_on_process_0_alone_ends_the_run_at_once(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    """Only process 0 writes config.yaml; here that write fails (the name is a directory). Process
    0 must exit with the one-line error at once, so the launcher stops process 1, instead of
    waiting in JAX's shutdown while process 1 waits for it at the first collective until that
    times out (30 s on CPU, minutes on TPU)."""
    run = tmp_path / "run"
    (run / "config.yaml").mkdir(parents=True)
    log_dir = tmp_path / "logs"
    code = launch_local(_sft_args(run, synth_dataset_dir, synth_tokenizer_dir), 2, 2, log_dir=str(log_dir),
                        timeout=600, echo=False, env=_env(), cwd=str(ROOT))
    first, second = (log_dir / "process_0.log").read_text(), (log_dir / "process_1.log").read_text()
    assert code == 2, first[-3000:] + second[-3000:]
    assert f"error: {run}/config.yaml: Is a directory" in first.splitlines()
    assert "DEADLINE_EXCEEDED" not in second  # stopped by the launcher, not by a collective's timeout
