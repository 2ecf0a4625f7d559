"""``mixq prepare-imagenet``: decode an ImageNet folder once into memory-mapped uint8 shards."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``prepare-imagenet``."""
    p = sub.add_parser(
        "prepare-imagenet",
        help="decode an ImageNet folder (train/, val/) into memory-mapped shards",
        description="Decode SRC (train/<class>/*.JPEG, val/<class>/*.JPEG) once into DST: "
        "val as SIZE x SIZE centre crops of the shorter side resized to round(SIZE*256/224), "
        "train as R x R centre crops of the shorter side resized to R = round(SIZE*256/224) "
        "(so training still takes random crops), uint8 .npy files opened with mmap, and "
        "index.json (classes, counts, shapes, SHA-256). Train with --set "
        "data.name=imagenet_shards --data-dir DST. Disk: about N * 3 * R^2 bytes for train "
        "(ImageNet-1k at SIZE 224: ~252 GB; 192: ~183 GB; 160: ~129 GB).",
    )
    p.add_argument("src", nargs="?", help="ImageFolder root with train/ and val/")
    p.add_argument("dst", help="output folder")
    p.add_argument("--size", type=int, default=224, choices=(160, 192, 224), help="crop size")
    p.add_argument("--workers", type=int, default=8, help="decoding processes (0: in-process)")
    p.add_argument("--overwrite", action="store_true", help="replace prepared shards in DST")
    p.add_argument("--verify", action="store_true", help="only verify DST's checksums")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare (or verify) the shards and print a summary."""
    from mixq.data.shards import prepare_shards, verify_shards

    if args.verify:
        index = verify_shards(args.dst)
        print(f"{args.dst}: checksums OK")
    else:
        if args.src is None:
            raise ValueError("prepare-imagenet needs SRC and DST (or --verify DST)")
        index = prepare_shards(
            args.src,
            args.dst,
            args.size,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    counts = {k: v["count"] for k, v in index["splits"].items()}
    print(json.dumps({"size": index["size"], "classes": len(index["classes"]), **counts}))
    return 0
