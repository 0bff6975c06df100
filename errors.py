"""One-line errors: what the user can fix, reported as a single line without a traceback.

    UserError        the base: bad data, flags or files, a download, a diverged run (run.run_or_exit prints its
                     message alone; every other exception is a bug and keeps its traceback)
    DataError        missing, misplaced or damaged data, naming the file
    FlagError        flags that cannot work together, found before any work (exit status 2, as argparse's)
    DownloadError    a failed download, or a file whose hash is not the published one
    CheckpointError  a file that is not a checkpoint this project reads, or whose weights do not fit the model
    Diverged         a non-finite loss, gradient or weight
    reading(path)    Pillow's and the OS's errors while reading a file → a DataError naming it

Imports nothing but the standard library, so that every module, the lowest included, can raise them.
"""
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
