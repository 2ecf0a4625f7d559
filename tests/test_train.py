"""The main job: training, run directory, resume, model selection and CLI errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from mixq.cli import main
from mixq.config import ConfigError
from mixq.models import resnet20
from mixq.train.build import load_model
from mixq.train.checkpoint import CheckpointError, load_checkpoint
from mixq.train.config import TrainConfig
from mixq.train.presets import PRESETS, get_preset
from mixq.train.trainer import Trainer, fit

TINY = {
    "name": "tiny",
    "model": {"name": "smallcnn", "kwargs": {"in_channels": 3, "width": 8}},
    "data": {
        "name": "synthetic",
        "batch_size": 32,
        "eval_batch_size": 64,
        "synthetic_train": 128,
        "synthetic_test": 64,
    },
    "quant": {},
    "budget": {"weight": "2KB", "scale_lambda": True},
    "optim": {"lr": 0.05, "epochs": 3, "schedule": "cosine"},
}

RUN_FILES = [
    "config.yaml",
    "metrics.jsonl",
    "last.pt",
    "summary.json",
    "report.txt",
    "report.json",
    "report.csv",
    "report.png",
]


def _cfg(**over) -> TrainConfig:
    return TrainConfig.from_data(TINY, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    fit(_cfg(), run, progress=False)
    return run


def test_run_directory_has_every_file(tiny_run):
    for name in RUN_FILES:
        assert (tiny_run / name).is_file(), name
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    m = json.loads(lines[-1])
    for key in (
        "train_loss",
        "test_acc",
        "penalty",
        "weight_kib",
        "act_sum_kib",
        "act_max_kib",
        "mean_w_bits",
        "mean_a_bits",
        "images_per_s",
        "budget_met",
        "lr",
    ):
        assert key in m, key
    resolved = TrainConfig.load(tiny_run / "config.yaml")
    assert resolved == _cfg()


def test_cli_eval_report_presets(tiny_run, capsys):
    assert main(["eval", str(tiny_run / "last.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["acc"] <= 1 and out["weight_kib"] > 0
    assert main(["report", str(tiny_run / "last.pt"), "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "cifar10/resnet20/u3-w70kb-amax8kb" in listing
    assert main(["presets", "--show", "cifar10/resnet20/t1-p3-wa-float"]) == 0
    assert "pow2/qmin_qmax" in capsys.readouterr().out


def test_load_model_rebuilds_the_trained_model(tiny_run):
    model, ckpt = load_model(tiny_run / "last.pt")
    assert ckpt["epoch"] == 3
    x = torch.randint(0, 255, (4, 3, 32, 32)).float() / 127.5 - 1
    model2, _ = load_model(tiny_run / "last.pt")
    assert torch.equal(model(x), model2(x))


def test_resume_equals_uninterrupted(tmp_path, kill_at_epoch):
    cfg = _cfg()
    fit(cfg, tmp_path / "full", progress=False)
    kill_at_epoch(2, lambda: fit(cfg, tmp_path / "killed", progress=False))
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 2
    fit(cfg, tmp_path / "killed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(x).items() if k not in ("images_per_s", "epoch_time_s")}
        for x in (la[-1], lb[-1])
    ]
    assert strip[0] == strip[1]


def test_refuses_to_overwrite_and_to_resume_another_config(tiny_run):
    with pytest.raises(FileExistsError, match="--resume"):
        fit(_cfg(), tiny_run, progress=False)
    with pytest.raises(CheckpointError, match="config differs"):
        fit(_cfg(**{"optim.lr": 0.01}), tiny_run, resume=True, progress=False)


def test_cli_resume_from_the_run_directory_alone(tmp_path, kill_at_epoch, capsys):
    """``mixq train --resume --run-dir DIR`` continues with DIR/config.yaml (no --config)."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    argv = ["train", "--config", str(cfg_file), "--run-dir", str(run), "--no-progress"]
    kill_at_epoch(1, lambda: main([*argv, "--debug"]))  # --debug: Ctrl-C propagates (else 130)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    assert f"resumed with {run / 'config.yaml'}" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["epoch"] == TINY["optim"]["epochs"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == TINY["optim"]["epochs"]
    capsys.readouterr()
    assert main(["train", "--resume", "--no-progress"]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "none")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err


def test_cli_header_names_the_overrides():
    """A preset's description no longer tells the recipe once --set changes it: the header
    lists the overrides (and --init) after it, so a log says what really ran."""
    from mixq.cli import build_parser
    from mixq.cli.train import header, resolve_config

    argv = ["train", "--preset", "cifar10/resnet20/float-30ep", "--set", "data.batch_size=32",
            "--set", "optim.lr=0.025"]  # fmt: skip
    args = build_parser().parse_args(argv)
    cfg, name = resolve_config(args)
    lines = header(cfg, name, args)
    assert lines[0] == f"cifar10/resnet20/float-30ep: {cfg.description}"
    assert lines[1:] == ["  with --set data.batch_size=32 --set optim.lr=0.025"]
    args = build_parser().parse_args(["train", "--preset", "cifar10/resnet20/float-30ep"])
    assert header(*resolve_config(args), args) == lines[:1]
    args = build_parser().parse_args([*argv[:3], "--init", "f.pt"])
    assert header(*resolve_config(args), args)[1:] == ["  with --set init=f.pt"]


def test_budget_met_on_embedded_dataset(tmp_path):
    """A short run of the README's default on the digits: the kept model meets its budgets."""
    from mixq.cost import Budget
    from mixq.train.presets import DEFAULT_PRESET

    data = get_preset(DEFAULT_PRESET)
    cfg = TrainConfig.from_data(data, ["optim.epochs=6"])
    summary = fit(cfg, tmp_path, progress=False)
    assert summary["report_of"] == "best.pt"
    b = cfg.budget
    budget = Budget.parse(weight=b.weight, activation_max=b.activation_max)
    assert summary["best"]["weight_kib"] * 1024 <= budget.weight
    model, _ = load_model(tmp_path / "best.pt")
    assert all(budget.satisfied(model).values())
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep


def test_every_preset_validates():
    for _name, data in PRESETS.items():
        data = dict(data)
        if data.get("init") == "REQUIRED":
            data["init"] = "some/float.pt"
        TrainConfig.from_data(data)  # raises on any invalid field


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--preset", "cifar10/resnet20/u3-w70kb-amx8kb"], "Did you mean"),
        (["train", "--set", "optim.lrr=0.1"], "Did you mean 'lr'"),
        (["train", "--set", "optim.lr"], "expected key=value"),
        (["train", "--set", "optim.lr=fast"], "expected a number"),
        (["train", "--preset", "cifar10/resnet20/u3-w70kb"], "needs a float checkpoint"),
        (["train", "--set", "budget.weight=-3KB"], "must be a positive"),
        (["eval", "nonexistent.pt"], "not found"),
    ],
)
def test_cli_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_and_corrupt_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MIXQ_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "cifar10/resnet20/float", "--data-dir", str(tmp_path / "none")]
    assert main(argv) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    blob = pickle.dumps({b"data": b"x" * 1000, b"labels": [0] * 10}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(blob[: len(blob) // 2])  # truncated
    assert main(["train", "--preset", "cifar10/resnet20/float", "--data-dir", str(tmp_path)]) == 2
    assert "data_batch_1" in capsys.readouterr().err


def test_float_checkpoint_that_does_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(resnet20(num_classes=10).state_dict(), tmp_path / "r20.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(TINY))  # YAML is a superset of JSON
    assert main(["train", "--config", str(cfg), "--init", str(tmp_path / "r20.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "missing keys" in err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_config_rejects_unknown_keys_with_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'budget'"):
        TrainConfig.from_data({"budgte": {}})
    with pytest.raises(ConfigError, match="needs a quantized model"):
        TrainConfig.from_data({"quant": None, "budget": {"weight": "70KB"}})


def test_bn_recalibration_reestimates_running_statistics():
    """``bn_recalibrate``: the running mean becomes the average of the batch means of the BN
    input over that many training batches; the momentum is restored."""
    cfg = _cfg(bn_recalibrate=3)
    from mixq.data import get_dataset

    data = get_dataset("synthetic", None, n_train=128, n_test=64, seed=0)
    tr = Trainer(cfg, "unused", data, progress=False)
    bn = next(m for m in tr.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.fill_(100.0)
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].mean((0, 2, 3))))
    tr.recalibrate_bn()
    hook.remove()
    assert len(seen) == 3
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0))
    assert bn.momentum == 0.1
    no_recal = Trainer(_cfg(), "unused", data, progress=False)
    bn2 = next(m for m in no_recal.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn2.running_mean.fill_(100.0)
    no_recal.recalibrate_bn()
    assert (bn2.running_mean == 100.0).all()


def test_compiled_training_step_matches_eager(tmp_path):
    """``compile: true`` (torch.compile of forward/backward, penalty, quantizer updates) trains
    the same model as eager mode, up to float rounding, and really compiles those parts."""
    from torch._dynamo.utils import counters

    over = {"optim.epochs": 1, "max_steps_per_epoch": 3, "optim.weight_decay": 1e-3}
    fit(_cfg(**over), tmp_path / "eager", progress=False)
    before = counters["stats"]["unique_graphs"]
    fit(_cfg(**over, compile=True), tmp_path / "compiled", progress=False)
    assert counters["stats"]["unique_graphs"] - before >= 4  # fwd/bwd, penalty, before, after
    a = load_checkpoint(tmp_path / "eager" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)
    la = json.loads((tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()[-1])
    lb = json.loads((tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()[-1])
    assert lb["train_loss"] == pytest.approx(la["train_loss"], rel=1e-4)
    assert lb["weight_kib"] == la["weight_kib"] and lb["test_acc"] == la["test_acc"]
