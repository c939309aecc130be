#!/usr/bin/env python3
"""Container entrypoint (PID 1): runs the command as a child, forwards SIGTERM/SIGINT/SIGHUP to it,
reaps any orphan that ends up with PID 1, and exits with the child's status (128+N when signal N
ended it).

Why not `exec rec ...`: as PID 1, a Python process ignores SIGTERM unless it installs a handler, so
a pod deletion or a preemption would wait out the grace period and end in SIGKILL (137). Here the
child gets the signal, can finish a checkpoint, and its own exit code reaches Kubernetes, where the
JobSet podFailurePolicy tells deterministic failures (exit 2, 3, 126, 127: the contract is in
rec/errors.py; this file is standard library only and does not import it) from restartable ones.

Why not a shell `trap` + `wait` loop (the first version): a signal that lands just as `wait` starts
to block can stay unhandled until the child exits by itself; CI once lost a SIGTERM that way for
30 s. Here the signals are blocked before the child starts and taken with sigtimedwait, so none is
lost, whenever it comes. Standard library only: it runs before anything else in the image.
"""

from __future__ import annotations

import os
import signal
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WAITED = set(FORWARDED) | {signal.SIGCHLD}
# Python ignores these at startup; the child must get the usual defaults back (as subprocess does).
RESTORED_TO_DEFAULT = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)
)


def exit_status(wait_status: int) -> int:
    """The shell convention: the exit code, or 128+N for a child ended by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def reap(child: int) -> int | None:
    """Collect every child that has ended; the command's exit status once it is among them."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # nothing left to wait for
            return None
        if pid == 0:
            return None
        if pid == child:
            return exit_status(wait_status)


def main(argv: list[str]) -> int:
    command = argv or ["rec", "--help"]
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        child = os.posix_spawnp(
            command[0], command, os.environ, setsigmask=(), setsigdef=RESTORED_TO_DEFAULT
        )
    except OSError as error:
        print(f"rec-entrypoint: cannot run {command[0]!r}: {error.strerror}", file=sys.stderr)
        return 126 if isinstance(error, PermissionError) else 127
    while True:
        # The timeout is a safety net only: SIGCHLDs can merge, so the children are polled anyway.
        info = signal.sigtimedwait(WAITED, 1.0)
        if info is not None and info.si_signo in FORWARDED:
            try:
                os.kill(child, info.si_signo)
            except ProcessLookupError:  # already ended; its SIGCHLD is on the way
                pass
        status = reap(child)
        if status is not None:
            return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
