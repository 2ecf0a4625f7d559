"""Build the model of a :class:`~mixq.run_config.TrainConfig`: create, load the float init,
quantize, and add the optional logit scale."""

from __future__ import annotations

import torch
from torch import nn

from mixq.checkpoint import load_weights, read_state_dict
from mixq.convert import quantize_model
from mixq.models import create_model
from mixq.run_config import TrainConfig


def _scale_logits(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * module.logit_scale


def add_logit_scale(model: nn.Module) -> nn.Module:
    """Register a learnable scalar ``logit_scale`` (init 1) that multiplies the model output.

    The reference code's ``scale_layer`` for pow-2 runs (spec 7.1); it is trained and weight
    decayed like every parameter.
    """
    model.register_parameter("logit_scale", nn.Parameter(torch.ones(())))
    model.register_forward_hook(_scale_logits)
    return model


def build_model(
    cfg: TrainConfig,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    load_init: bool = True,
) -> nn.Module:
    """Create ``cfg.model``; load ``cfg.init`` (float weights); quantize per ``cfg.quant``.

    Args:
        input_shape: per-sample input shape for the dry forward (default: the model's).
        num_classes: overrides ``cfg.model.num_classes`` (e.g. from the dataset).
        load_init: load the float checkpoint ``cfg.init`` before quantizing, so that the weight
            quantizers are initialised from the trained weights (spec 6).
    """
    n = cfg.model.num_classes or num_classes
    model = create_model(cfg.model.name, num_classes=n, **cfg.model.kwargs)
    model.mixq_arch = {"name": cfg.model.name, "kwargs": {"num_classes": n, **cfg.model.kwargs}}
    if input_shape is not None:
        model.default_input_shape = tuple(input_shape)
    if load_init and cfg.init:
        state = read_state_dict(cfg.init)
        state = {k: v for k, v in state.items() if k != "logit_scale"}
        load_weights(model, state, cfg.init)
    if cfg.quant is not None:
        quantize_model(model, cfg.quant)
    if cfg.logit_scale:
        add_logit_scale(model)
    return model
