"""``mixq presets``: list the shipped experiment presets, or show one as YAML."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``presets``."""
    p = sub.add_parser("presets", help="list presets (every CIFAR-10 experiment of the paper)")
    p.add_argument("--show", metavar="NAME", help="print one preset as YAML")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the list or one preset."""
    import yaml

    from mixq.train.presets import PRESETS, get_preset

    if args.show:
        print(yaml.safe_dump(get_preset(args.show), sort_keys=False), end="")
        return 0
    width = max(map(len, PRESETS))
    for name, data in PRESETS.items():
        print(f"{name.ljust(width)}  {data.get('description', '')}")
    return 0
