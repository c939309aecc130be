"""metrics.jsonl (resume truncation), run_summary.json merging, W&B mode resolution."""

import json
import math

import pytest

from rec.config import load_config
from rec.train.logging import MetricsLogger, _wandb_mode, merge_run_summary, read_metrics


def _cfg(tmp_path):
    return load_config(None, [f"run.dir={tmp_path}", "run.progress=false", "run.wandb_mode=disabled"])


def test_metrics_lines_and_resume_truncation(tmp_path):
    run = str(tmp_path)
    logger = MetricsLogger(run, "sft", _cfg(tmp_path), total_steps=10)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1})
    logger.log(5, {"val_loss": float("nan")})
    logger.close()
    other = MetricsLogger(run, "rl", _cfg(tmp_path))
    other.log(7, {"reward": 0.5})
    other.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "stage": "sft", "lo')  # torn line of a killed writer
    # resumed from a checkpoint at step 3: later sft lines go, the rl line and earlier lines stay
    resumed = MetricsLogger(run, "sft", _cfg(tmp_path), total_steps=10, initial_step=3)
    resumed.log(4, {"loss": 0.2})
    resumed.close()
    sft = read_metrics(run, "sft")
    assert [(r["step"], r["loss"]) for r in sft] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.2)]
    assert [r["reward"] for r in read_metrics(run, "rl")] == [0.5]
    assert all(r["stage"] in ("sft", "rl") for r in read_metrics(run))


def test_nan_is_written_as_null(tmp_path):
    logger = MetricsLogger(str(tmp_path), "sft", _cfg(tmp_path))
    logger.log(1, {"loss": math.inf, "grad_norm": float("nan"), "lr": 1e-3})
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().strip())
    assert line == {"step": 1, "stage": "sft", "loss": None, "grad_norm": None, "lr": 1e-3}


def test_merge_run_summary_keeps_other_keys(tmp_path):
    (tmp_path / "run_summary.json").write_text(json.dumps({"eval/hr@10": 0.2, "train/steps": 1}))
    merged = merge_run_summary(str(tmp_path), {"train/steps": 9, "train/final_loss": float("nan")})
    on_disk = json.loads((tmp_path / "run_summary.json").read_text())
    assert on_disk == merged == {"eval/hr@10": 0.2, "train/steps": 9, "train/final_loss": None}


@pytest.mark.parametrize(
    "setting,env,expected",
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "k"}, "online"),
        ("offline", {"WANDB_API_KEY": "k"}, "offline"),
        ("online", {"WANDB_MODE": "disabled"}, "disabled"),
        ("disabled", {"WANDB_API_KEY": "k"}, "disabled"),
        ("auto", {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, "offline"),
    ],
)
def test_wandb_mode(monkeypatch, setting, env, expected):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _wandb_mode(setting) == expected
