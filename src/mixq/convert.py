"""Model surgery: ``quantize_model`` swaps layers for quantized ones, ``to_float`` reverses it.

Conversion is a module swap driven by the ``QUANT_LAYERS`` / ``ACTIVATIONS`` mappings and fnmatch
patterns on fully-qualified module names; the quantized layers *share* the float Parameters.
One dry forward (in eval mode, no gradient) records the per-sample element count of every
activation site and the output size of every layer, which the memory model and the MAC counts
need (spec 5.1, 5.2).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

import torch
from torch import nn

from mixq.config import ConfigError, LayerOverride, QuantConfig, SiteConfig
from mixq.layers import ACTIVATIONS, QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear
from mixq.quant.base import Quantizer
from mixq.quant.registry import make_quantizer

QUANTIZED_LAYERS = (QuantConv2d, QuantLinear)


def _build(site: SiteConfig, signed: bool) -> Quantizer | None:
    if site.is_float:
        return None
    kwargs = dict(site.bounds)
    if site.quantizer.startswith("uniform/"):
        kwargs["pow2_step"] = site.pow2_step
    q = make_quantizer(site.quantizer, signed=signed, learnable=site.learnable, **kwargs)
    q.reset_parameters(b=site.bits)
    return q


def _site(cfg: QuantConfig, name: str, which: str) -> SiteConfig:
    """The effective site config of module ``name``: global, then matching overrides.

    A bias without a config of its own (``QuantConfig.bias`` None) follows its layer's weight
    config, overrides included (decision 4); an explicit global ``bias`` is kept unless an
    override sets ``bias`` itself.
    """
    follow_weight = which == "bias" and cfg.bias is None
    base = cfg.weight if follow_weight else getattr(cfg, which)
    for ov in cfg.overrides:
        if fnmatch.fnmatchcase(name, ov.pattern):
            chosen = getattr(ov, which)
            if follow_weight and chosen is None:
                chosen = ov.weight
            base = chosen or base
    return base


def _check_patterns(cfg: QuantConfig, names: list[str]) -> None:
    patterns = list(cfg.exclude) + [ov.pattern for ov in cfg.overrides]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ConfigError(
                f"pattern {p!r} matches no quantizable layer; layer names are e.g. "
                f"{names[:6]} (see mixq.report or model.named_modules())"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Give every conv/linear weight and bias and every ReLU/ReLU6 output a learned quantizer.

    Replaces, in place, each ``nn.Conv2d`` (grouped and depthwise too) and ``nn.Linear`` by a
    ``QuantConv2d`` / ``QuantLinear`` sharing its Parameters, and each ``nn.ReLU`` /
    ``nn.ReLU6`` by a ``QuantAct`` (an unsigned quantizer that is the ReLU, decision 5).
    Weight quantizers start from the float weights (spec 6) unless configured otherwise.

    Args:
        model: a float model. Its conv, linear and activation modules must be distinct
            module instances (a reused ``nn.ReLU`` is one site).
        config: a :class:`~mixq.config.QuantConfig`; None gives the paper's default.
        example_input: one batch for the dry forward; default ``zeros(1, *input_shape)``
            from the config or the model's ``default_input_shape``.

    Returns:
        The same ``model``, converted.

    Example:
        >>> from mixq.models import resnet20
        >>> m = quantize_model(resnet20())
        >>> sum(1 for _ in quantizers(m))
        40
    """
    cfg = config or QuantConfig()
    # Checked first: a fully converted model has no plain nn.Conv2d / nn.Linear left, and the
    # "no quantizable layer" error below would hide the real cause.
    if any(isinstance(m, (*QUANTIZED_LAYERS, QuantAct)) for m in model.modules()):
        raise ValueError("model is already quantized; call mixq.to_float(model) first")
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in QUANT_LAYERS or type(m) in ACTIVATIONS
    ]
    if not any(type(m) in QUANT_LAYERS for _, m in candidates):
        raise ValueError(
            "model has no quantizable layer (nn.Conv2d or nn.Linear); nothing to quantize"
        )
    _check_patterns(cfg, [n for n, _ in candidates])
    for name, mod in candidates:
        excluded = any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude)
        if type(mod) in ACTIVATIONS:
            site = _site(cfg, name, "activation")
            q = None if excluded else _build(site, signed=False)
            _replace(model, name, QuantAct(q, cap=ACTIVATIONS[type(mod)]))
            continue
        if excluded:
            continue
        wq = _build(_site(cfg, name, "weight"), signed=True)
        bq = _build(_site(cfg, name, "bias"), signed=True) if mod.bias is not None else None
        if cfg.init_from_weights:
            for q, site in ((wq, "weight"), (bq, "bias")):
                if q is not None:
                    q.init_from_tensor(mod.weight, b=_site(cfg, name, site).bits)
        for q in (wq, bq):
            if q is not None:
                q.to(mod.weight.device)
        _replace(model, name, QUANT_LAYERS[type(mod)].from_float(mod, wq, bq))
    device = next(model.parameters()).device
    for m in model.modules():
        if isinstance(m, QuantAct) and m.quantizer is not None:
            m.quantizer.to(device)
    record_sizes(model, example_input, cfg.input_shape)
    return model


@torch.no_grad()
def record_sizes(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Dry forward: store ``numel`` on every quantizer and ``out_shape`` on every layer."""
    if example_input is None:
        shape = input_shape or getattr(model, "default_input_shape", None)
        if shape is None:
            raise ValueError(
                "cannot infer the input shape for the dry forward: pass example_input=... or "
                "set QuantConfig.input_shape (per-sample shape, e.g. (3, 32, 32))"
            )
        p = next(model.parameters())
        example_input = torch.zeros(1, *shape, device=p.device, dtype=p.dtype)
    hooks = []

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        mod.out_shape = tuple(out.shape[1:])
        if isinstance(mod, QuantAct):
            mod.numel = out[0].numel()
            if mod.quantizer is not None:
                mod.quantizer.numel = mod.numel

    for m in model.modules():
        if isinstance(m, (*QUANTIZED_LAYERS, QuantAct, nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
            if isinstance(m, QUANTIZED_LAYERS):
                if m.weight_quantizer is not None:
                    m.weight_quantizer.numel = m.weight.numel()
                if m.bias_quantizer is not None:
                    m.bias_quantizer.numel = m.bias.numel()
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    missing = [n for n, m in model.named_modules() if isinstance(m, QuantAct) and m.numel is None]
    if missing:
        raise ValueError(f"activation sites not reached by the dry forward: {missing}")


def to_float(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model` in place: the original layer types, same Parameters."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (*QUANTIZED_LAYERS, QuantAct)):
            _replace(model, name, mod.to_float())
    return model


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """``(name, quantizer)`` for every quantizer in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of all quantizers (``b``, ``d``, ``q_min``, ``q_max``)."""
    return [p for _, q in quantizers(model) for p in q.parameters() if p.requires_grad]


__all__ = [
    "LayerOverride",
    "QuantConfig",
    "SiteConfig",
    "quantize_model",
    "quantizer_parameters",
    "quantizers",
    "record_sizes",
    "to_float",
]
