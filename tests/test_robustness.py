"""Runs that cannot be corrupted (issue 19): the guarantees of docs/training.md, "Run folder
guarantees", one group each.

1. One writer per run folder (a lock; a second real process is refused, a dead one's lock
   is taken over).
2. A kill at any write boundary loses nothing: ``--resume`` completes the run exactly, one
   metrics row per epoch; leftover temp files are removed.
3. Resume is exact with the embedded default's own options (``bn_recalibrate``,
   ``select_every``) and with the moving average: every tensor and every metrics row.
4. Every numeric setting is validated when the config is read; no non-finite parameter
   reaches a checkpoint.
5. Every user-facing error is a message (``--debug``: the traceback), packed files and
   ``quantize_model`` fail cleanly.

Kept fast: the digits' small CNN or a tiny synthetic model, a few steps per epoch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from mixq.cli import MAX_MESSAGE, main
from mixq.config import ConfigError, QuantConfig, SiteConfig
from mixq.convert import quantize_model
from mixq.cost import Budget
from mixq.export import load_packed, save_packed
from mixq.export.errors import PackedFormatError
from mixq.layers import QuantAct
from mixq.models import smallcnn
from mixq.report import report
from mixq.train import faults
from mixq.train.checkpoint import load_checkpoint, save_checkpoint
from mixq.train.config import TrainConfig
from mixq.train.presets import DEFAULT_PRESET, get_preset
from mixq.train.runlock import RunLock, RunLockedError
from mixq.train.trainer import NonFiniteError, Trainer, fit

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: The embedded default (README), shortened: 3 epochs of 8 steps (lr 0.2, so that it learns),
#: its own select_every and bn_recalibrate, budgets loose enough that best.pt is written from
#: the first selection.
SHORT_DEFAULT = [
    "optim.epochs=3", "max_steps_per_epoch=8", "select_every=2", "data.eval_batch_size=512",
    "optim.lr=0.2",
    "budget.weight=20KB", "budget.activation_max=2KB",
]  # fmt: skip
TIMING = {"images_per_s", "epoch_time_s"}  # wall-clock numbers: the only ones that may differ


def _default_cfg(*extra: str) -> TrainConfig:
    return TrainConfig.from_data(get_preset(DEFAULT_PRESET), SHORT_DEFAULT + list(extra))


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same(a, b, where: str = "") -> None:
    """Every tensor and value equal (timing fields excepted), recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = set(a) - TIMING
        assert keys == set(b) - TIMING, (where, keys ^ (set(b) - TIMING))
        for k in keys:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _same_run(run: Path, ref: Path) -> None:
    """The run folder ``run`` holds exactly the uninterrupted run ``ref``."""
    assert _rows(run) == _rows(ref)
    for name in ("last.pt", "best.pt"):
        _same(load_checkpoint(run / name), load_checkpoint(ref / name), name)
    s, r = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    _same(s, r, "summary")
    assert (run / "report.txt").read_text() == (ref / "report.txt").read_text()
    assert not list(run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted shortened embedded default."""
    run = tmp_path_factory.mktemp("reference")
    fit(_default_cfg(), run, progress=False)
    return run


# ------------------------------------------------------------ 1. one writer per run folder


def _holder(run: Path, mode: str) -> subprocess.Popen:
    """A real second process that takes the run folder's lock, then sleeps ("hold") or dies
    without releasing anything ("die": os._exit, as a kill)."""
    code = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {SRC!r})\n"
        "from mixq.train.runlock import RunLock\n"
        f"RunLock({str(run)!r}).acquire()\n"
        "print('locked', flush=True)\n"
        + ("time.sleep(120)\n" if mode == "hold" else "os._exit(9)\n")
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_on_the_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run, "hold")
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on .*started"):
            fit(_default_cfg(), run, progress=False)
        assert time.perf_counter() - t0 < 5  # at once, not after a wait
        for extra in ([], ["--resume"]):  # a new run and a resume alike
            assert main([*_train(run), "--preset", DEFAULT_PRESET, *extra]) == 2
            assert f"pid {holder.pid}" in capsys.readouterr().err
        assert not (run / "metrics.jsonl").exists()  # nothing was written by the refused one
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    dead = _holder(run, "die")
    dead.wait()
    with RunLock(run) as lock:  # the kernel released the dead process's flock
        assert lock.previous["pid"] == dead.pid  # what it had recorded, now replaced
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # held again, by us
    RunLock(run).acquire().release()  # and free after release


# ----------------------------------------------------- 2. a kill at any boundary loses nothing

#: (boundary, occurrence): mid-epoch step, every write of an epoch, the final writes.
BOUNDARIES = ["step@11", "best.pt@2", "last.pt@2", "metrics@2", "last.pt@3", "report", "summary"]


@pytest.mark.parametrize("where", BOUNDARIES)
def test_a_kill_at_each_boundary_then_resume_is_the_uninterrupted_run(
    where, reference, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, f"after:{where}")
    with pytest.raises(faults.InjectedFault):
        fit(_default_cfg(), run, progress=False)
    monkeypatch.delenv(faults.ENV)
    (run / ".last.pt.leftover.tmp").write_bytes(b"half a checkpoint")  # a killed atomic write
    fit(_default_cfg(), run, resume=True, progress=False)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # exactly one row per epoch
    _same_run(run, reference)


def test_a_real_kill_after_last_pt_loses_no_metrics_row(reference, tmp_path):
    """``os._exit`` (no cleanup at all) between last.pt and metrics.jsonl, in a real process;
    the CLI's ``--resume`` from the folder alone completes it."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mixq.cli", "train", "--run-dir", str(run), "--no-progress"]
    cmd += [a for s in SHORT_DEFAULT for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
           faults.ENV: "after:last.pt@2:exit"}  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == faults.FAULT_EXIT, p.stderr
    assert len(_rows(run)) == 1  # the file lags behind last.pt (epoch 2)
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    _same_run(run, reference)


# ------------------------------------------------------ 3. exact resume with every option


@pytest.mark.parametrize("extra", [
    ["optim.ema_decay=0.9"], ["compile=true"], ["bn_recalibrate=0", "select_every=0"],
], ids=["ema", "compile", "no-options"])  # fmt: skip
def test_resume_is_exact_with_the_moving_average_compile_and_without_the_options(
    extra, tmp_path, monkeypatch
):
    ref, run = tmp_path / "ref", tmp_path / "run"
    fit(_default_cfg(*extra), ref, progress=False)
    monkeypatch.setenv(faults.ENV, "after:step@13")
    with pytest.raises(faults.InjectedFault):
        fit(_default_cfg(*extra), run, progress=False)
    monkeypatch.delenv(faults.ENV)
    try:
        fit(_default_cfg(*extra), run, resume=True, progress=False)
        _same_run(run, ref)
    finally:
        torch._dynamo.reset()  # compile: later tests count their own new graphs


def test_recalibration_batches_do_not_depend_on_earlier_calls():
    """The cause of the inexact resume: the statistics are a function of the model alone."""
    cfg = _default_cfg()
    from mixq.train.trainer import load_data

    tr = Trainer(cfg, "unused", load_data(cfg), progress=False)
    tr.recalibrate_bn()
    first = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k}
    assert first
    for _ in range(3):
        tr.recalibrate_bn()
    _same(first, {k: v for k, v in tr.model.state_dict().items() if "running" in k})


# ------------------------------------------------ 4. validation; no non-finite checkpoint

BAD_SETTINGS = {
    "optim.lr=.inf": r"optim.lr=inf must be a finite number in \(0, inf\)",
    "optim.lr=.nan": "optim.lr=nan must be a finite number",
    "optim.weight_decay=.nan": r"optim.weight_decay=nan .* \[0, inf\)",
    "optim.momentum=.nan": r"optim.momentum=nan .* \[0, 1\)",
    "optim.momentum=1.5": r"\[0, 1\)",
    "optim.gamma=0": r"optim.gamma=0.0 .* \(0, inf\)",
    "optim.pct_start=1": r"\(0, 1\)",
    "optim.label_smoothing=1": r"\[0, 1\)",
    "optim.milestones=[.nan]": r"optim.milestones\[0\]",
    "budget.lam=.nan": r"budget.lam=nan .* \[0, inf\)",
    "budget.lam=.inf": "budget.lam=inf",
    "budget.lam=-1": "budget.lam=-1.0",
    "max_steps_per_epoch=-1": "max_steps_per_epoch=-1 must be >= 1",
    "max_steps_per_epoch=0": "or null: the whole epoch",
    "bn_recalibrate=-1": "bn_recalibrate=-1 must be >= 0",
    "select_every=-2": "select_every=-2 must be >= 0",
    "model.num_classes=0": "model.num_classes=0 must be >= 1",
    "data.synthetic_train=0": "data.synthetic_train=0",
    "seed=-1": "seed=-1",
    "quant.weight.bounds={d_min: .nan}": "d_min=nan",
    "quant.input_shape=[0, 8, 8]": "input_shape",
}


@pytest.mark.parametrize("override", sorted(BAD_SETTINGS))
def test_bad_numeric_settings_are_refused_when_the_config_is_read(override):
    with pytest.raises(ConfigError, match=BAD_SETTINGS[override]):
        TrainConfig.from_data(get_preset(DEFAULT_PRESET), [override])


@pytest.mark.parametrize("override,match", [
    ("data.augment=true", "at least 16 px; digits images are 8x8: set data.augment=false"),
])  # fmt: skip
def test_augmentation_that_cannot_apply_is_an_error(override, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        fit(_default_cfg(override, "data.crop_pad=100"), tmp_path / "r", progress=False)


def test_crop_pad_larger_than_the_image_is_an_error(tmp_path):
    cfg = TrainConfig.from_data(
        {"model": {"name": "smallcnn", "kwargs": {"in_channels": 3, "width": 4}},
         "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32,
                  "batch_size": 32, "crop_pad": 32}, "optim": {"epochs": 1}},
    )
    with pytest.raises(ValueError, match=r"data\.crop_pad=32 must be smaller than the 32 px"):
        fit(cfg, tmp_path / "r", progress=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"weight": 0}, "positive"), ({"weight": 0.0}, "positive"), ({"weight": False}, "size"),
    ({"activation_max": ""}, "cannot parse"), ({"lam": -1}, r"\[0, inf\)"),
    ({"lam": math.nan}, "finite"), ({"lam": math.inf}, "finite"), ({"lam": "0.1"}, "number"),
])  # fmt: skip
def test_budget_parse_has_the_clis_rules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget.parse(**({"weight": "6KB"} | kwargs))


def test_budget_and_quant_config_validate_directly():
    with pytest.raises(ValueError, match="positive, finite"):
        Budget(weight=math.inf)
    with pytest.raises(ValueError, match="lam"):
        Budget(weight=100.0, lam=math.nan)
    with pytest.raises(ConfigError, match=r"bits=0 must be in \[1, 16\]"):
        QuantConfig(weight=SiteConfig(bits=0))
    assert Budget.parse(weight=None).active is False  # None alone means "no constraint"


def test_a_non_finite_step_stops_the_run_and_checkpoints_keep_the_finite_state(
    tmp_path, monkeypatch
):
    """A NaN in epoch 2 step 3: the run stops naming them; last.pt/best.pt are epoch 1's."""
    step = Trainer.step

    def poisoned(self, x, y):
        loss, pen = step(self, x, y)
        if self.epoch == 1 and self.sched.last_epoch == 8 + 3:  # epoch 2, its 3rd step
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.nan)
            loss = loss * math.nan
        return loss, pen

    monkeypatch.setattr(Trainer, "step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="non-finite at epoch 2 step 3"):
        # fixed lambda, no freeze: best.pt is eligible from epoch 1 (under the default's dual
        # mode it is only after the freeze, past the poisoned step)
        fit(_default_cfg("budget.mode=fixed", "budget.freeze_at=null"), run, progress=False)
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / name)
        assert ckpt["epoch"] <= 1
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(_rows(run)) == 1
    rc = main(["train", "--resume", "--run-dir", str(run), "--no-progress"])  # clean message
    assert rc == 2


# ------------------------------------------------------- 5. every error is a message


def _err(capsys, argv: list[str], rc: int = 2) -> str:
    assert main(argv) == rc
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err) < MAX_MESSAGE + 200, err[:500]
    return err


def _train(run: Path, *sets: str) -> list[str]:
    return ["train", "--run-dir", str(run), "--no-progress", *[a for s in (*SHORT_DEFAULT, *sets)
                                                               for a in ("--set", s)]]  # fmt: skip


def test_run_folder_that_is_a_file_or_read_only(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "the run directory is an existing file" in _err(capsys, _train(f))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anyway: another OSError on the same path
            os.chmod(ro, 0o700)
            (ro / ".lock").mkdir()  # open(".lock", O_RDWR) fails: EISDIR
            assert "Is a directory" in _err(capsys, _train(ro))
        else:
            assert "Permission denied" in _err(capsys, _train(ro))
    finally:
        ro.chmod(0o700)


def test_a_full_disk_is_a_message_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 3:  # config.yaml, metrics, ... written; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    err = _err(capsys, _train(run))
    assert "No space left on device" in err and "--resume" in err
    assert not list(run.glob(".*.tmp"))


def test_ctrl_c_is_a_message_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupt(self, x, y):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", interrupt)
    assert "interrupted" in _err(capsys, _train(tmp_path / "run"), rc=130)
    RunLock(tmp_path / "run").acquire().release()  # the lock went with it


def test_debug_keeps_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main([*_train(tmp_path / "r", "optim.lr=.nan"), "--debug"])


def test_cuda_without_cuda_unknown_kwargs_yaml_errors(tmp_path, capsys):
    if torch.cuda.is_available():
        assert "visible" in _err(capsys, _train(tmp_path / "b", "device=cuda:99"))
    else:
        for device in ("cuda", "cuda:1"):
            err = _err(capsys, _train(tmp_path / "a", f"device={device}"))
            assert "CUDA is not available" in err
    err = _err(capsys, _train(tmp_path / "c", "model.kwargs={depth: 3}"))
    assert "takes no argument(s) ['depth']" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid (safe) YAML" in _err(capsys, ["train", "--config", str(bad)])
    tag = tmp_path / "tag.yaml"
    tag.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    assert "not valid (safe) YAML" in _err(capsys, ["train", "--config", str(tag)])
    assert not Path("pwned").exists()
    bomb = tmp_path / "bomb.yaml"  # 10 levels of 9 aliases: 3.5e9 items when expanded
    lines = ["description:", "  - &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\n")
    assert "description: expected a string" in _err(capsys, ["train", "--config", str(bomb)])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny")
    cfg = _default_cfg("optim.epochs=1", "select_every=0", "budget.freeze_at=null")
    fit(cfg, run, progress=False)
    return run / "last.pt"


def test_malformed_checkpoints_and_export_paths(tiny_ckpt, tmp_path, capsys):
    ckpt = load_checkpoint(tiny_ckpt)
    for key in ("config", "model"):
        bad = tmp_path / f"no-{key}.pt"
        save_checkpoint(bad, {k: v for k, v in ckpt.items() if k not in (key, "format",
                                                                         "version")})  # fmt: skip
        assert f"no '{key}' entry" in _err(capsys, ["export", str(bad), "-o", str(tmp_path / "o")])
        assert f"no '{key}' entry" in _err(capsys, ["eval", str(bad)])
    before = tiny_ckpt.read_bytes()
    assert "is the input checkpoint" in _err(capsys, ["export", str(tiny_ckpt), "-o",
                                                      str(tiny_ckpt)])  # fmt: skip
    assert tiny_ckpt.read_bytes() == before
    assert "is a directory" in _err(capsys, ["export", str(tiny_ckpt), "-o", str(tmp_path)])


def _packed_with(path: Path, src: Path, edit) -> Path:
    """``src`` with its manifest edited by ``edit(manifest)`` (checksum kept valid)."""
    data = src.read_bytes()
    head = struct.Struct("<8sIIQ")
    magic, version, flags, mlen = head.unpack_from(data)
    manifest = json.loads(zlib.decompress(data[head.size : head.size + mlen]))
    edit(manifest)
    blob = zlib.compress(json.dumps(manifest).encode())
    path.write_bytes(head.pack(magic, version, flags, len(blob)) + blob
                     + data[head.size + mlen :])  # fmt: skip
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    m = quantize_model(smallcnn(), QuantConfig(), example_input=torch.zeros(1, 1, 8, 8))
    m.mixq_arch = {"name": "smallcnn", "kwargs": {}}
    path = tmp_path_factory.mktemp("packed") / "m.mixq"
    save_packed(m, path)
    assert load_packed(path) is not None
    return path


def _first(m, **kv):
    m["tensors"][0].update(kv)


@pytest.mark.parametrize("edit", [
    lambda m: _first(m, shape="abc"),
    lambda m: _first(m, shape=[2**40, 2**40]),
    lambda m: _first(m, offset=-5),
    lambda m: _first(m, bits="x"),
    lambda m: _first(m, dtype="object", storage="raw"),
    lambda m: m.update(tensors=[1, 2]),
    lambda m: m.update(arch={"name": "smallcnn", "kwargs": {"width": 2**22}}),
    lambda m: m.update(arch={"name": "smallcnn", "kwargs": {"bogus": 1}}),
    lambda m: m.update(arch="smallcnn"),
    lambda m: m.update(activations=[{"module": "features"}]),
], ids=["shape-type", "huge-shape", "offset", "bits", "dtype", "tensor-list", "huge-width",
        "bad-kwarg", "arch-type", "activation"])  # fmt: skip
def test_load_packed_malformed_manifests_are_one_error_family(packed, tmp_path, edit):
    bad = _packed_with(tmp_path / "bad.mixq", packed, edit)
    with pytest.raises(PackedFormatError):
        load_packed(bad)


def test_load_packed_bounds_decompression(packed, tmp_path):
    data = packed.read_bytes()
    head = struct.Struct("<8sIIQ")
    magic, version, flags, _ = head.unpack_from(data)
    bomb = zlib.compress(b" " * (100 * 1024**2), 9)  # 100 MB of spaces in ~100 KB
    (tmp_path / "bomb.mixq").write_bytes(head.pack(magic, version, flags, len(bomb)) + bomb)
    with pytest.raises(PackedFormatError, match="decompressed"):
        load_packed(tmp_path / "bomb.mixq")


def test_a_failed_quantize_model_leaves_the_model_as_it_was(monkeypatch):
    import mixq.convert as C

    m = smallcnn()
    before = {n: type(x) for n, x in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def fail(*a, **k):
        raise RuntimeError("dry forward failed")

    monkeypatch.setattr(C, "record_sizes", fail)  # the last step: everything is converted
    with pytest.raises(RuntimeError, match="dry forward failed"):
        quantize_model(m, example_input=torch.zeros(1, 1, 8, 8))
    assert {n: type(x) for n, x in m.named_modules()} == before
    _same(state, m.state_dict())
    assert "mixq_site_config" not in m.__dict__
    monkeypatch.undo()
    quantize_model(m, example_input=torch.zeros(1, 1, 8, 8))  # a retry works
    assert any(isinstance(x, QuantAct) for x in m.modules())


def test_a_float_models_activation_budget_is_not_met():
    rep = report(smallcnn(), Budget.parse(weight="100KB", activation_max="1KB"))
    rows = {b.constraint: b.met for b in rep.budget}
    assert rows == {"weight": True, "activation_max": False}
    assert "no activation sites" in rep.to_text()
