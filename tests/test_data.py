"""Tests of the data layer: CIFAR-10 loading/checks, safe unpickling, download, loaders."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from mixq.data import (
    DATASETS,
    DataError,
    DatasetArrays,
    TensorLoader,
    download_cifar10,
    get_dataset,
    load_cifar10,
    load_digits_arrays,
    resolve_data_dir,
    safe_load_pickle,
    synthetic_arrays,
)
from mixq.data import cifar10 as cifar_mod
from mixq.data.download import safe_extract_tar

N_PER_BATCH = 10
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
TINY = (5 * N_PER_BATCH, N_PER_BATCH)


# ----------------------------------------------------------------------------- helpers


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: str as BINSTRING and
    ``numpy.core.multiarray`` globals (protocol 2)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING
        self.write(head + (b"" if n < 256 else struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def _save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = _save_bytes
    dispatch[str] = lambda self, obj: self._save_bytes(obj.encode("latin-1"))
    dispatch[type] = _save_global
    dispatch[type(np._core.multiarray._reconstruct)] = _save_global


def _batch(fname: str, n: int, *, official_label: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    label = cifar_mod.OFFICIAL_LABELS[fname] if official_label else f"{fname} (fake)"
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def make_cifar(
    root: Path,
    *,
    str_keys: bool = False,
    py2: bool = False,
    official_label: bool = False,
    overrides: dict | None = None,
) -> Path:
    """Write a tiny cifar-10-batches-py folder (N_PER_BATCH images per file) under root."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for k, fname in enumerate(FILES):
        batch = _batch(fname, N_PER_BATCH, official_label=official_label, seed=k)
        batch.update((overrides or {}).get(fname, {}))
        if str_keys:
            batch = {key.decode(): value for key, value in batch.items()}
        buf = io.BytesIO()
        (_Py2Pickler(buf, protocol=2) if py2 else pickle.Pickler(buf, protocol=4)).dump(batch)
        (folder / fname).write_bytes(buf.getvalue())
    meta = {b"label_names": [c.encode() for c in cifar_mod.CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize(("str_keys", "py2"), [(False, False), (True, False), (False, True)])
def test_load_valid_folder(tmp_path, str_keys, py2):
    folder = make_cifar(tmp_path, str_keys=str_keys, py2=py2)
    for root in (tmp_path, folder):
        ds = load_cifar10(root, expected_sizes=TINY)
        assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_train.dtype == torch.uint8
        assert ds.x_test.shape == (10, 3, 32, 32) and ds.y_test.dtype == torch.int64
        assert ds.y_train.shape == (50,) and ds.num_classes == 10
    first = _batch("data_batch_1", N_PER_BATCH, official_label=False, seed=0)
    # rows are R, G, B planes of 32x32, row-major
    assert ds.x_train[3, 1, 2, 5] == first[b"data"][3, 1024 + 2 * 32 + 5]
    assert ds.y_train[:N_PER_BATCH].tolist() == first[b"labels"]
    assert ds.classes == cifar_mod.CIFAR10_CLASSES


def test_missing_folder_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nowhere")
    msg = str(err.value)
    for part in ("nowhere", "cifar-10-batches-py", "--data-dir", "MIXQ_DATA", "download=True"):
        assert part in msg


def test_missing_file(tmp_path):
    (make_cifar(tmp_path) / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing: .*data_batch_3"):
        load_cifar10(tmp_path, expected_sizes=TINY)


def test_truncated_file(tmp_path):
    path = make_cifar(tmp_path) / "data_batch_2"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"data_batch_2.*truncated or corrupt"):
        load_cifar10(tmp_path, expected_sizes=TINY)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({b"data": np.zeros((N_PER_BATCH, 3072), np.float32)}, "uint8"),
        ({b"data": np.zeros((N_PER_BATCH, 100), np.uint8)}, "uint8 array"),
        ({b"labels": [0] * (N_PER_BATCH - 1)}, "one per"),
        ({b"labels": [0] * (N_PER_BATCH - 1) + [10]}, r"outside 0\.\.9"),
        ({b"labels": [-1] * N_PER_BATCH}, r"outside 0\.\.9"),
    ],
)
def test_malformed_batch(tmp_path, override, pattern):
    make_cifar(tmp_path, overrides={"test_batch": override})
    with pytest.raises(DataError, match=pattern) as err:
        load_cifar10(tmp_path, expected_sizes=TINY)
    assert "test_batch" in str(err.value)


def test_wrong_count(tmp_path):
    make_cifar(tmp_path)
    with pytest.raises(DataError, match="50 train / 10 test images, expected 50000 / 10000"):
        load_cifar10(tmp_path)
    assert load_cifar10(tmp_path, expected_sizes=None).x_train.shape[0] == 50


def test_md5_rule(tmp_path, monkeypatch):
    rebuilt = make_cifar(tmp_path / "rebuilt")  # labels say "(fake)": not claiming official
    load_cifar10(rebuilt, expected_sizes=TINY)  # auto: no md5 check
    with pytest.raises(DataError, match=r"md5 mismatch for .*data_batch_1"):
        load_cifar10(rebuilt, verify_md5=True, expected_sizes=TINY)
    claims = make_cifar(tmp_path / "claims", official_label=True)
    with pytest.raises(DataError, match="labelled as the official"):
        load_cifar10(claims, expected_sizes=TINY)
    load_cifar10(claims, verify_md5=False, expected_sizes=TINY)
    sums = {f: hashlib.md5((claims / f).read_bytes()).hexdigest() for f in FILES}
    monkeypatch.setattr(cifar_mod, "OFFICIAL_MD5", sums)
    load_cifar10(claims, expected_sizes=TINY)
    load_cifar10(claims, verify_md5=True, expected_sizes=TINY)


# ----------------------------------------------------------------------------- safe pickle


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_pickle_loads_numpy(protocol):
    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "n": np.int64(3), b"e": b""}
    out = safe_load_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    assert np.array_equal(out[b"data"], obj[b"data"]) and out["n"] == 3 and out[b"e"] == b""


@pytest.mark.parametrize(("func", "name"), [(print, "print"), (os.getcwd, "getcwd")])
@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_pickle_refuses_globals(func, name, protocol, capsys):
    payload = pickle.dumps({b"data": _Evil(func, "called")}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=rf"refused .*{name}"):
        safe_load_pickle(io.BytesIO(payload))
    assert capsys.readouterr().out == ""
    not_dict = pickle.dumps([1, 2])
    with pytest.raises(pickle.UnpicklingError, match="expected a pickled dict"):
        safe_load_pickle(io.BytesIO(not_dict))


def test_cifar_loader_refuses_crafted_file(tmp_path, capsys):
    folder = make_cifar(tmp_path)
    (folder / "data_batch_4").write_bytes(pickle.dumps({b"data": _Evil(print, "pwned")}))
    with pytest.raises(DataError, match=r"data_batch_4.*refused .*print"):
        load_cifar10(tmp_path, expected_sizes=TINY)
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- download


def _tarball(tmp_path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.mark.parametrize(
    ("members", "symlink"),
    [({"../evil": b"x"}, None), ({"/abs/evil": b"x"}, None), ({"ok/a": b"x"}, "ok/link")],
)
def test_safe_extract_rejects(tmp_path, members, symlink):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError, match="unsafe"):
        safe_extract_tar(_tarball(tmp_path, {"ok/first": b"1", **members}, symlink), dest)
    assert list(dest.iterdir()) == []  # nothing written, not even the safe member
    assert not (tmp_path / "evil").exists()


def test_download_network_failure(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(DataError, match=r"could not download .*no network.*cifar-10-batches-py"):
        download_cifar10(tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []  # temp files cleaned up


def test_download_from_file_url(tmp_path):
    src = make_cifar(tmp_path / "src")
    tar_path = tmp_path / "cifar.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    url, md5 = tar_path.as_uri(), hashlib.md5(tar_path.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="md5"):
        download_cifar10(tmp_path / "bad", url, md5="0" * 32)
    assert not (tmp_path / "bad" / "cifar-10-batches-py").exists()
    folder = download_cifar10(tmp_path / "good", url, md5=md5)
    assert folder == tmp_path / "good" / "cifar-10-batches-py"
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == ["cifar-10-batches-py"]
    assert load_cifar10(folder, expected_sizes=TINY).x_test.shape[0] == N_PER_BATCH
    assert download_cifar10(tmp_path / "good", "file:///nonexistent") == folder  # complete


# ----------------------------------------------------------------------------- data dir


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQ_DATA", str(tmp_path / "env"))
    assert resolve_data_dir("cli", "cfg") == Path("cli")
    assert resolve_data_dir(None, "cfg") == Path("cfg")
    assert resolve_data_dir("", None) == tmp_path / "env"
    monkeypatch.delenv("MIXQ_DATA")
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir(None, None)


# ----------------------------------------------------------------------------- TensorLoader


def _images(n: int = 12, size: int = 8, channels: int = 3) -> torch.Tensor:
    return torch.randint(
        0,
        256,
        (n, channels, size, size),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.uint8,
    )


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x * 0.5 + 0.5) * 255).to(torch.uint8)


def _epoch(loader: TensorLoader, epoch: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def test_loader_batches_and_normalisation():
    x = _images(10)
    x[0] = 0
    x[1] = 255
    loader = TensorLoader(x, torch.arange(10), 4, train=False, seed=0, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and xb.shape == (4, 3, 8, 8) and yb.dtype == torch.int64
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert xb[0].eq(-1).all() and xb[1].eq(1).all()
    full = torch.cat([b[0] for b in batches])
    assert full.min() >= -1 and full.max() <= 1
    assert torch.equal(_to_uint8(full), x) and torch.equal(
        torch.cat([b[1] for b in batches]), torch.arange(10)
    )
    custom = TensorLoader(
        x,
        torch.arange(10),
        10,
        train=False,
        mean=(0.0, 0.5, 1.0),
        std=(1.0, 0.5, 0.25),
        channels_last=False,
    )
    xc = next(iter(custom))[0]
    assert xc.is_contiguous() and torch.allclose(
        xc[1], torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 8, 8)
    )


def test_loader_drop_last_counts():
    x, y = _images(10), torch.arange(10)
    assert len(TensorLoader(x, y, 4, train=True, drop_last=True)) == 2
    assert len(list(TensorLoader(x, y, 4, train=True, drop_last=True))) == 2
    assert len(TensorLoader(x, y, 5, train=True, drop_last=True)) == 2
    assert len(TensorLoader(x, y, 4, train=True, drop_last=False)) == 3
    with pytest.raises(ValueError, match="no batches"):
        TensorLoader(x, y, 11, train=True, drop_last=True)


def test_loader_determinism_and_resume():
    x, y = _images(12), torch.arange(12)

    def make():
        return TensorLoader(x, y, 5, train=True, augment=True, seed=3)

    a, b = make(), make()
    e0, e1 = _epoch(a), _epoch(a)  # auto-advancing epochs 0, 1
    assert a.epoch == 2
    for (xa, ya), (xb, yb) in zip(e0, _epoch(b, 0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(e1, _epoch(b, 1), strict=True):  # resumed at epoch 1
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([t[1] for t in e0]), torch.cat([t[1] for t in e1]))
    other_seed = _epoch(TensorLoader(x, y, 5, train=True, augment=True, seed=4), 0)
    assert not torch.equal(torch.cat([t[1] for t in e0]), torch.cat([t[1] for t in other_seed]))
    assert sorted(torch.cat([t[1] for t in e1]).tolist()) == list(range(12))  # a permutation


def test_loader_flip_only_preserves_pixels():
    x = _images(32)
    loader = TensorLoader(x, torch.arange(32), 32, train=True, augment=True, crop_pad=0, seed=0)
    out, idx = next(iter(loader))
    out = _to_uint8(out)
    orig = x[idx]
    same = (out == orig).flatten(1).all(1)
    mirrored = (out == orig.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 32 and 0 < int(same.sum()) < 32
    assert torch.equal(out.flatten(1).sort(1).values, orig.flatten(1).sort(1).values)


def _mirrored_per_image(loader: TensorLoader, x: torch.Tensor, epoch: int) -> torch.Tensor:
    """Bool [N]: whether image i (label i) came out mirrored in ``epoch`` (no crop)."""
    out = torch.zeros(x.shape[0], dtype=torch.bool)
    for xb, idx in _epoch(loader, epoch):
        xb = _to_uint8(xb)
        same = (xb == x[idx]).flatten(1).all(1)
        mirrored = (xb == x[idx].flip(3)).flatten(1).all(1)
        assert bool((same ^ mirrored).all())  # asymmetric images: exactly one matches
        out[idx] = mirrored
    return out


def test_loader_alternating_flip_mirrors_each_image_every_other_epoch():
    """``flip_mode="alternating"``: per image, the flip of epoch e is the first epoch's XOR
    (e odd): epochs 0 and 1 are complementary, epoch 2 repeats epoch 0; about half the images
    are mirrored in each epoch; crops and order are the random mode's draws."""
    n = 64
    x = _images(n)
    y = torch.arange(n)
    alt = TensorLoader(
        x, y, 10, train=True, augment=True, crop_pad=0, seed=5, flip_mode="alternating"
    )
    f = [_mirrored_per_image(alt, x, e) for e in range(4)]
    assert torch.equal(f[1], ~f[0]) and torch.equal(f[2], f[0]) and torch.equal(f[3], f[1])
    assert 16 < int(f[0].sum()) < 48
    rnd = TensorLoader(x, y, 10, train=True, augment=True, crop_pad=0, seed=5)
    r = [_mirrored_per_image(rnd, x, e) for e in range(3)]
    assert not torch.equal(r[2], r[0]) and not torch.equal(r[1], ~r[0])  # random: no pattern
    for (_, ya), (_, yb) in zip(_epoch(alt, 3), _epoch(rnd, 3), strict=True):
        assert torch.equal(ya, yb)  # same shuffle
    with pytest.raises(ValueError, match="flip_mode must be one of"):
        TensorLoader(x, y, 10, train=True, flip_mode="sometimes")


def _shifts(out: torch.Tensor, x: torch.Tensor, pad: int) -> list[int]:
    """Per image of ``out`` (uint8 crops of ``x``): the smallest shift ``max(|dy|, |dx|)`` in
    pixels of a window of the ``pad``-padded original that equals it; fails if there is none."""
    size = x.shape[-1]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    shifts = []
    for i in range(x.shape[0]):
        found = [
            max(abs(dy - pad), abs(dx - pad))
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + size, dx : dx + size])
        ]
        assert found, f"image {i} is not a window of its {pad}-padded original"
        shifts.append(min(found))
    return shifts


def test_loader_crop_is_a_padded_window():
    x = _images(16, size=6, channels=2)
    loader = TensorLoader(
        x, torch.arange(16), 16, train=True, augment=True, flip=False, crop_pad=2, seed=1
    )
    out, idx = next(iter(loader))
    shifts = _shifts(_to_uint8(out), x[idx], 2)
    assert sum(s > 0 for s in shifts) > 8
    no_aug = next(iter(TensorLoader(x, torch.arange(16), 16, train=True, seed=1)))
    assert torch.equal(_to_uint8(no_aug[0]), x[no_aug[1]])  # augment=False: untouched


def test_config_crop_pad_reaches_the_training_loader():
    """``data.crop_pad`` sets the random crop's padding: with 1 every training image is
    shifted by at most one pixel (and some by exactly one); the default is the standard 4,
    under which shifts of more than one pixel occur; test images are never cropped."""
    from mixq.data.synthetic import synthetic_arrays
    from mixq.train.config import TrainConfig
    from mixq.train.ddp import DistContext
    from mixq.train.setup import build_loaders

    data = synthetic_arrays(64, 8, shape=(3, 16, 16))
    shifts = {}
    for pad in (1, None):
        d = {"name": "synthetic", "batch_size": 64, "flip": "random"}
        if pad is not None:
            d["crop_pad"] = pad
        cfg = TrainConfig.from_data({"data": d, "seed": 3})
        train, test = build_loaders(cfg, data, DistContext())
        assert train.crop_pad == (4 if pad is None else pad)
        train.flip = False
        xb, yb = next(iter(train))
        idx = train._epoch_params(0)["perm"][: xb.shape[0]].cpu()  # epoch 0's shuffle
        assert torch.equal(yb, data.y_train[idx])
        x = data.x_train[idx]
        shifts[pad] = max(_shifts(_to_uint8(xb), x, train.crop_pad))
        xt, _ = next(iter(test))
        assert torch.equal(_to_uint8(xt), data.x_test)  # evaluation: no crop
    assert shifts[1] == 1 and shifts[None] > 1


def test_crop_pad_errors_name_the_key():
    from mixq.config import ConfigError
    from mixq.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"data\.crop_pad=-1 must be >= 0"):
        TrainConfig.from_data({"data": {"crop_pad": -1}})
    with pytest.raises(ValueError, match=r"crop_pad=8 must be smaller than the \(8, 8\) images"):
        TensorLoader(_images(4), torch.arange(4), 4, train=True, augment=True, crop_pad=8)
    TensorLoader(_images(4), torch.arange(4), 4, train=False, crop_pad=8)  # no crop: no error


# ----------------------------------------------------------------------------- other datasets


def test_digits_loader():
    ds = load_digits_arrays()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.uint8 and int(ds.x_train.max()) == 255
    assert ds.y_train.dtype == torch.int64 and set(ds.y_test.tolist()) == set(range(10))
    assert int(ds.y_test.bincount().min()) >= 35  # stratified: ~36 per class
    assert torch.equal(load_digits_arrays().y_test, ds.y_test)  # fixed split
    loader = TensorLoader(ds.x_train, ds.y_train, 256, train=True, augment=False, seed=0)
    xb, _ = next(iter(loader))
    assert xb.shape == (256, 1, 8, 8) and xb.min() >= -1 and xb.max() <= 1


def test_digits_missing_sklearn(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"mixq\[digits\]"):
        load_digits_arrays()


def test_synthetic_deterministic_and_learnable():
    a = synthetic_arrays(200, 100, shape=(3, 8, 8), seed=5)
    b = synthetic_arrays(200, 100, shape=(3, 8, 8), seed=5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, synthetic_arrays(200, 100, shape=(3, 8, 8), seed=6).x_train)
    assert a.x_train.shape == (200, 3, 8, 8) and a.x_train.dtype == torch.uint8
    xtr, xte = a.x_train.flatten(1).float(), a.x_test.flatten(1).float()
    centroids = torch.stack([xtr[a.y_train == c].mean(0) for c in range(10)])
    acc = (torch.cdist(xte, centroids).argmin(1) == a.y_test).float().mean()
    assert acc > 0.9


def test_registry(tmp_path, monkeypatch):
    assert set(DATASETS) == {"cifar10", "digits", "synthetic", "imagefolder", "imagenet_shards"}
    ds = get_dataset("synthetic", n_train=20, n_test=10, shape=(3, 8, 8))
    assert isinstance(ds, DatasetArrays) and ds.input_shape == (3, 8, 8) and ds.name == "synthetic"
    make_cifar(tmp_path)
    assert get_dataset("CIFAR10", tmp_path, expected_sizes=TINY).x_train.shape[0] == 50
    monkeypatch.setenv("MIXQ_DATA", str(tmp_path))
    assert get_dataset("cifar10", expected_sizes=TINY).name == "cifar10"
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar'.*valid: .*did you mean 'cifar10'"
    ):
        get_dataset("cifar")
    with pytest.raises(ValueError, match="must be uint8"):
        DatasetArrays(
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.zeros(2, 3),
            torch.zeros(2),
            10,
            (3, 8, 8),
            "bad",
        )
