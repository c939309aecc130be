"""The one exception type users see.

Anything raised as `RecError` is printed by the CLI as a single line (`error: <message>`) with a
non-zero exit and no traceback. Messages name the file, row or config key and say what is wrong.
"""


class RecError(Exception):
    """A problem the user can act on (bad input, bad config, missing file)."""

    def __init__(self, message: str):
        # One line only: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split("\n")))
