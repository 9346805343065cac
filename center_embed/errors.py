"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line (`error: ...`) and exits with its
`exit_code` (1; 130 for an interrupted run); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a path, a file, an option, a dataset."""

    exit_code = 1  # what the CLI exits with after printing the message


class Interrupted(UserError):
    """Ctrl-C or SIGTERM stopped the work after saving what it had; the message says how to
    go on. Exits 130, as a shell reports a process stopped by SIGINT."""

    exit_code = 130


def install_hint(extra: str) -> str:
    """How to install an optional extra, in the one form that works: from a clone of the
    repository (the package is not published on a registry), e.g. `pip install '.[score]'`."""
    return f"pip install '.[{extra}]' (in the center-embed clone)"
