"""Writing a run's files: never through a symbolic link, atomically where a file is read back, and an OS
error as one line naming the path.

A run directory is written by one process (its lock, bnexp.engine.rundir.locked), but its entries may
have been planted: a symbolic link named like one of our temporaries, a `checkpoints` link to somewhere
else. So every file is created with O_EXCL or O_NOFOLLOW (after removing a stale temporary, which removes
a link itself, never its target), and a directory bnexp writes into must be a directory, not a link to one.

Files are written unbuffered, in whole batches: a write the disk refuses leaves no buffered remainder that
a later flush or close would try again (and report a second time, as a traceback at exit).
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Iterator

from bnexp.errors import RunFailed, UserError, shown_path

# OS errors whose remedy is the user's (more space, a writable folder, a shorter name): exit status 2.
USER_CAUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
               errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.EFBIG, errno.EMLINK, errno.ENOENT,
               errno.ENOTEMPTY}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputError(UserError):
    """The output folder refused a write (full, read-only, no permission, a name too long, a link where a
    file goes): one line naming the path, exit status 2."""


class OutputFailed(RunFailed):
    """An I/O error on the output folder that is not the user's doing (EIO, say): one line, exit 1."""


def os_error(err: OSError, path: str | Path, doing: str = "write") -> UserError | RunFailed:
    """The one-line error for an OSError met while `doing` something to `path`."""
    if err.errno == errno.ELOOP and doing == "write":
        reason = "it is a symbolic link (bnexp does not write through links)"
    else:
        reason = err.strerror or str(err)
    kind = OutputError if err.errno in USER_CAUSED else OutputFailed
    return kind(f"cannot {doing} {shown_path(path)}: {reason}")


@contextmanager
def reporting(path: str | Path, doing: str = "write") -> Iterator[None]:
    """Turn an OSError raised in the block into os_error(err, path): one line instead of a traceback."""
    try:
        yield
    except OSError as err:
        raise os_error(err, path, doing) from None


def real_dir(path: Path, create: bool = False) -> Path:
    """`path` as a directory bnexp may write into: an existing directory that is not a symbolic link (made
    when `create` and missing). Anything else is an OutputError."""
    with reporting(path):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(path)
            except FileExistsError:  # made meanwhile: by another worker of a comparison, taking a seed of one arm
                pass
            st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"cannot write into {shown_path(path)}: it is a symbolic link (bnexp does not write "
                          f"through links)")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write into {shown_path(path)}: not a directory")
    return path


def refuse_links(folder: Path, names) -> None:
    """An OutputError if any of `names` in `folder` is a symbolic link: checked before a resumed run writes
    anything, so that it stops with one line rather than midway."""
    for name in names:
        path = Path(folder) / name
        with reporting(path, "check"):
            if path.is_symlink():
                raise OutputError(f"{shown_path(path)} is a symbolic link: bnexp does not write through links "
                                  f"(replace it with the file or folder itself)")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a write may take fewer)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def open_new(path: Path) -> BinaryIO:
    """A fresh file for writing, unbuffered: whatever is at `path` (a stale temporary, a planted link) is
    removed first and the file is created with O_EXCL, so nothing is written through a link."""
    with reporting(path):
        with suppress(FileNotFoundError):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
        return os.fdopen(fd, "wb", buffering=0)


def open_append(path: Path) -> BinaryIO:
    """`path` opened for appending, unbuffered, created if missing; a symbolic link there is an error."""
    with reporting(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        return os.fdopen(fd, "ab", buffering=0)


def write(f: BinaryIO, data: bytes | memoryview, path: Path) -> None:
    """Write all of `data` to a file from open_new/open_append; an OS error names `path`."""
    with reporting(path):
        write_all(f.fileno(), data)


def write_atomic(path: Path, data: str | bytes | memoryview) -> None:
    """Replace `path` with `data` durably: a temporary beside it (`.<name>.tmp`), fsync, rename, fsync of the
    directory. A failure removes the temporary and leaves `path` as it was; a link at `path` is replaced,
    not followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    f = open_new(tmp)
    try:
        with reporting(path):
            try:
                write_all(f.fileno(), payload)
                os.fsync(f.fileno())
            finally:
                f.close()
            os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # best effort: the write's own error is the one to report
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    with reporting(folder):
        sync_dir(folder)


def sync_dir(folder: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: Path) -> None:
    """Remove a file (a link itself, never its target); a missing one is fine."""
    with reporting(path, "remove"), suppress(FileNotFoundError):
        os.unlink(path)
