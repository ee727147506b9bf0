"""The one exception type users see for bad input: the CLI prints its message without a traceback."""


class UserError(ValueError):
    """Bad input, named with the file, row or flag at fault and what to do instead."""
