"""The ``mixq`` command line: ``mixq <command> [options]``.

Each command lives in its own module of this package and exposes
``add_parser(subparsers)`` (which registers its options and sets ``func``) and nothing else.
This file only dispatches, and turns every error into one message line (``--debug``: the
traceback instead): exit status 2 for a usable message, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

#: Command name -> module of ``mixq.cli``. Imported lazily so that ``mixq --help``
#: stays fast and optional extras are only needed by the commands that use them.
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "evaluate",
    "report": "report",
    "presets": "presets",
    "export": "export",
    "toy": "toy",
    "prepare-imagenet": "prepare_imagenet",
}

#: The longest error message printed (a crafted input must not make mixq print megabytes).
MAX_MESSAGE = 2000
#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="mixq",
        description="Mixed-precision DNNs with learned quantizers (Uhlich et al., ICLR 2020).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(f"mixq.cli.{module}").add_parser(sub)
    return parser


def describe_error(e: BaseException) -> str:
    """One line for the user: the message of a mixq error; for file-system errors what
    failed on which path (and the fix for a full disk); else the exception type and text."""
    if isinstance(e, OSError) and e.strerror:
        where = f" {str(e.filename)!r}" if e.filename else ""
        msg = f"{e.strerror}:{where}"
        if e.errno == errno.ENOSPC:
            msg += " (free some space, then resume with --resume; completed epochs are kept)"
        elif e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            msg += " (choose a folder you can write, e.g. another --run-dir / -o)"
    elif isinstance(e, (ValueError, RuntimeError, LookupError)) and str(e):
        msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
    else:
        msg = f"{type(e).__name__}: {e} (run with --debug for the traceback)"
    return msg if len(msg) <= MAX_MESSAGE else msg[:MAX_MESSAGE] + " ... (message cut)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mixq`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nmixq {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every error is a message; --debug keeps the traceback
        if debug:
            raise
        print(f"mixq {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 2
