"""The one error type users see: a message that names the file or field, exit code 2, no traceback.

It lives in ``plans`` (the package every other one depends on) so that no stage imports another's internals.
"""


class CompressError(Exception):
    """A user-facing error (bad input, infeasible budget, missing file, ...)."""

    exit_code = 2
