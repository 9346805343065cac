"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line (`error: ...`) and exits with status 1;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a path, a file, an option, a dataset."""
