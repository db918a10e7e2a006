"""The one exception family the CLI reports as a user error: one line on stderr, exit status 2."""


class UserError(Exception):
    """Bad input from the user (config, flags, paths, run directories), never a bug in bnexp."""


class RunFailed(Exception):
    """A run that failed through no fault of the user (e.g. a worker process of a distributed run died):
    reported like a user error, as one line on stderr, but with exit status 1."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none: library errors
    (torch, sklearn, torchvision) often carry multi-line messages, and a user error is one line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
