"""ImageNet training throughput (images/s) on one GPU: input pipeline x float vs QAT.

Rows (each for ``--model``, per-GPU batch ``--batch``):

* ``loader:<source>``: the input pipeline alone (batches delivered on the device, normalised):
  ``synthetic`` (a uint8 tensor already on the GPU, :class:`~mixq.data.TensorLoader`),
  ``shards`` (``--shards DIR`` from ``mixq prepare-imagenet``: memory-mapped uint8 + GPU
  random-resized crop) and ``jpeg`` (``--imagefolder DIR``: Pillow decoding in ``--workers``
  DataLoader workers);
* ``train:<source>:<float|qat>``: full training steps of :class:`mixq.train.Trainer` (forward,
  cross-entropy + memory penalty, backward, quantizer gradient clipping, SGD step,
  projection); ``qat`` is the Table 4 learned-bitwidth preset (U3 weights and activations,
  budgets 8a + 8c).

If ``train:shards:*`` is close to ``train:synthetic:*``, decoding no longer bounds training;
``loader:jpeg`` shows what the JPEG path alone can feed. Unmeasured in this repository (no
GPU was available when it was written); run it on the training machine::

    python benchmarks/imagenet_throughput.py --model resnet18 --batch 256 \\
        --shards /data/imagenet-shards-224 --imagefolder /data/imagenet --workers 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mixq.data import DatasetArrays
from mixq.train.config import TrainConfig
from mixq.train.presets import get_preset
from mixq.train.trainer import Trainer, load_data


def _config(
    model: str, qat: bool, batch: int, workers: int, name: str, root: str | None, size: int,
    device: str,
) -> Any:  # fmt: skip
    tag = "u3-w5.40mb-amax0.38mb" if model == "resnet18" else "u3-w1.55mb-amax0.57mb"
    data = get_preset(f"imagenet/{model}/{tag}")
    data.update(init=None, name="bench")
    if not qat:
        data.update(quant=None, budget={})
    data["data"].update(name=name, dir=root, batch_size=batch, workers=workers)
    data["data"]["image_size"] = size if name != "imagenet_shards" else None
    return TrainConfig.from_data({**data, "device": device})


def _synthetic(n: int, size: int) -> DatasetArrays:
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 1000, (n,))
    return DatasetArrays(x, y, x[:8], y[:8], 1000, (3, size, size), "synthetic")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(it: Any, steps: int, warmup: int, body: Any) -> float:
    done, t0 = 0, time.perf_counter()
    for i, (x, y) in enumerate(it):
        if i == warmup:
            _sync()
            t0, done = time.perf_counter(), 0
        body(x, y)
        done += y.numel()
        if i + 1 >= warmup + steps:
            break
    _sync()
    return done / (time.perf_counter() - t0)


def _loop(loader: Any):
    """Cycle through ``loader``'s epochs forever."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    """Parse arguments, time every available row, print a table and JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=("resnet18", "mobilenet_v2"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--shards", help="prepared shard folder (mixq prepare-imagenet)")
    p.add_argument("--imagefolder", help="ImageNet folder with train/ and val/ (JPEG path)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script only")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --device cpu for a smoke test)")
    torch.backends.cudnn.benchmark = True
    sources: dict[str, tuple[str, str | None]] = {"synthetic": ("synthetic", None)}
    if args.shards:
        sources["shards"] = ("imagenet_shards", args.shards)
    if args.imagefolder:
        sources["jpeg"] = ("imagefolder", args.imagefolder)
    n = args.batch * (args.steps + args.warmup)
    results: dict[str, float] = {}
    for src, (name, root) in sources.items():
        for qat in (False, True):
            cfg = _config(args.model, qat, args.batch, args.workers, name, root,
                          args.image_size, args.device)  # fmt: skip
            if name == "synthetic":
                data = _synthetic(min(n, 4096), args.image_size)
            else:
                data = load_data(cfg)
            trainer = Trainer(cfg, Path("/tmp/mixq-bench"), data, progress=False)
            trainer.net.train()
            if not qat:
                loader = _loop(trainer.train_loader)
                results[f"loader:{src}"] = _rate(loader, args.steps, args.warmup, lambda x, y: 0)
            if src == "jpeg":
                break  # the JPEG row is about the loader; training on it is bounded by it
            loader = _loop(trainer.train_loader)
            key = f"train:{src}:{'qat' if qat else 'float'}"
            results[key] = _rate(loader, args.steps, args.warmup, trainer.step)
            print(f"{key:28s} {results[key]:9.0f} img/s", flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{args.model}, batch {args.batch}, {gpu}")
    print("| row | images/s |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images_per_s": results}))


if __name__ == "__main__":
    main()
