"""``mixq train``: run an experiment from a YAML config or a preset."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mixq.config import ConfigError, load_yaml
from mixq.train.config import TrainConfig
from mixq.train.presets import DEFAULT_PRESET, FLOAT_INIT, get_preset


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    p = sub.add_parser(
        "train",
        help="train a (mixed-precision) network",
        description="Train from --config FILE.yaml or --preset NAME (default: the embedded "
        f"{DEFAULT_PRESET}), with --set key=value overrides.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML config file")
    src.add_argument("--preset", help="preset name (see: mixq presets)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.01 (repeatable)",
    )
    p.add_argument("--init", help="float checkpoint to start from (sets the config's init)")
    p.add_argument(
        "--run-dir", help="output folder (default: runs/<preset or config name>-<timestamp>)"
    )
    p.add_argument("--data-dir", help="dataset folder (else config data.dir, else $MIXQ_DATA)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir (with its saved config.yaml unless --config or "
        "--preset is given)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def _from_run_folder(args: argparse.Namespace) -> bool:
    """``--resume --run-dir DIR`` with neither ``--config`` nor ``--preset``: use DIR's config."""
    return bool(args.resume and not (args.config or args.preset))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--init`` as ``init=PATH``."""
    return list(args.overrides) + ([f"init={args.init}"] if args.init else [])


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The validated config and a default run name from the CLI arguments.

    ``--resume --run-dir DIR`` without ``--config``/``--preset`` resumes with the config the
    run saved (``DIR/config.yaml``), so a killed run continues from its folder alone.
    """
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir: the folder of the run to continue")
    if args.config:
        data, name = load_yaml(args.config), Path(args.config).stem
    elif _from_run_folder(args):
        saved = Path(args.run_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(
                f"cannot resume {str(args.run_dir)!r}: no config.yaml there; give the run's "
                "--config or --preset (with its --set overrides)"
            )
        data, name = load_yaml(saved), Path(args.run_dir).name
    else:
        name = args.preset or DEFAULT_PRESET
        data = get_preset(name)
    cfg = TrainConfig.from_data(data, _overrides(args))
    if cfg.init == "REQUIRED":
        raise ConfigError(f"preset {name!r} {FLOAT_INIT}")
    return cfg, name


def header(cfg: TrainConfig, name: str, args: argparse.Namespace) -> list[str]:
    """What the run is: the preset's description, then the overrides that change it.

    A description is the preset's text; with ``--set`` it no longer tells the whole recipe, so
    the overrides follow it. A run resumed from its folder says where its config came from.
    """
    lines = [f"{name}: {cfg.description}"] if cfg.description else []
    overrides = _overrides(args)
    if overrides:
        lines.append("  with " + " ".join(f"--set {o}" for o in overrides))
    if _from_run_folder(args):
        lines.append(f"  resumed with {Path(args.run_dir) / 'config.yaml'} (overrides included)")
    return lines


def run(args: argparse.Namespace) -> int:
    """Train and print the final report."""
    from mixq.train.trainer import fit

    cfg, name = resolve_config(args)
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:  # a fresh folder per run, so that the README's command can be run again
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{name.replace('/', '_')}-{stamp}"
    if os.environ.get("RANK", "0") == "0":
        for line in header(cfg, name, args):
            print(line)
    try:
        summary = fit(
            cfg, run_dir, resume=args.resume, data_dir=args.data_dir, progress=not args.no_progress
        )
    except KeyboardInterrupt:
        if (run_dir / "last.pt").is_file():
            print(f"\nthe completed epochs are in {run_dir}; continue with: mixq train --resume "
                  f"--run-dir {run_dir}")  # fmt: skip
        raise
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    print((run_dir / "report.txt").read_text())
    best = summary["best"]
    if best["epoch"] is None:
        print("no epoch met every budget: no best.pt was written")
    else:
        print(
            f"best: test acc {100 * best['acc']:.2f}% at epoch {best['epoch']} -> "
            f"{run_dir / 'best.pt'}"
        )
    print(f"run directory: {run_dir}")
    return 0
