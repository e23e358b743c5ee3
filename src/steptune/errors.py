"""The one base class for mistakes a user can fix (a bad path, config, file or name).

The CLI prints such an error as one line and exits with status 2, without a traceback (`steptune --debug ...`
shows it); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in what the user asked for or gave us; its message alone says what to fix."""


class DeprecatedKeyWarning(FutureWarning):
    """A config key read under its old name; the message names the new key (the CLI prints it as one line)."""
