"""The ``mixq`` command line: ``mixq <command> [options]``.

Each command lives in its own module of this package and exposes
``add_parser(subparsers)`` (which registers its options and sets ``func``) and nothing else.
This file only dispatches; it holds no logic.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mixq`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2
