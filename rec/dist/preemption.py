"""Stopping cleanly on SIGTERM: GKE preemption, node maintenance, `kubectl delete`, a `kill` of `rec launch`.

Without this, a preempted slice loses every step since the last periodic checkpoint. With it, the
trainers ask `guard.reached(step)` after each step; once a SIGTERM has arrived, all processes
agree on one step, save a resumable checkpoint there, and exit with status 143. The restarted
JobSet (or the same command run again) continues from that step.

- Several processes: JAX's preemption service (started by `jax.distributed.initialize`) catches
  SIGTERM on any host, tells the others, and `multihost_utils.reached_preemption_sync_point`
  returns True on every host at the same step, the first one all of them can still reach.
- One process: a Python SIGTERM handler sets a flag; the current step finishes first.
- Several processes without that service (turned off, or its private JAX entry point moved): the
  same handler in each process, and every step the processes combine their flags (one tiny
  allgather), so they still stop at the same step however far apart the signals arrive.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("rec.dist")

EXIT_CODE = 143  # 128 + SIGTERM, what a killed process would report


class Preempted(Exception):
    """Raised by a trainer after it saved a checkpoint because of SIGTERM (the CLI exits 143)."""

    def __init__(self, step: int, where: str):
        super().__init__(f"stopped by SIGTERM at step {step}; saved {where}; run the same command to continue")
        self.step = step


class PreemptionGuard:
    """`reached(step)`: True when the run should save at `step` and stop. Use as a context
    manager (restores the previous SIGTERM handler)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._processes = jax.process_count()
        self._multi = self._processes > 1 and _sync_manager_available()
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if not self._flag.is_set():
            log.warning("SIGTERM: finishing this step, then saving a checkpoint and stopping")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if self._processes > 1:
            import numpy as np  # noqa: PLC0415
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
            return bool(np.max(flags))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> PreemptionGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sync_manager_available() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except Exception:  # noqa: BLE001 - private API moved: fall back to the local handler
        return False
