"""``mixq report``: the per-layer report of a checkpoint."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    p = sub.add_parser("report", help="per-layer bitwidths and memory of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["text", "json", "csv"], default="text")
    p.add_argument("--png", help="also draw the per-layer bitwidth chart to this PNG")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report in the chosen format."""
    from mixq.report import report
    from mixq.train.build import load_model
    from mixq.train.config import TrainConfig
    from mixq.train.trainer import build_budget

    model, ckpt = load_model(args.checkpoint)
    budget = build_budget(TrainConfig.from_data(ckpt["config"]), model)
    rep = report(model, budget if budget.active else None)
    print({"text": rep.to_text, "json": rep.to_json, "csv": rep.to_csv}[args.format]())
    if args.png:
        rep.plot(args.png)
    return 0
