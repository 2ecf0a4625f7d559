"""``mixq toy``: the paper's Fig. 3 experiment (quantizers fitted to N(0,1) samples).

See :mod:`mixq.experiments.toy` for the loss, the optimizer and the oscillation measure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixq.experiments.toy import (
    DEFAULT_LR,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    format_table,
    plot_curves,
    run_toy,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``toy`` on the ``mixq`` sub-parsers and set its ``func``."""
    p = subparsers.add_parser(
        "toy",
        help="fit the six quantizer parametrizations to N(0,1) samples (paper Fig. 3)",
        description=(
            "Fit each learned quantizer (U1 b_d, U2 b_qmax, U3 d_qmax, P1 b_qmin, P2 b_qmax, "
            "P3 qmin_qmax; signed) to samples of N(0,1) by plain gradient descent on "
            "mean((Q(x) - x)^2), with one learning rate for all, from the same b0-bit "
            "initialisation; print final MSE, bitwidth and an oscillation measure."
        ),
    )
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="SGD steps (default: %(default)s)"
    )
    p.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="shared learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="N(0,1) samples (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="sample seed (default: %(default)s)")
    p.add_argument(
        "--b0",
        type=int,
        default=4,
        help="initial bitwidth of all quantizers (default: %(default)s)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="save the MSE curves as a PNG")
    p.add_argument("--json", metavar="FILE", help="write settings, results and curves as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the experiment, print the table, write the optional plot and JSON; exit status 0."""
    result = run_toy(steps=args.steps, lr=args.lr, n=args.samples, seed=args.seed, b0=args.b0)
    print(format_table(result))
    if args.plot:
        try:
            path = plot_curves(result, args.plot)
        except ImportError as e:
            raise RuntimeError(str(e)) from e
        print(f"plot written to {path}")
    if args.json:
        path = Path(args.json)
        path.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
        print(f"JSON written to {path}")
    return 0
