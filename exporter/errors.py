"""The one exception type for mistakes a user can cause (bad files, bad flags).

The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps
its traceback. Messages name the file, say what is wrong, and say what to do.
"""


class PtekitError(Exception):
    pass
