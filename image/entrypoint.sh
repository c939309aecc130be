#!/usr/bin/env bash
# Container entrypoint (PID 1): runs the command as a child, forwards SIGTERM/SIGINT/SIGHUP to it
# and exits with the child's exit status.
#
# Why not `exec "$@"`: as PID 1, a Python process ignores SIGTERM unless it installs a handler, so
# a pod deletion or a preemption would wait out the grace period and end in SIGKILL (137). Here the
# child gets the signal, can finish a checkpoint, and its own exit code reaches Kubernetes, where
# the JobSet podFailurePolicy tells user errors (exit 2) from restartable failures.
set -u

if [ "$#" -eq 0 ]; then
  set -- rec --help
fi

"$@" &
child=$!

forward() {
  kill "-$1" "$child" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until the child
# is really gone, then report its own status (bash remembers it for a reaped background child).
while :; do
  wait "$child"
  status=$?
  if ! kill -0 "$child" 2>/dev/null; then
    break
  fi
done
wait "$child" 2>/dev/null
final=$?
# `wait` on an already-collected child returns 127 in some shells; keep the first real status then.
if [ "$final" -ne 127 ]; then
  status=$final
fi
exit "$status"
