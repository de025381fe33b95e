"""The one exception type users see (a one-line message naming the file or flag and the fix),
and the one validation of ids."""

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path


class BmsegError(Exception):
    """A problem with the user's input or environment, reported as one line and exit code 2.

    The message must name the offending file or parameter and say how to fix it, e.g.
    ``"slide.czi: no pixel size in the metadata; pass --pixel-size-um"``. Bugs are not
    BmsegErrors: they keep their traceback.
    """


DAMAGED_FILE_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, RecursionError)
"""What reading a damaged or foreign file raises: I/O errors, bad JSON or Parquet (pyarrow's
errors derive from ValueError and OSError), fields of the wrong type or missing."""


ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOMEM)
"""OSErrors that blame the machine (space, permissions), never the file being read."""


@contextlib.contextmanager
def reading(path: str | Path, fix: str) -> Iterator[None]:
    """Turn an error raised while reading and using ``path`` into a one-line BmsegError.

    For code that parses a file's content: ``with reading(path, "re-run bmseg train"): ...``
    makes a damaged, truncated or foreign file end in ``"{path}: {what went wrong}; {fix}"``
    instead of a traceback. BmsegErrors pass through unchanged.
    """
    try:
        yield
    except BmsegError:
        raise
    except OSError as error:
        if error.errno in ENVIRONMENT_ERRNOS or error.filename not in (None, str(path)):
            raise  # a full disk or another file: not this file's fault (the CLI names it)
        raise BmsegError(f"{path}: unreadable ({error}); {fix}") from error
    except DAMAGED_FILE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, (KeyError, IndexError)):
            reason = f"{type(error).__name__} {reason}"
        raise BmsegError(
            f"{path}: unreadable or not as bmseg writes it ({reason}); {fix}"
        ) from error
