"""The one exception type users see.

Anything raised as `RecError` is printed by the CLI as a single line (`error: <message>`) with a
non-zero exit and no traceback. Messages name the file, row or config key and say what is wrong.
"""


class RecError(Exception):
    """A problem the user can act on (bad input, bad config, missing file)."""

    def __init__(self, message: str):
        # One line only: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split("\n")))


# Exit codes: the contract between `rec`, the image's entrypoint and the JobSet failure policy
# (tools/deploy renders FAIL_FAST_EXIT_CODES into every podFailurePolicy; docs/DEPLOY.md explains it).
EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected exception: may be transient (network, storage) -> restart, bounded
EXIT_USER_ERROR = 2  # bad config, data or paths (RecError): a restart cannot fix it -> fail at once
EXIT_RESOURCE_EXHAUSTED = 3  # XLA RESOURCE_EXHAUSTED (device memory): same shapes, same result -> fail
EXIT_CANNOT_EXECUTE = 126  # the image's command exists but cannot run -> fail
EXIT_NOT_FOUND = 127  # the image's command does not exist (image/entrypoint.py) -> fail
EXIT_PREEMPTED = 143  # SIGTERM: a checkpoint was saved first -> restart, resumes from it
# `rec outputs wait --start-timeout`: the input is not there and nothing has started producing it
# (RL applied beside SFT took the only free slice): give the slice back -> restart, bounded; the
# older SFT pods are scheduled first meanwhile.
EXIT_INPUT_NOT_STARTED = 75
# What fails the JobSet at once. Everything else restarts it: 143, 75 and crashes (1, 137 = SIGKILL)
# up to maxRestarts; node maintenance and preemption (pod condition DisruptionTarget) without limit.
FAIL_FAST_EXIT_CODES = (EXIT_USER_ERROR, EXIT_RESOURCE_EXHAUSTED, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND)


def resource_exhausted(exc: BaseException) -> str:
    """The first line of an XLA RESOURCE_EXHAUSTED error (out of device memory), '' for any other."""
    text = str(exc)
    if type(exc).__name__ not in ("XlaRuntimeError", "JaxRuntimeError") or "RESOURCE_EXHAUSTED" not in text:
        return ""
    return next((line.strip() for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), "")


class InputNotStarted(RecError):
    """The input a step waits for has not started to be produced (the CLI exits 75)."""
