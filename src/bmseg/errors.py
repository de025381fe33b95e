"""The one exception type users see: a one-line message naming the file or flag and the fix."""


class BmsegError(Exception):
    """A problem with the user's input or environment, reported as one line and exit code 2.

    The message must name the offending file or parameter and say how to fix it, e.g.
    ``"slide.czi: no pixel size in the metadata; pass --pixel-size-um"``. Bugs are not
    BmsegErrors: they keep their traceback.
    """
