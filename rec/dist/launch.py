"""`rec launch`: run one rec command as N local processes, like the N hosts of a TPU slice.

Each process gets REC_COORDINATOR_ADDRESS (a free loopback port), REC_NUM_PROCESSES and
REC_PROCESS_ID, so `rec.dist.init_distributed` joins them into one JAX run; with
`cpu_devices` each process also sees that many fake CPU devices (XLA's
--xla_force_host_platform_device_count), e.g. 2 processes x 2 devices = a 4-device mesh. This is
how the tests compare an N-process run with a 1-process run, and how a user checks a multi-host
config on a laptop before paying for a slice.

Output: every line of every process, prefixed with `[pK]` (process 0 unprefixed), also written to
`log_dir/process_K.log` when a log directory is given. When one process fails, the others are
stopped (they would otherwise wait for it at the next collective) and its exit code is returned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from rec.dist import ENV_NAMES
from rec.errors import RecError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(process_id: int, processes: int, port: int, cpu_devices: int = 0, base: dict | None = None) -> dict:
    """The environment of local process `process_id` of `processes`."""
    env = dict(os.environ if base is None else base)
    for key in ENV_NAMES:  # a parent run's process-discovery variables would confuse the children's
        env.pop(key, None)
    if processes > 1:
        env.update(
            REC_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            REC_NUM_PROCESSES=str(processes),
            REC_PROCESS_ID=str(process_id),
        )
    # Unbuffered: a process stopped because another failed must not take its last lines with it.
    env["PYTHONUNBUFFERED"] = "1"
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
    return env


def launch_local(
    rec_args: Sequence[str],
    processes: int,
    cpu_devices: int = 0,
    log_dir: str | None = None,
    timeout: float | None = None,
    echo: bool = True,
    env: dict | None = None,
    cwd: str | None = None,
) -> int:
    """Run `python -m rec <rec_args>` as `processes` local processes; the first non-zero exit
    code (0 when all succeed). `timeout` seconds (None = no limit) stops all and returns 124."""
    if processes < 1:
        raise RecError(f"launch: --processes must be >= 1, got {processes}")
    if cpu_devices < 0:
        raise RecError(f"launch: --cpu-devices must be >= 0, got {cpu_devices}")
    if not rec_args:
        raise RecError("launch: name the rec command to run, e.g. rec launch -n 2 -- sft --config C")
    port = free_port()
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for pid in range(processes):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rec", *rec_args],
            env=process_env(pid, processes, port, cpu_devices, env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        procs.append(proc)
        log_path = os.path.join(log_dir, f"process_{pid}.log") if log_dir else None
        pump = threading.Thread(target=_pump, args=(proc, pid, log_path, echo), daemon=True)
        pump.start()
        pumps.append(pump)

    deadline = None if timeout is None else time.monotonic() + timeout
    previous = _forward_sigterm(procs)
    try:
        return _wait(procs, deadline)
    finally:
        # Also on Ctrl-C or an error here: no child outlives the launcher.
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for pump in pumps:
            pump.join(timeout=5)


def _forward_sigterm(procs: list[subprocess.Popen]):
    """Pass SIGTERM on to every process (as GKE sends it to every pod of a slice), so they save
    and stop together; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    return signal.signal(signal.SIGTERM, forward)


def exit_status(returncode: int) -> int:
    """The shell convention: a child ended by signal N (Popen: -N) reports 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def _wait(procs: list[subprocess.Popen], deadline: float | None) -> int:
    """The first non-zero exit status, 0 when all succeed, 124 at the deadline. 143 (saved and
    stopped by SIGTERM) only when every process that ended did so; a real failure wins over it."""
    while True:
        codes = [None if p.poll() is None else exit_status(p.returncode) for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            if failed[0] == 143:
                # Stopped by SIGTERM after saving: give the others time to finish their save.
                end = time.monotonic() + 120
                while any(p.poll() is None for p in procs) and time.monotonic() < end:
                    time.sleep(0.1)
                codes = [None if p.poll() is None else exit_status(p.returncode) for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                return next((c for c in failed if c != 143), 143)
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            return 124
        time.sleep(0.1)


def _pump(proc: subprocess.Popen, pid: int, log_path: str | None, echo: bool) -> None:
    prefix = "" if pid == 0 else f"[p{pid}] "
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if echo:
                sys.stderr.write(prefix + line)
    finally:
        if log:
            log.close()
