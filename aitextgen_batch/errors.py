"""The one exception type users see for bad input: the CLI prints its message without a traceback."""


class UserError(ValueError):
    """Bad input, named with the file, row or flag at fault and what to do instead."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (at most 500 characters), for a shard's error: the last non-empty line,
    because Ray wraps a remote traceback and its last line is the original exception."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]
