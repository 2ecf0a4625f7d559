"""Data-parallel training: sharding, two gloo processes on the CPU, torchrun, exact resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mixq.config import ConfigError
from mixq.data import TensorLoader
from mixq.data.loader import RankTensorLoader
from mixq.data.sharding import GlobalBatchSampler, eval_batches
from mixq.models import smallcnn
from mixq.train import ddp as D
from mixq.train.build import load_model
from mixq.train.checkpoint import load_checkpoint
from mixq.train.config import TrainConfig

WORLD = 2


def make_imagefolder(root: Path, classes: int = 3, n_train: int = 8, n_val: int = 4) -> Path:
    """A tiny ImageFolder of JPEGs of several sizes, one dominant colour per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(28, 48, 2))
                img = rng.normal(0, 40, (h, w, 3))
                img[..., c] += 200
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    folder / f"img{i}.jpg", quality=90
                )
    return root


def tiny_config(data_dir: Path) -> dict:
    return {
        "name": "ddp",
        "model": {"name": "smallcnn", "kwargs": {"in_channels": 3, "width": 8}},
        "data": {"name": "imagefolder", "dir": str(data_dir), "batch_size": 4,
                 "eval_batch_size": 5, "workers": 0, "image_size": 16},
        "quant": {},
        "budget": {"weight": "1.5KB", "activation_max": "1KB"},
        "optim": {"lr": 0.05, "epochs": 2, "schedule": "cosine"},
        "device": "cpu",
        "select_every": 2,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- sharding (no process group needed) -----------------------------------------------------------


def test_global_batches_are_split_into_disjoint_rank_shards():
    samplers = [GlobalBatchSampler(23, 3, r, WORLD, seed=5) for r in range(WORLD)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert all(len(b) == 23 // 6 for b in per_rank)
    ref = GlobalBatchSampler(23, 3 * WORLD, 0, 1, seed=5)
    ref.set_epoch(2)
    for i, global_batch in enumerate(ref):
        assert per_rank[0][i] + per_rank[1][i] == global_batch
    seen = [i for b in per_rank for batch in b for i in batch]
    assert len(seen) == len(set(seen))
    with_seeds = GlobalBatchSampler(23, 3, 1, WORLD, seed=5, item_seeds=True)
    with_seeds.set_epoch(2)
    assert [[i for i, _ in b] for b in with_seeds] == per_rank[1]
    batches = [eval_batches(11, 4, r, 3) for r in range(3)]
    assert sorted(i for b in batches for batch in b for i in batch) == list(range(11))


def test_rank_tensor_loader_shards_the_single_process_batches():
    x = torch.randint(0, 255, (20, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(20)
    kw = {"train": True, "augment": True, "drop_last": True, "seed": 3}
    full = TensorLoader(x, y, 8, **kw)
    ranks = [RankTensorLoader(x, y, 4, rank=r, world=WORLD, **kw) for r in range(WORLD)]
    for loader in (full, *ranks):
        loader.set_epoch(1)
    for (xf, yf), (x0, y0), (x1, y1) in zip(full, *ranks, strict=True):
        assert torch.equal(torch.cat([x0, x1]), xf) and torch.equal(torch.cat([y0, y1]), yf)


def test_lr_scaling_is_opt_in_and_sync_bn_needs_cuda():
    cfg = TrainConfig.from_data({"data": {"batch_size": 64}, "optim": {"lr": 0.01}})
    assert D.scaled_lr(cfg, 8) == 0.01
    cfg = TrainConfig.from_data({"data": {"batch_size": 64}, "optim": {"lr_reference_batch": 256}})
    assert D.scaled_lr(cfg, 8) == pytest.approx(0.1 * 512 / 256)
    ctx = D.DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        D.wrap_model(smallcnn(in_channels=3), ctx, sync_bn=True)
    assert D.setup("cpu") == D.DistContext()  # no torchrun environment: a single process


# -- two processes ---------------------------------------------------------------------------------


def _worker(rank: int, port: int, cfg_data: dict, run_root: str, dump_dir: str) -> None:
    """One rank: a full run, a run killed after epoch 1, its resumption; dumps its state."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import mixq.train.trainer as T

    writes: list[str] = []
    for name in ("save_checkpoint", "atomic_write_bytes", "_write_rows"):
        original = getattr(T, name)

        def recording(path, *args, _original=original):
            writes.append(Path(path).name)
            return _original(path, *args)

        setattr(T, name, recording)
    record: dict = {}
    run, step, train_one_epoch = T.Trainer.run, T.Trainer.step, T.Trainer.train_one_epoch

    def run_and_keep(self):
        record["trainer"] = self
        return run(self)

    def step_and_record(self, x, y):
        loss, pen = step(self, x, y)
        record.setdefault("penalties", []).append(float(pen))
        return loss, pen

    T.Trainer.run, T.Trainer.step = run_and_keep, step_and_record
    cfg = TrainConfig.from_data(cfg_data)

    def dump(tag: str, summary: dict | None) -> None:
        tr = record.pop("trainer")
        torch.save({
            "state": {k: v.clone() for k, v in tr.model.state_dict().items()},
            "bits": [q.bitwidth for q in tr.quantizers],
            "penalties": record.pop("penalties", []),
            "writes": sorted(set(writes)), "summary": summary,
        }, Path(dump_dir) / f"{tag}_rank{rank}.pt")  # fmt: skip
        writes.clear()

    dump("full", T.fit(cfg, Path(run_root) / "full", progress=False))

    def killed(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return train_one_epoch(self)

    T.Trainer.train_one_epoch = killed
    try:
        T.fit(cfg, Path(run_root) / "killed", progress=False)
    except KeyboardInterrupt:
        dump("killed", None)
    T.Trainer.train_one_epoch = train_one_epoch
    dump("resumed", T.fit(cfg, Path(run_root) / "killed", resume=True, progress=False))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = make_imagefolder(root / "data")
    runs, dumps = root / "runs", root / "dumps"
    dumps.mkdir()
    args = (_free_port(), tiny_config(data), str(runs), str(dumps))
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    return runs, dumps


def _load(dumps: Path, tag: str) -> list[dict]:
    return [torch.load(dumps / f"{tag}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_hold_identical_quantizers_and_penalties(two_process_runs):
    _, dumps = two_process_runs
    for tag in ("full", "killed", "resumed"):
        r0, r1 = _load(dumps, tag)
        assert r0["state"].keys() == r1["state"].keys()
        for k, v in r0["state"].items():  # quantizer parameters, weights and BN buffers
            assert torch.equal(v, r1["state"][k]), (tag, k)
        assert r0["bits"] == r1["bits"]
        assert r0["penalties"] == r1["penalties"] and r0["penalties"]
    r0, _ = _load(dumps, "full")
    assert any(p > 0 for p in r0["penalties"])  # the budget was active
    assert r0["summary"]["world_size"] == WORLD


def test_only_rank_zero_writes(two_process_runs):
    runs, dumps = two_process_runs
    r0, r1 = _load(dumps, "full")
    assert r1["writes"] == []
    assert {"config.yaml", "last.pt", "metrics.jsonl", "summary.json", "report.txt"} <= set(
        r0["writes"]
    )
    lines = (runs / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    ckpt = load_checkpoint(runs / "full" / "last.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model
    assert ckpt["world_size"] == WORLD
    model, _ = load_model(runs / "full" / "last.pt")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_two_process_resume_equals_uninterrupted(two_process_runs):
    runs, dumps = two_process_runs
    full, resumed = _load(dumps, "full")[0], _load(dumps, "resumed")[0]
    for k, v in full["state"].items():
        assert torch.equal(v, resumed["state"][k]), k
    a = load_checkpoint(runs / "full" / "last.pt")
    b = load_checkpoint(runs / "killed" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    timing = ("images_per_s", "epoch_time_s")
    la, lb = ((runs / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "killed"))
    assert len(la) == len(lb) == 2
    for x, y in zip(la, lb, strict=True):
        x, y = json.loads(x), json.loads(y)
        assert {k: v for k, v in x.items() if k not in timing} == {
            k: v for k, v in y.items() if k not in timing
        }


def test_torchrun_cli(tmp_path):
    """``mixq train`` under ``torchrun --nproc_per_node 2`` (env://, gloo, destroy at the end)."""
    data = make_imagefolder(tmp_path / "data", n_train=4, n_val=2)
    cfg = tiny_config(data)
    cfg["optim"]["epochs"], cfg["select_every"] = 1, 0
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("no torchrun next to this Python")
    argv = [str(torchrun), "--standalone", "--nproc_per_node", str(WORLD), "-m", "mixq.cli",
            "train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run directory:" in out.stdout
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["test_acc"] <= 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["world_size"] == WORLD
