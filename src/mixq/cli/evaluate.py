"""``mixq eval``: test accuracy and memory of a checkpoint."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``."""
    p = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", help="dataset folder (else config data.dir, else $MIXQ_DATA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print accuracy, loss, memory and budget status."""
    from mixq.train.build import load_model
    from mixq.train.config import TrainConfig
    from mixq.train.ddp import DistContext, select_device
    from mixq.train.setup import build_budget, build_loaders, load_data
    from mixq.train.trainer import evaluate, memory_stats

    model, ckpt = load_model(args.checkpoint)
    cfg = TrainConfig.from_data(ckpt["config"])
    device = select_device(args.device)
    model.to(device)
    data = load_data(cfg, args.data_dir)
    loader = build_loaders(cfg, data, DistContext(device=device))[1]
    result = {**evaluate(model, loader), **memory_stats(model)}
    budget = build_budget(cfg, model)
    result["budget_met"] = budget.satisfied(model) if budget.active else {}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"test accuracy {100 * result['acc']:.2f}%  loss {result['loss']:.4f}  "
            f"weights {result['weight_kib']:.2f} KiB  activations sum/max "
            f"{result['act_sum_kib']:.2f}/{result['act_max_kib']:.2f} KiB  "
            f"budgets {result['budget_met'] or 'none'}"
        )
    return 0
