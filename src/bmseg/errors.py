"""The one exception type users see (a one-line message naming the file or flag and the fix),
and the one validation of ids."""

import contextlib
import errno
import re
from collections.abc import Iterator
from pathlib import Path


class BmsegError(Exception):
    """A problem with the user's input or environment, reported as one line and exit code 2.

    The message must name the offending file or parameter and say how to fix it, e.g.
    ``"slide.czi: no pixel size in the metadata; pass --pixel-size-um"``. Bugs are not
    BmsegErrors: they keep their traceback.
    """


ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_ID_LENGTH = 100
"""Longest slide, tile or cell-type id: with a temporary prefix and suffix a file named by it
stays under NAME_MAX (255 bytes), and a cell uid built from it under the label server's cap."""


def check_id(value: object, where: str) -> str:
    """``value`` if it is a safe id, else a BmsegError naming ``where`` (the file or flag).

    The one rule for every id that names a file, folder, HDF5 group or table row (slide ids,
    tile ids, cell types), checked wherever an id is read, not only where it is made:
    1 to :data:`MAX_ID_LENGTH` characters of ``[A-Za-z0-9._-]``, the first not ``.`` or ``-``,
    so no id is ``..``, starts a hidden file, leaves its folder or reads as a flag.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BmsegError(
            f"{where} {value!r}: not a valid id; use letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        )
    if len(value) > MAX_ID_LENGTH:
        raise BmsegError(
            f"{where} {value[:20]!r}... is {len(value)} characters long; an id holds at most "
            f"{MAX_ID_LENGTH}"
        )
    return value


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
