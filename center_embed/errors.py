"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line (`error: ...`) and exits with status 1;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a path, a file, an option, a dataset."""


def install_hint(extra: str) -> str:
    """How to install an optional extra, in the one form that works: from a clone of the
    repository (the package is not published on a registry), e.g. `pip install '.[score]'`."""
    return f"pip install '.[{extra}]' (in the center-embed clone)"
