"""ImageNet data without torchvision: the ImageFolder loader, shards, errors, Table 4 presets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixq.cli import main
from mixq.cost import activation_bits, parse_size, weight_bits
from mixq.data import DataError, LoaderSpec
from mixq.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceLoader,
    ImageFolderDataset,
    centre_crop_transform,
    open_imagefolder,
    scan_imagefolder,
)
from mixq.data.sharding import GlobalBatchSampler
from mixq.data.shards import _TrainAugment, open_shards, prepare_shards, verify_shards
from mixq.models import smallcnn
from mixq.train.build import build_model
from mixq.train.config import TrainConfig
from mixq.train.presets import PRESETS
from mixq.train.trainer import fit

CPU = torch.device("cpu")


def make_folder(root: Path, classes: int = 3, n_train: int = 6, n_val: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(24, 44, 2))
                img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                ext = "png" if i == 0 else "jpg"  # a PNG too; and a grey JPEG below
                Image.fromarray(img).save(d / f"{i}.{ext}")
    Image.fromarray(np.full((30, 40), 90, np.uint8), "L").save(root / "val" / "c0" / "grey.jpg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards") / "s24"
    prepare_shards(folder, dst, 24, progress=False)
    return dst


def _loaders(data, **kw):
    args = {"batch_size": 4, "eval_batch_size": 5, "seed": 0, "device": CPU,
            "channels_last": True, **kw}  # fmt: skip
    return data.loaders(LoaderSpec(**args))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def test_scan_and_loader_shapes_dtypes_normalisation(folder):
    index = scan_imagefolder(folder)
    assert index.classes == ("c0", "c1", "c2")
    assert len(index.train) == 18 and len(index.val) == 10
    assert sorted({label for _, label in index.val}) == [0, 1, 2]
    data = open_imagefolder(folder, image_size=20)
    assert data.input_shape == (3, 20, 20) and data.num_classes == 3
    train, test = _loaders(data)
    assert len(train) == 18 // 4
    x, y = next(iter(train))
    assert x.shape == (4, 3, 20, 20) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    xs, ys = zip(*test, strict=True)
    assert sum(len(v) for v in ys) == 10  # every validation image once
    expected = torch.stack([centre_crop_transform(p, 23, 20) for p, _ in data.index.val])
    got = _unnormalise(torch.cat(xs))
    assert torch.allclose(got, expected.float(), atol=1e-3)
    assert torch.equal(torch.cat(ys), torch.tensor([lab for _, lab in data.index.val]))


def test_augmentation_is_seeded_by_epoch_not_by_workers(folder):
    data = open_imagefolder(folder, image_size=16)
    a, _ = _loaders(data, workers=0)
    b, _ = _loaders(data, workers=1)
    for loader in (a, b):
        loader.set_epoch(3)
    batches_a, batches_b = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], batches_a[0][0])


def test_shards_round_trip(folder, shards):
    index = verify_shards(shards)
    assert index["size"] == 24 and index["train_size"] == 27
    assert index["splits"]["val"]["count"] == 10
    assert index["splits"]["train"]["per_class"] == [6, 6, 6]
    x_val, x_train = np.load(shards / "val_x.npy"), np.load(shards / "train_x.npy")
    src = scan_imagefolder(folder)
    for i, (path, _) in enumerate(src.val):
        assert np.array_equal(x_val[i], centre_crop_transform(path, 27, 24).numpy())
    for i, (path, _) in enumerate(src.train):
        assert np.array_equal(x_train[i], centre_crop_transform(path, 27, 27).numpy())
    # the shard loader's test batches equal the image folder's, value for value
    sh = open_shards(shards)
    assert sh.input_shape == (3, 24, 24) and sh.classes == src.classes
    _, test_shards = _loaders(sh)
    _, test_folder = _loaders(open_imagefolder(folder, image_size=24))
    for (xa, ya), (xb, yb) in zip(test_shards, test_folder, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for rrc in (True, False):
        train, _ = _loaders(sh, random_resized_crop=rrc)
        x, y = next(iter(train))
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) > -3 and float(x.max()) < 3


def test_gpu_augmentation_geometry():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6).to(torch.uint8)
    sampler = GlobalBatchSampler(2, 2)
    aug = _TrainAugment(sampler, 2, stored=6, size=6, seed=0, rrc=True)
    aug._epoch = 0
    aug._params = {"box": torch.tensor([[0.0, 0, 6, 6]] * 2), "flip": torch.tensor([False, True])}
    out = aug(x, 0, 0)  # a whole-image box is the identity; flip mirrors
    assert torch.equal(out[0], x[0].float()) and torch.equal(out[1], x[1].flip(-1).float())
    crop = _TrainAugment(sampler, 2, stored=6, size=4, seed=0, rrc=False)
    crop._epoch = 0
    crop._params = {"dy": torch.tensor([1, 2]), "dx": torch.tensor([2, 0]),
                    "flip": torch.tensor([False, False])}  # fmt: skip
    out = crop(x, 0, 0)
    assert torch.equal(out[0], x[0, :, 1:5, 2:6]) and torch.equal(out[1], x[1, :, 2:6, 0:4])


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_imagefolder(tmp_path / "nothing")
    root = make_folder(tmp_path / "f", classes=2, n_train=2, n_val=1)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match="val"):
        scan_imagefolder(root)
    make_folder(tmp_path / "g", classes=2, n_train=2, n_val=1)
    root = tmp_path / "g"
    (root / "train" / "extra").mkdir()
    shutil.copy(root / "train" / "c0" / "1.jpg", root / "train" / "extra")
    with pytest.raises(DataError, match=r"different class folders.*extra"):
        scan_imagefolder(root)
    (root / "val" / "extra").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        scan_imagefolder(root)
    shutil.rmtree(root / "train" / "extra")
    shutil.rmtree(root / "val" / "extra")
    (root / "train" / "c1" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt"):
        scan_imagefolder(root)
    (root / "train" / "c1" / "notes.txt").unlink()
    bad = root / "train" / "c1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is no jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        prepare_shards(root, tmp_path / "s", 24, progress=False)
    assert open_imagefolder(root, image_size=16).num_classes == 2  # scanning does not decode
    with pytest.raises(DataError, match=r"broken\.jpg"):
        centre_crop_transform(str(bad), 18, 16)
    loader = DeviceLoader(ImageFolderDataset([(str(bad), 0)], 16, False), [[0]], device=CPU,
                          workers=1)  # fmt: skip
    with pytest.raises(DataError, match=r"broken\.jpg"):  # raised in a worker, file named
        list(loader)


def test_shard_errors(folder, shards, tmp_path):
    with pytest.raises(DataError, match=r"index\.json"):
        open_shards(folder)
    with pytest.raises(DataError, match=r"data\.image_size=32"):
        open_shards(shards, image_size=32)
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    np.save(copy / "val_y.npy", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="inconsistent"):
        open_shards(copy)
    shutil.copy(shards / "val_y.npy", copy / "val_y.npy")
    x = np.load(copy / "val_x.npy", mmap_mode="r+")
    x[0, 0, 0, 0] ^= 1
    x.flush()
    del x
    with pytest.raises(DataError, match="checksum"):
        verify_shards(copy)
    with pytest.raises(DataError, match="--overwrite"):
        prepare_shards(folder, shards, 24, progress=False)


def test_cli_prepare_and_train_on_shards_and_eval_only(folder, tmp_path, capsys):
    dst = tmp_path / "s160"
    argv = ["prepare-imagenet", str(folder), str(dst), "--size", "160", "--workers", "0"]
    assert main([*argv, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["val"] == 10
    assert main(["prepare-imagenet", "--verify", str(dst)]) == 0
    assert main([*argv, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    cfg = {
        "model": {"name": "smallcnn", "kwargs": {"in_channels": 3, "width": 4}},
        "data": {"name": "imagenet_shards", "dir": str(dst), "batch_size": 6,
                 "eval_batch_size": 8, "workers": 0, "random_resized_crop": False},
        "quant": {"input_shape": [3, 16, 16]}, "optim": {"epochs": 1}, "device": "cpu",
    }  # fmt: skip
    summary = fit(TrainConfig.from_data(cfg), tmp_path / "run", progress=False)
    assert summary["final"]["epoch"] == 1
    # eval_only: a float checkpoint (as torchvision's) evaluated without training
    torch.save(smallcnn(num_classes=3, in_channels=3, width=4).state_dict(), tmp_path / "f.pt")
    cfg.update(quant=None, eval_only=True, init=str(tmp_path / "f.pt"))
    cfg["data"] = {"name": "imagefolder", "dir": str(folder), "image_size": 16, "workers": 0,
                   "batch_size": 6}  # fmt: skip
    summary = fit(TrainConfig.from_data(cfg), tmp_path / "eval", progress=False)
    lines = (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0
    assert summary["final"]["test_acc"] == json.loads(lines[0])["test_acc"]


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_table4_presets(model):
    names = [n for n in PRESETS if n.startswith(f"imagenet/{model}/")]
    assert len(names) == 4
    for name in names:
        data = {**PRESETS[name], "init": "x.pt"}
        cfg = TrainConfig.from_data(data)
        assert cfg.data.name == "imagefolder" and cfg.optim.lr_reference_batch == 256
    learned = next(n for n in names if "/u3-" in n)
    cfg = TrainConfig.from_data({**PRESETS[learned], "init": None})
    assert cfg.budget.scale_lambda
    fixed = TrainConfig.from_data({**PRESETS[f"imagenet/{model}/fixed-w4a4"], "init": None})
    m = build_model(fixed, num_classes=1000, load_init=False)  # the homogeneous 4-bit sizes
    assert float(activation_bits(m, "max")) / 8 == parse_size(cfg.budget.activation_max)
    assert parse_size(cfg.budget.weight) < float(weight_bits(m)) / 8


def test_alternating_flip_is_refused_for_streaming_datasets(folder):
    """``data.flip=alternating`` exists for in-memory datasets only: a streaming dataset gets a
    clear error when the config is read, naming the key and the fix, not a silent random flip."""
    from mixq.config import ConfigError
    from mixq.train.ddp import DistContext
    from mixq.train.setup import build_loaders

    d = {"name": "imagefolder", "dir": str(folder), "batch_size": 4, "workers": 0}
    for name in ("imagefolder", "imagenet_shards"):
        with pytest.raises(ConfigError, match=r"data\.flip='alternating'.*data\.flip=random"):
            TrainConfig.from_data({"data": {**d, "name": name, "flip": "alternating"}})
    assert TrainConfig.from_data({"data": {"name": "cifar10", "flip": "alternating"}})
    for name in ("imagefolder", "imagenet_shards"):  # the same for the crop padding
        with pytest.raises(ConfigError, match=r"data\.crop_pad=2 works only with in-memory"):
            TrainConfig.from_data({"data": {**d, "name": name, "crop_pad": 2}})
    assert TrainConfig.from_data({"data": {"name": "cifar10", "crop_pad": 2}})
    ok = TrainConfig.from_data({"data": d})
    train, _ = build_loaders(ok, open_imagefolder(folder, image_size=16), DistContext())
    assert len(train) > 0
