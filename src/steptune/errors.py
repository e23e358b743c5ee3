"""The one base class for mistakes a user can fix (a bad path, config, file or name).

The CLI prints such an error as one line and exits with status 2, without a traceback (`steptune --debug ...`
shows it); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in what the user asked for or gave us; its message alone says what to fix."""


class DeprecatedKeyWarning(FutureWarning):
    """A config key read under its old name; the message names the new key."""


def show_deprecated_keys_in_one_line() -> None:
    """Print a DeprecatedKeyWarning as `warning: ...` on stderr (the command-line entry points call this), not as
    Python's two lines pointing into the config loader; other warnings keep their usual form."""
    import sys
    import warnings

    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecatedKeyWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
