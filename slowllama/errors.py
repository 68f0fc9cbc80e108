"""The one exception type for problems a user can cause (bad file, bad flag, bad shape).

cli.py turns it into a single line on stderr and a non-zero exit; everything else is a bug
and keeps its traceback.
"""


class SlowLlamaError(Exception):
    """A user-facing error: the message names the file or flag and says what to do."""
