"""One-line errors: what the user can fix, reported as a single line without a traceback.

    UserError        the base: bad data, flags or files, a download, a diverged run (run.run_or_exit prints its
                     message alone; every other exception is a bug and keeps its traceback)
    DataError        missing, misplaced or damaged data, naming the file
    FlagError        flags that cannot work together, found before any work (exit status 2, as argparse's)
    DownloadError    a failed download, or a file whose hash is not the published one
    CheckpointError  a file that is not a checkpoint this project reads, or whose weights do not fit the model
    Diverged         a non-finite loss, gradient or weight
    reading(path)    Pillow's and the OS's errors while reading a file → a DataError naming it
    WriteError       an output that could not be written: a full disk, a read-only file system, no permission
    writing(path, what, intact)  the OS's (and torch.save's) errors while writing a file → a WriteError naming
                     the file, the cause and what is intact; the partial file is removed
    write_failure    the cause of such an error in words (None: not an error of the file system)

Imports nothing but the standard library, so that every module, the lowest included, can raise them.
"""
import errno
import os
import shutil
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix, reported as its message alone with exit status `exit_status`.
    all_ranks: whether each process reports its own (a data error may be one rank's only)."""
    exit_status = 1
    all_ranks = True


class DataError(UserError):
    """Missing, misplaced or damaged data. The message names the path."""


class FlagError(UserError):
    """A flag or a combination of flags that cannot work: found before any work, reported once (by rank 0),
    exit status 2 as argparse's own errors."""
    exit_status = 2
    all_ranks = False


class DownloadError(UserError):
    """A download failed, or a file's hash differs from the published one. The message is one line."""


class CheckpointError(UserError):
    """A file that is not a checkpoint this project can read, or whose weights do not fit the model."""


class Diverged(UserError):
    """A non-finite loss, gradient or weight: the run stops, and its last good checkpoint stays as it was."""


@contextmanager
def reading(path):
    """Turn Pillow's and the OS's errors while reading `path` into a DataError naming it."""
    try:
        yield
    except (OSError, SyntaxError) as e:  # Pillow raises SyntaxError for some broken PNG chunks
        raise DataError(f"{path}: cannot read ({e})") from None


class WriteError(UserError):
    """An output that could not be written: a full disk, a read-only file system, no permission, a folder that
    went away. The message names the file, the cause and what is intact (see `writing`)."""


# the causes of a failed write that the user can fix, in the messages' words
WRITE_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (the file system's limit, or this process's: ulimit -f)",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied",
                errno.ENOENT: "missing folder", errno.ENOTDIR: "a file where a folder should be",
                errno.EIO: "input/output error (a failing disk, or a network file system gone)"}
# Where a failed write left no errno (torch's zip writer on a path reports 'basic_ios::clear'), a file system with
# less free space than this counts as full.
NEARLY_FULL = 1 << 20


def mount_point(path):
    """The mount point of the file system that holds `path` (or would: its deepest existing folder)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def write_failure(error, path=None):
    """The cause, in words, of `error` raised while writing the file `path`; None where the file system is not
    the cause (a bug, which keeps its traceback). The OSError may be the error itself or one it was raised while
    handling: torch.save reports a failed write as RuntimeError('[enforce fail at inline_container.cc] unexpected
    pos …'), raised while handling the OSError of the file object's write."""
    seen, writer_error = set(), False
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_CAUSES:
            cause = WRITE_CAUSES[error.errno]
            if path is not None and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                cause += f" (the file system mounted at {mount_point(path)})"
            return cause
        writer_error |= isinstance(error, RuntimeError) and any(
            word in str(error) for word in ("inline_container", "iostream", "write", "file"))
        error = error.__cause__ or error.__context__
    if writer_error and path is not None:
        try:
            if shutil.disk_usage(mount_point(path)).free < NEARLY_FULL:
                return f"{WRITE_CAUSES[errno.ENOSPC]} (the file system mounted at {mount_point(path)})"
        except OSError:
            pass
    return None


@contextmanager
def writing(path, what=None, intact="", partial=None):
    """Turn the file system's errors while writing `path` (OSError, or torch.save's RuntimeError that hides one)
    into a WriteError of one line, '{cause} while writing {what}; {intact}', e.g. 'no space left on device (the
    file system mounted at /data) while writing the checkpoint of iteration 8 (runs/x/checkpoint.pth); the
    checkpoint of iteration 4 is intact; …'. what: the file in words (default: its path); intact: what is intact
    and what to do now (a string, or a function returning one, called only on failure); partial: the file to
    remove on failure, so that no half file fills the disk (default: `path`; False: keep it, as for a log that is
    appended to). Any other error propagates unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = write_failure(e, path)
        if cause is None:
            raise
        partial = path if partial is None else partial
        if partial and os.path.isfile(partial):
            try:
                os.remove(partial)
            except OSError:
                pass  # a read-only file system: nothing was written there either
        intact = intact() if callable(intact) else intact
        raise WriteError(f"{cause} while writing {what or path}" + (f"; {intact}" if intact else "")) from None
