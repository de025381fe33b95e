"""The ``bmseg`` command: one sub-command per pipeline step, and the error boundary.

The CLI is a layer of its own: ``bmseg.cli.<step>`` modules hold each step's argparse and
expose ``register(subparsers)``, which adds the sub-command(s) and sets ``handler`` (a function
taking the parsed arguments) as a parser default. A handler imports its step module (which
imports torch, the models, pyarrow at its top) and calls the step's typed function, so building
the parser stays cheap: the Nextflow tests parse every process's command line with this very
parser. :func:`main` turns a user's error into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from bmseg import __version__
from bmseg.errors import BmsegError
from bmseg.versions import versions_yaml

STEP_MODULES = (
    "bmseg.cli.synth",
    "bmseg.cli.plan",
    "bmseg.cli.batching",
    "bmseg.cli.segment",
    "bmseg.cli.models",
    "bmseg.cli.gather",
    "bmseg.cli.pages",
    "bmseg.cli.annotate",
    "bmseg.cli.classifiers",
    "bmseg.cli.finetune",
    "bmseg.cli.report",
)

log = logging.getLogger("bmseg")


def _versions_command(args: argparse.Namespace) -> int:
    sys.stdout.write(versions_yaml(args.process))
    return 0


def disable_progress_bars(args: argparse.Namespace) -> None:
    """No tqdm bar in this process: every bar of bmseg and of the libraries it calls.

    tqdm reads ``TQDM_*`` variables as its defaults when it is first imported, which the step
    handlers do only after this; a step's own ``--no-progress`` is set too.
    """
    os.environ["TQDM_DISABLE"] = "1"
    if "tqdm" in sys.modules:  # imported already (an embedding caller): patch the default
        import tqdm

        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    if hasattr(args, "no_progress"):
        args.no_progress = True


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every step's sub-command included."""
    parser = argparse.ArgumentParser(
        prog="bmseg",
        description="Find, measure and classify megakaryocytes and HSPCs in bone-marrow slides.",
    )
    parser.add_argument("--version", action="version", version=f"bmseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only (no progress bars)"
    )
    parser.add_argument(
        "--no-progress",
        dest="progress_off",
        action="store_true",
        help="no progress bars (pipeline tasks: they would flood the task logs)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in STEP_MODULES:
        importlib.import_module(module_name).register(subparsers)
    versions = subparsers.add_parser(
        "versions", help="print package versions as an nf-core versions.yml block"
    )
    versions.add_argument(
        "--process", default="BMSEG", help="process name for the YAML key (%(default)s)"
    )
    versions.set_defaults(handler=_versions_command)
    return parser


_OS_FIXES = {
    errno.ENOSPC: "free space on that disk or pass another --out",
    errno.EDQUOT: "free space on that disk or pass another --out",
    errno.EROFS: "that file system is read-only; pass another --out",
    errno.EACCES: "check its permissions or pass another path",
    errno.EPERM: "check its permissions or pass another path",
    errno.ENAMETOOLONG: "use a shorter name (a shorter --slide-id or folder)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; pass a file",
}


def is_environment_error(error: BaseException) -> bool:
    """An OSError, ValueError or RecursionError, or any of pyarrow's errors (a table of the
    wrong types): what a bad input or a bad machine raises, not a bug of bmseg."""
    if isinstance(error, (OSError, ValueError, RecursionError)):
        return True
    pyarrow = sys.modules.get("pyarrow")  # never imported here: the parser stays cheap
    return pyarrow is not None and isinstance(error, pyarrow.ArrowException)


def environment_error(error: BaseException) -> str:
    """One line for an error that escaped the steps' own checks: a full disk, a read-only or
    missing path, an unreadable file (``OSError``, named by its file), or a value a library
    refused (``ValueError``, pyarrow's ``ArrowInvalid``). ``-v`` logs the traceback."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or text
        fix = _OS_FIXES.get(error.errno or 0, "check the file")
        return f"{error.filename}: {reason}; {fix}"
    if isinstance(error, OSError) and error.errno in _OS_FIXES:
        return f"{text}; {_OS_FIXES[error.errno]}"
    if isinstance(error, RecursionError):
        return f"{text}: an input nests too deeply; pass a file written by bmseg"
    return f"{text} (run with -v for details); check the inputs named above"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bmseg``; user errors print one line and exit 2, bugs keep their traceback.

    The error boundary: a BmsegError is the step's own one-line message; an OSError,
    ValueError (pyarrow's errors included) or RecursionError that escaped the steps' checks
    becomes one line naming the file where the error names one (:func:`environment_error`).
    Exit 2 tells Nextflow not to retry: a retry meets the same input.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.progress_off or args.quiet:
        disable_progress_bars(args)
    try:
        return int(args.handler(args) or 0)
    except BmsegError as error:
        sys.stderr.write(f"bmseg {args.command}: error: {error}\n")
        return 2
    except Exception as error:
        if not is_environment_error(error):
            raise  # a bug: keep the traceback
        log.debug("the error below ends bmseg %s", args.command, exc_info=True)
        sys.stderr.write(f"bmseg {args.command}: error: {environment_error(error)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"bmseg {args.command}: interrupted\n")
        return 130
