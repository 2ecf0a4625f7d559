"""Build the model of a :class:`~mixq.train.config.TrainConfig`: create, load the float init,
quantize, and add the optional logit scale; rebuild the model of a checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mixq.convert import quantize_model
from mixq.layers import add_logit_scale
from mixq.models import create_model
from mixq.train.checkpoint import CheckpointError, load_checkpoint, load_weights, read_state_dict
from mixq.train.config import TrainConfig


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


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a mixq checkpoint (quantized as in its config) with its weights.

    Returns:
        ``(model, checkpoint)``; the model is in eval mode.
    """
    ckpt = load_checkpoint(path, map_location)
    for key in ("config", "model"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r} entry (a mapping): "
                                  "not a checkpoint written by mixq train")  # fmt: skip
    cfg = TrainConfig.from_data(ckpt["config"])
    model = build_model(
        cfg,
        input_shape=tuple(ckpt.get("input_shape") or ()) or None,
        num_classes=ckpt.get("num_classes"),
        load_init=False,
    )
    load_weights(model, ckpt["model"], str(path))
    model.eval()
    return model, ckpt
