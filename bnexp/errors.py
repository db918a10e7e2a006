"""The one exception family the CLI reports as a user error: one line on stderr, exit status 2."""


class UserError(Exception):
    """Bad input from the user (config, flags, paths, run directories), never a bug in bnexp."""
