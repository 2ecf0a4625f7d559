"""Model surgery: ``quantize_model`` swaps layers for quantized ones, ``to_float`` reverses it.

Conversion is a module swap driven by the ``QUANT_LAYERS`` / ``ACTIVATIONS`` mappings and fnmatch
patterns on fully-qualified module names; the quantized layers *share* the float Parameters.
One dry forward (in eval mode, no gradient; :mod:`mixq.trace`) finds the activation sites
from the tensors that flow (:mod:`mixq.sites`) and records their per-sample element counts and
the output size of every layer, which the memory model and the MAC counts need (spec 5.1, 5.2).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator

import torch
from torch import nn

from mixq.config import ConfigError, LayerOverride, QuantConfig, SiteConfig
from mixq.layers import ACTIVATIONS, QUANT_LAYERS, QuantAct, QuantConv2d, QuantLinear, QuantOut
from mixq.quant.base import Quantizer
from mixq.quant.registry import make_quantizer
from mixq.sites import build_table, candidates, reader_groups
from mixq.trace import NONNEG_MODULES, Graph, trace

QUANTIZED_LAYERS = (QuantConv2d, QuantLinear)


def _build(site: SiteConfig, signed: bool) -> Quantizer | None:
    if site.is_float:
        return None
    kwargs = dict(site.bounds)
    if site.quantizer.startswith("uniform/"):
        kwargs["pow2_step"] = site.pow2_step
    try:
        q = make_quantizer(site.quantizer, signed=signed, learnable=site.learnable,
                           bit_set=site.bit_set, **kwargs)  # fmt: skip
    except ValueError as e:  # e.g. a bit_set outside this site's (signed/unsigned) bounds
        which = "weight/bias" if signed else "activation"
        raise ConfigError(f"{which} site config {site}: {e}") from None
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


def _check_patterns(cfg: QuantConfig, names: list[str], site_names: list[str]) -> None:
    patterns = list(cfg.exclude) + [ov.pattern for ov in cfg.overrides]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ConfigError(
                f"pattern {p!r} matches no quantizable layer or activation site; names are "
                f"e.g. {names[:6]} (see mixq.report or model.named_modules())"
            )
    for p in cfg.uncounted:
        if not any(fnmatch.fnmatchcase(n, p) for n in site_names):
            raise ConfigError(
                f"uncounted pattern {p!r} matches no activation site; sites are e.g. "
                f"{site_names[:6]} (see the report's activation sites)"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _example(model: nn.Module, example_input: torch.Tensor | None,
             input_shape: tuple[int, ...] | None) -> torch.Tensor:  # fmt: skip
    if example_input is not None:
        return example_input
    shape = input_shape or getattr(model, "default_input_shape", None)
    if shape is None:
        raise ValueError(
            "cannot infer the input shape for the dry forward: pass example_input=... or "
            "set QuantConfig.input_shape (per-sample shape, e.g. (3, 32, 32))"
        )
    p = next(model.parameters())
    return torch.zeros(1, *shape, device=p.device, dtype=p.dtype)


def _activation_modules(graph: Graph, mode: str) -> dict[str, nn.Module]:
    """The called activation modules that get a quantizer at their output, by path:
    ReLU/ReLU6 always (fused, decision 5), the others with ``activation_sites="inputs"``."""
    out = {}
    for i, m in graph.modules.items():
        op = graph.ops[i]
        if type(m) in ACTIVATIONS or (mode == "inputs" and op.activation):
            out[op.module] = m
    return out


def _reader_quantized(graph: Graph, mode: str, fused: dict[str, nn.Module]) -> list[int]:
    """Counted sites quantized at the layers that read them (not at an activation module)."""
    out = []
    for v, counted in candidates(graph, mode).items():
        prod = graph.producer(v)
        if not counted or (prod is not None and prod.kind == "module" and prod.module in fused):
            continue
        if mode == "relu" and not (prod is not None and prod.kind == "function" and prod.relu):
            continue  # the paper's convention quantizes ReLU outputs only
        out.append(v)
    return out


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Give every conv/linear weight and bias, and every activation site, a learned quantizer.

    Replaces, in place, each ``nn.Conv2d`` (grouped and depthwise too) and ``nn.Linear`` by a
    ``QuantConv2d`` / ``QuantLinear`` sharing its Parameters, and each ``nn.ReLU`` /
    ``nn.ReLU6`` by a ``QuantAct`` (an unsigned quantizer that is the ReLU, decision 5).
    The activation sites are found from the tensors of one dry forward (:mod:`mixq.sites`):
    with ``config.activation_sites="inputs"`` every other activation module is wrapped in a
    ``QuantOut`` and every other layer input is quantized at the layers that read it (signed
    unless its producer is non-negative). Weight quantizers start from the float weights
    (spec 6) unless configured otherwise.

    Args:
        model: a float model.
        config: a :class:`~mixq.config.QuantConfig`; None gives the paper's default.
        example_input: one batch for the dry forward; default ``zeros(1, *input_shape)``
            from the config or the model's ``default_input_shape``.

    Returns:
        The same ``model``, converted; ``mixq.sites.table_of(model)`` holds its sites. When
        anything fails, the model is left exactly as it was (the error is re-raised).

    Example:
        >>> from mixq.models import resnet20
        >>> m = quantize_model(resnet20())
        >>> sum(1 for _ in quantizers(m))
        40
    """
    snapshot = _snapshot(model)
    try:
        return _quantize(model, config, example_input)
    except BaseException:
        _restore(snapshot)  # a failure halfway leaves the model as it was, not half-converted
        raise


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Each module's attributes, with copies of its containers (submodules, parameters,
    buffers, hooks), so that :func:`_restore` undoes replacements and added attributes."""
    return [(m, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()})
            for m in model.modules()]  # fmt: skip


def _restore(snapshot: list[tuple[nn.Module, dict]]) -> None:
    for m, attrs in snapshot:
        m.__dict__.clear()
        m.__dict__.update(attrs)


def _quantize(model: nn.Module, config: QuantConfig | None,
              example_input: torch.Tensor | None) -> nn.Module:  # fmt: skip
    cfg = config or QuantConfig()
    # Checked first: a fully converted model has no plain nn.Conv2d / nn.Linear left, and the
    # "no quantizable layer" error below would hide the real cause.
    if any(isinstance(m, (*QUANTIZED_LAYERS, QuantAct, QuantOut)) for m in model.modules()):
        raise ValueError("model is already quantized; call mixq.to_float(model) first")
    layers = [(n, m) for n, m in model.named_modules() if type(m) in QUANT_LAYERS]
    if not layers:
        raise ValueError(
            "model has no quantizable layer (nn.Conv2d or nn.Linear); nothing to quantize"
        )
    mode = cfg.activation_sites
    example = _example(model, example_input, cfg.input_shape)
    graph = trace(model, example)
    fused = _activation_modules(graph, mode)
    site_names = [graph.values[v].name for v in candidates(graph, mode)]
    acts = [n for n, m in model.named_modules() if type(m) in ACTIVATIONS]
    _check_patterns(cfg, [n for n, _ in layers] + acts + list(fused) + site_names,
                    site_names)  # fmt: skip
    for name, mod in fused.items():
        excluded = any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude)
        site = _site(cfg, name, "activation")
        if type(mod) in ACTIVATIONS:
            q = None if excluded else _build(site, signed=False)
            _replace(model, name, QuantAct(q, cap=ACTIVATIONS[type(mod)]))
        else:
            signed = not (isinstance(mod, NONNEG_MODULES)
                          or (isinstance(mod, nn.Hardtanh) and mod.min_val >= 0))  # fmt: skip
            q = None if excluded else _build(site, signed=signed)
            _replace(model, name, QuantOut(mod, q, signed))
    # ReLU modules that the forward never calls are swapped too (to_float restores them).
    for name in acts:
        if name not in fused:
            _replace(model, name, QuantAct(None, cap=ACTIVATIONS[type(model.get_submodule(name))]))
    for name, mod in layers:
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
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
    _add_input_quantizers(model, cfg, graph, _reader_quantized(graph, mode, fused))
    device = next(model.parameters()).device
    for m in model.modules():
        if isinstance(m, (QuantAct, QuantOut)) and m.quantizer is not None:
            m.quantizer.to(device)
    model.mixq_site_config = (mode, tuple(cfg.uncounted))
    record_sizes(model, example)
    return model


def _add_input_quantizers(model: nn.Module, cfg: QuantConfig, graph: Graph,
                          values: list[int]) -> None:  # fmt: skip
    """One quantizer per group of reader-quantized sites, shared by the layers reading them."""
    device = next(model.parameters()).device
    for vs, layer_paths in reader_groups(graph, values):
        readers = [model.get_submodule(p) for p in layer_paths]
        readers = [m for m in readers if isinstance(m, QUANTIZED_LAYERS)]  # excluded stay float
        names = [graph.values[v].name for v in vs]
        if not readers or any(fnmatch.fnmatchcase(n, p) for n in names for p in cfg.exclude):
            continue
        signed = not all(graph.values[v].nonneg for v in vs)
        q = _build(_site(cfg, names[0], "activation"), signed=signed)
        if q is None:
            continue
        q.to(device)
        for m in readers:
            m.input_quantizer = q


@torch.no_grad()
def record_sizes(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> None:
    """Dry forward: the site table (``mixq_sites``), ``numel`` on every quantizer and
    ``out_shape`` on every layer (spec 5.1, 5.2)."""
    example = _example(model, example_input, input_shape)
    graph = trace(model, example)
    seen: set[int] = set()
    for i, m in graph.modules.items():
        op = graph.ops[i]
        if not op.outputs or not isinstance(m, (nn.Conv2d, nn.Linear, QuantAct, QuantOut)):
            continue
        m.out_shape = graph.values[op.outputs[0]].shape
        if isinstance(m, QuantAct) and id(m) not in seen:  # a reused module: its first call
            m.numel = graph.values[op.outputs[0]].numel
            seen.add(id(m))
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS):
            if m.weight_quantizer is not None:
                m.weight_quantizer.numel = m.weight.numel()
            if m.bias_quantizer is not None:
                m.bias_quantizer.numel = m.bias.numel()
    mode, uncounted = site_config(model)
    table = build_table(graph, model, mode, uncounted)
    for s in table.sites:
        if s.quantizer is not None and s.quantizer.numel is None:
            s.quantizer.numel = s.numel
    model.mixq_sites = table


def site_config(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """``(activation_sites mode, uncounted names)`` that :func:`quantize_model` recorded on
    ``model`` (``("relu", ())``, the paper's convention, when it recorded none)."""
    return model.__dict__.get("mixq_site_config", ("relu", ()))


def to_float(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model` in place: the original layer types, same Parameters."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (*QUANTIZED_LAYERS, QuantAct, QuantOut)):
            _replace(model, name, mod.to_float())
    for key in ("mixq_sites", "mixq_site_config"):
        model.__dict__.pop(key, None)
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
