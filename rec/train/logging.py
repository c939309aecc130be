"""Training metrics: `metrics.jsonl`, Weights & Biases, a progress bar, `run_summary.json`.

- `metrics.jsonl` gets one JSON object per logged step, `{"step": n, "stage": "sft", ...}`, written
  by the primary process only (all processes hold the same global metrics). On resume, lines of
  this stage past the restored step are dropped first, so the file reads like one uninterrupted run.
  On gs:// the object is rewritten in batches (GCS objects cannot be appended to).
- W&B is imported lazily and never required: `run.wandb_mode` auto = online when WANDB_API_KEY is
  set, else offline (files under the run directory, synced later with `wandb sync`); disabled when
  wandb is not installed or WANDB_MODE=disabled. The W&B run id is derived from the run directory
  and stage, so a restarted job continues the same W&B run.
- The tqdm bar (stderr, off with run.progress=false) shows loss and lr.
- `merge_run_summary` updates keys of `run_summary.json` without clobbering other stages' keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

from rec import storage

log = logging.getLogger("rec.train")

GCS_FLUSH_SECONDS = 60.0


def _primary() -> bool:
    import jax

    return jax.process_index() == 0


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (jax/numpy scalars -> float/int; NaN/inf -> None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def merge_run_summary(run_dir: str, values: dict) -> dict:
    """Set `values` in run_dir/run_summary.json, keeping every other key; returns the result.

    Primary process only (others return the merged dict without writing)."""
    path = storage.join(run_dir, "run_summary.json")
    summary: dict = {}
    if storage.exists(path):
        try:
            summary = json.loads(storage.read_text(path))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a new summary", path)
            summary = {}
    summary.update({k: _plain(v) for k, v in values.items()})
    if _primary():
        storage.write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def read_metrics(run_dir: str, stage: str | None = None) -> list[dict]:
    """The metrics.jsonl records (of one stage when given)."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    records = []
    for line in storage.read_text(path).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or a torn last line of a killed writer
    return [r for r in records if stage is None or r.get("stage") == stage]


def _wandb_mode(setting: str) -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled" or setting == "disabled":
        return "disabled"
    if setting in ("online", "offline"):
        return setting
    if env in ("online", "offline"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY", "").strip() else "offline"


class MetricsLogger:
    """Per-stage metrics sink. `log(step, metrics)` after each step; `close()` at the end."""

    def __init__(self, run_dir: str, stage: str, cfg=None, total_steps: int = 0, initial_step: int = 0):
        self.run_dir = str(run_dir)
        self.stage = stage
        self.path = storage.join(self.run_dir, "metrics.jsonl")
        self.primary = _primary()
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self._wandb = None
        self._bar = None
        progress = True if cfg is None else bool(cfg.run.progress)
        if self.primary:
            self._truncate_after(initial_step)
            if cfg is not None:
                self._init_wandb(cfg)
            if progress and total_steps:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total_steps,
                    initial=initial_step,
                    desc=stage,
                    file=sys.stderr,
                    dynamic_ncols=True,
                    leave=True,
                )

    # -- metrics.jsonl -------------------------------------------------------------------------
    def _truncate_after(self, step: int) -> None:
        """Drop this stage's records past `step` (left by a run that died after its checkpoint)."""
        if not storage.exists(self.path):
            return
        lines = storage.read_text(self.path).splitlines()
        keep = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed writer
            if record.get("stage") == self.stage and int(record.get("step", 0)) > step:
                continue
            keep.append(line)
        if len(keep) != len(lines):
            storage.write_text(self.path, "".join(line + "\n" for line in keep))

    def _flush(self, force: bool = False) -> None:
        if not self._pending:
            return
        if (
            storage.is_gcs(self.path)
            and not force
            and time.monotonic() - self._last_flush < GCS_FLUSH_SECONDS
        ):
            return
        storage.append_text(self.path, "".join(self._pending))
        self._pending = []
        self._last_flush = time.monotonic()

    # -- W&B -------------------------------------------------------------------------------------
    def _init_wandb(self, cfg) -> None:
        mode = _wandb_mode(cfg.run.wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.info("wandb not installed; W&B logging off")
            return
        from rec.config import to_dict

        wandb_dir = (
            self.run_dir if not storage.is_gcs(self.run_dir) else os.path.join(os.getcwd(), "wandb-runs")
        )
        os.makedirs(wandb_dir, exist_ok=True)
        run_id = hashlib.sha1(
            f"{os.path.abspath(self.run_dir) if not storage.is_gcs(self.run_dir) else self.run_dir}:{self.stage}".encode()
        ).hexdigest()[:16]
        try:
            self._wandb = wandb.init(
                project=cfg.run.wandb_project,
                name=f"{os.path.basename(self.run_dir.rstrip('/'))}-{self.stage}",
                id=run_id,
                resume="allow",
                mode=mode,
                dir=wandb_dir,
                config=to_dict(cfg),
                job_type=self.stage,
            )
        except Exception as exc:  # noqa: BLE001 - W&B trouble must never stop training
            log.warning("W&B init failed (%s); continuing without it", exc)
            self._wandb = None

    # -- API -------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict, show: bool = True) -> None:
        """Record metrics of `step` (all processes may call; only the primary writes)."""
        if not self.primary:
            return
        record = {"step": int(step), "stage": self.stage}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._pending.append(json.dumps(record) + "\n")
        self._flush()
        if self._wandb is not None:
            self._wandb.log(
                {
                    f"{self.stage}/{k}": v
                    for k, v in record.items()
                    if k not in ("step", "stage") and v is not None
                },
                step=int(step),
            )
        if self._bar is not None and show:
            self._bar.n = int(step)
            postfix = {}
            for key in ("loss", "lr", "val_loss", "reward"):
                if record.get(key) is not None:
                    postfix[key] = f"{record[key]:.4g}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def flush(self) -> None:
        """Write buffered lines now (call before checkpoints and at the end)."""
        if self.primary:
            self._flush(force=True)

    def close(self) -> None:
        self.flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B finish failed (%s)", exc)
            self._wandb = None
