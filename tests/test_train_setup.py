"""Tests for :mod:`mixq.train.setup`: the optimizer's parameter groups and weight decay."""

from __future__ import annotations

import pytest
import torch

from mixq.convert import quantizer_parameters
from mixq.train.build import build_model
from mixq.train.config import TrainConfig
from mixq.train.setup import build_optimizer

FLOAT = {
    "model": {"name": "resnet20"},
    "data": {"name": "synthetic"},
    "quant": None,
    "optim": {"lr": 0.1, "weight_decay": 0.5, "momentum": 0.0},
}


def _optimizer(quant: dict | None, *overrides: str):
    cfg = TrainConfig.from_data({**FLOAT, "quant": quant}, list(overrides))
    model = build_model(cfg, num_classes=10)
    return model, build_optimizer(cfg, model)


def _decay(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("quant", [None, {}])
def test_default_decays_every_model_parameter(quant):
    """The paper's recipe (decision 6): every model parameter decays, quantizer parameters get
    their decay in the quantizer step instead (group decay 0)."""
    model, opt = _optimizer(quant)
    decay, qp = _decay(opt), {id(p) for p in quantizer_parameters(model)}
    assert set(decay) == {id(p) for p in model.parameters()}
    for p in model.parameters():
        assert decay[id(p)] == (0.0 if id(p) in qp else 0.5)


@pytest.mark.parametrize("quant", [None, {}])
def test_no_decay_on_norm_and_bias(quant):
    """``optim.decay_norm_and_bias=false``: batch-norm scales/shifts and biases (ndim <= 1) get
    no decay; conv/linear weights keep it; every parameter is in exactly one group."""
    model, opt = _optimizer(quant, "optim.decay_norm_and_bias=false")
    qp = {id(p) for p in quantizer_parameters(model)}
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    decay = _decay(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for i, wd in decay.items() if wd == 0.0 and i not in qp}
    assert any(n.endswith("bn1.weight") for n in no_decay)
    assert any(n.endswith("fc.bias") for n in no_decay)
    assert all(p.ndim <= 1 for n, p in model.named_parameters() if n in no_decay)
    assert all(decay[id(p)] == 0.5 for p in model.parameters() if p.ndim > 1 and id(p) not in qp)


def test_no_decay_leaves_batch_norm_scale_unchanged_by_a_step():
    """With a zero gradient, one SGD step shrinks a decayed BN scale by ``lr * wd`` and leaves an
    undecayed one as it is."""
    for flag, expected in (("true", 1.0 - 0.1 * 0.5), ("false", 1.0)):
        model, opt = _optimizer(None, f"optim.decay_norm_and_bias={flag}")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(model.bn1.weight, torch.full((16,), expected))
