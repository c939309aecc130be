"""What a finished stage leaves behind, and how to tell that it is finished.

A step of the pipeline is done when its outputs are, not when its Kubernetes object exists (that
object is deleted by its TTL a week later, or never existed when a rerun comes from elsewhere):
  run       a training run directory (sft, rl, grpo) holds COMPLETED.json, which `rec sft|rl|grpo`
            write last, after the final checkpoint is saved (a preempted or failed run has none);
  handoff   a handoff prefix whose MANIFEST.json verifies (`rec handoff verify`);
  eval      an eval run directory whose run_summary.json records an eval (of `split`, if given).
`make pipeline` skips done steps, the Argo Workflow checks them before creating anything, `rec rl`
refuses an SFT run that is not done, and `rec outputs wait` (the init container of a step applied
with plain `kubectl apply`) holds a step until its input is done.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable

from rec import storage
from rec.errors import InputNotStarted, RecError
from rec.storage import handoff

COMPLETED = "COMPLETED.json"
KINDS = ("run", "handoff", "eval")


def mark_completed(run_dir: str, stage: str, **details) -> str:
    """Write `run_dir`/COMPLETED.json; call it last, once the stage's final checkpoint is saved."""
    doc = {"stage": stage, "completed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    doc.update(details)
    path = storage.join(run_dir, COMPLETED)
    storage.write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def completion(run_dir: str) -> dict | None:
    """The run's COMPLETED.json, or None while it has none."""
    path = storage.join(run_dir, COMPLETED)
    if not storage.exists(path):
        return None
    doc = storage.read_json(path)
    if not isinstance(doc, dict):
        raise RecError(f"{path}: expected a JSON object")
    return doc


def not_done(kind: str, path: str, split: str = "") -> str:
    """'' when the outputs at `path` are finished, else why not (one line)."""
    if kind == "run":
        return "" if completion(path) is not None else f"{path}: no {COMPLETED} (not finished)"
    if kind == "handoff":
        if not storage.exists(handoff.manifest_path(path)):
            return f"{path}: no MANIFEST.json (not published)"
        handoff.verify(path)  # a handoff that does not verify is an error, never "not yet"
        return ""
    if kind == "eval":
        summary_path = storage.join(path, "run_summary.json")
        if not storage.exists(summary_path):
            return f"{path}: no run_summary.json (not evaluated)"
        summary = storage.read_json(summary_path)
        recorded = summary.get("eval/split") if isinstance(summary, dict) else None
        if recorded is None or (split and recorded != split):
            return f"{summary_path}: no eval of split {split or '(any)'} recorded"
        return ""
    raise RecError(f"outputs kind {kind!r}: expected one of {', '.join(KINDS)}")


def started(path: str) -> bool:
    """Whether a training run has begun writing `path` (process 0 writes config.yaml first)."""
    return storage.exists(storage.join(path, "config.yaml"))


def wait_done(
    kind: str,
    path: str,
    timeout: float,
    poll: float = 30.0,
    split: str = "",
    start_timeout: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Block until `not_done` is empty; RecError after `timeout` seconds. With `start_timeout`
    (kind run), InputNotStarted once that long has passed and the run has not even started: the
    waiter may be holding the resources the producer needs. Prints why it waits."""
    start = clock()
    last = ""
    while True:
        reason = not_done(kind, path, split)
        if not reason:
            return
        if reason != last:
            print(f"waiting: {reason}", file=sys.stderr, flush=True)
            last = reason
        waited = clock() - start
        if waited >= timeout:
            raise RecError(f"{reason}; gave up after {waited:.0f} s (is the step that writes it running?)")
        if kind == "run" and start_timeout and waited >= start_timeout and not started(path):
            raise InputNotStarted(
                f"{path}: not started after {waited:.0f} s; giving the resources back so the step that "
                "writes it can be scheduled (this step restarts and waits again)"
            )
        sleep(poll)
