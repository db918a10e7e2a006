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


def excerpt(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut to about `limit` characters. reprlib bounds the
    work too, so a value built from YAML aliases (millions of elements sharing a few lists) costs no more
    than a short one."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit
    short = r.repr(value)
    return short if len(short) <= limit else short[:limit - 1] + "…"


def shown_path(path: object, limit: int = 160) -> str:
    """A path as an error message names it: whole, unless it is very long (then its start and end)."""
    text = str(path)
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"
