"""``optim.ema_decay``: the moving average of the model (closed form, checkpoints, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from mixq.cli import main
from mixq.config import ConfigError
from mixq.train.checkpoint import load_checkpoint
from mixq.train.config import TrainConfig
from mixq.train.ema import NoAverage
from mixq.train.trainer import Trainer, fit, load_data

FLOAT = {
    "name": "tiny-ema",
    "model": {"name": "smallcnn", "kwargs": {"in_channels": 3, "width": 8}},
    "data": {
        "name": "synthetic",
        "batch_size": 32,
        "eval_batch_size": 64,
        "synthetic_train": 128,
        "synthetic_test": 64,
    },
    "quant": None,
    "optim": {"lr": 0.05, "epochs": 3, "schedule": "cosine", "ema_decay": 0.9},
}


def _cfg(base: dict = FLOAT, **over) -> TrainConfig:
    return TrainConfig.from_data(base, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ConfigError, match=r"optim\.ema_decay"):
        _cfg(**{"optim.ema_decay": decay})


def test_average_matches_the_closed_form():
    """e_1 = w_1 (the first update copies), e_t = decay * e_{t-1} + (1 - decay) * w_t, for
    every parameter and floating batch-norm buffer, with w_t the weights after step t."""
    cfg = _cfg(**{"optim.ema_decay": 0.8})
    data = load_data(cfg, None)
    tr = Trainer(cfg, "unused", data, progress=False)
    tr.net.train()
    names = [k for k, v in tr.model.state_dict().items() if v.is_floating_point()]
    assert any("running_mean" in k for k in names)
    expected: dict[str, torch.Tensor] = {}
    for t, (x, y) in enumerate(tr.train_loader):
        if t == 4:
            break
        tr.step(x, y)
        w = tr.model.state_dict()
        for k in names:
            expected[k] = w[k].clone() if t == 0 else 0.8 * expected[k] + 0.2 * w[k]
    avg = tr.eval_model.state_dict()
    trained = tr.model.state_dict()
    for k in names:
        torch.testing.assert_close(avg[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(avg[k], trained[k]) for k in names)  # it is not a copy


def test_off_by_default_and_the_model_is_the_trained_one():
    cfg = _cfg(**{"optim.ema_decay": 0.0})
    tr = Trainer(cfg, "unused", load_data(cfg, None), progress=False)
    assert type(tr.average) is NoAverage and tr.eval_model is tr.model


@pytest.mark.parametrize("quant", [None, {}])
def test_checkpoint_model_is_the_average_and_is_what_was_evaluated(tmp_path, capsys, quant):
    """The logged accuracy and memory (bitwidths of the averaged quantizer parameters) are
    those of the checkpoint's ``model``, i.e. of the average."""
    run = tmp_path / "run"
    fit(_cfg({**FLOAT, "quant": quant}), run, progress=False)
    last = load_checkpoint(run / "last.pt")
    assert set(last["train_model"]) == set(last["model"])
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"])
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_acc_trained" in m
    capsys.readouterr()
    assert main(["eval", str(run / "last.pt"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["acc"] == pytest.approx(m["test_acc"], abs=1e-12)
    for k in ("weight_kib", "act_sum_kib", "mean_w_bits", "mean_a_bits"):
        assert ev[k] == pytest.approx(m[k], abs=1e-9), k


@pytest.mark.parametrize("quant", [None, {}])
def test_resume_equals_uninterrupted(tmp_path, kill_at_epoch, quant):
    """Both the trained weights and the average continue exactly (float and quantized)."""
    base = {**FLOAT, "quant": quant}
    cfg = _cfg(base)
    fit(cfg, tmp_path / "full", progress=False)
    kill_at_epoch(2, lambda: fit(cfg, tmp_path / "killed", progress=False))
    fit(cfg, tmp_path / "killed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["ema_n_averaged"] == b["ema_n_averaged"] == 3 * 4  # 3 epochs of 4 steps
    for key in ("model", "train_model"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
