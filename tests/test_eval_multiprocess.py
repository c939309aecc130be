"""`rec eval` as two processes writes exactly what one process writes over the same devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_args(data_dir, tokenizer_dir, out):
    return [sys.executable, "-m", "rec", "eval", "--config", str(ROOT / "configs/tiny/eval.yaml"),
            f"data.dir={data_dir}", f"model.tokenizer={tokenizer_dir}", f"run.dir={out}", "eval.beams=5",
            "eval.batch_size=4", "eval.limit=24", "run.progress=false"]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


@pytest.mark.slow
def test_two_processes_match_one(synth_dataset_dir, synth_tokenizer_dir, tmp_path):
    single = tmp_path / "single"
    result = subprocess.run(_eval_args(synth_dataset_dir, synth_tokenizer_dir, single), cwd=ROOT, env=_env(2),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(_eval_args(synth_dataset_dir, synth_tokenizer_dir, multi), cwd=ROOT,
                         env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                  JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    assert json.loads((multi / "eval_predictions.json").read_text()) == json.loads(
        (single / "eval_predictions.json").read_text()
    )
    figures = [json.loads((d / "run_summary.json").read_text()) for d in (single, multi)]
    for f in figures:
        f.pop("eval/samples_per_s")
    assert figures[0] == figures[1] and figures[0]["eval/num_samples"] == 24
