"""Frozen, validated configuration dataclasses and their YAML / dict / ``key=value`` loading.

``from_dict(cls, data)`` builds a (nested) dataclass from plain data and rejects unknown keys
with a "did you mean" suggestion; ``apply_overrides(data, ["a.b=1"])`` edits the plain data
before validation; ``to_dict`` dumps it back (for the run directory's resolved config).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mixq.quant.bounds import default_bounds
from mixq.quant.registry import parse_spec

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


def check_range(
    where: str,
    value: float | int,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number in the interval
    (``[lo, hi]``, ends open as asked, None: unbounded); the message states the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        raise ConfigError(f"{where}={value!r} must be a finite number in {left}, {right}"
                          + (f" ({hint})" if hint else ""))  # fmt: skip


#: Caps on what an error message echoes of a value: a YAML alias bomb expands a few hundred
#: bytes into a structure whose full repr has hundreds of megabytes; reprlib never builds it.
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6


def _short(value: Any) -> str:
    """``repr(value)``, abbreviated to a few hundred characters whatever its size."""
    return _REPR.repr(value)


def _suggest(key: str, valid: list[str]) -> str:
    hint = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {hint[0]!r}?" if hint else ""


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {_short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {_short(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {_short(value)} is not one of {list(args)}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        name = key[:80] if isinstance(key, str) else _short(key)
        path = f"{where}.{name}" if where else name
        if key not in fields:
            raise ConfigError(
                f"unknown config key {path!r}; valid keys here: {sorted(fields)}."
                + _suggest(name, list(fields))
            )
        kwargs[key] = _convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a dataclass, for YAML/JSON dumps."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a clear error for a missing file or another top-level type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        # Python tags (!!python/object ...) are refused by safe_load, never constructed.
        msg = str(e)
        msg = msg if len(msg) <= 600 else msg[:600] + " ..."
        raise ConfigError(f"config file {str(path)!r} is not valid (safe) YAML: {msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a copy of ``data``."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}: expected key=value, e.g. optim.lr=0.01")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"bad override {item!r}: cannot parse value ({e})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad override {item!r}: {p!r} is not a mapping")
        node[parts[-1]] = value
    return out


# -- quantization config -------------------------------------------------------------------


@dataclass(frozen=True)
class SiteConfig:
    """How one kind of tensor (weights, biases or activations) is quantized.

    Attributes:
        quantizer: ``"kind/parametrization"`` (e.g. ``"uniform/d_qmax"``, ``"pow2/qmin_qmax"``)
            or ``"float"`` to leave the tensor unquantized (counted at 32 bits).
        bits: initial bitwidth ``b0`` (spec 6).
        learnable: False freezes the quantizer (the "Fixed" baselines).
        pow2_step: uniform only: round the step to a power of two (decision 2).
        bounds: overrides of ``b_min``, ``b_max``, ``d_min``, ... (spec 1.4, 2.3).
        bit_set: the bitwidths the site may take, e.g. ``[4, 8]`` for int4/int8 kernels
            (CMSIS-NN, TFLite Micro) or ``[8]`` for int8 only; respected by the learned
            quantizer (its projection), the repair step and the packed export. None: every
            integer in ``[b_min, b_max]``. ``bits`` must be a member.
    """

    quantizer: str = "uniform/d_qmax"
    bits: int = 4
    learnable: bool = True
    pow2_step: bool = True
    bounds: dict[str, float] = field(default_factory=dict)
    bit_set: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.quantizer != "float":
            try:
                kind, _ = parse_spec(self.quantizer)
            except ValueError as e:
                raise ConfigError(f"{e} (or 'float')") from None
            try:
                default_bounds(kind, True, **self.bounds)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            for key, value in self.bounds.items():
                check_range(f"bounds.{key}", value, 0.0, lo_open=True)
        if not 1 <= self.bits <= 16:
            raise ConfigError(f"bits={self.bits} must be in [1, 16]")
        if self.bit_set is not None:
            if not self.bit_set or any(not 1 <= b <= 16 for b in self.bit_set):
                raise ConfigError(
                    f"bit_set={list(self.bit_set)} must be a non-empty list of bitwidths in "
                    "[1, 16] (or null: any bitwidth within the bounds)"
                )
            if self.bits not in self.bit_set:
                raise ConfigError(
                    f"bits={self.bits} (the initial bitwidth) is not in bit_set="
                    f"{sorted(self.bit_set)}: set bits to one of them"
                )

    @property
    def is_float(self) -> bool:
        """True when this site stays in float32."""
        return self.quantizer == "float"


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings for modules whose fully-qualified name matches ``pattern`` (fnmatch).

    A ``None`` field keeps the global setting.
    """

    pattern: str
    weight: SiteConfig | None = None
    bias: SiteConfig | None = None
    activation: SiteConfig | None = None


@dataclass(frozen=True)
class QuantConfig:
    """What ``mixq.quantize_model`` does. The default is the paper's: uniform ``d_qmax`` for
    every weight, bias and activation, all started at 4 bits, first and last layers included.

    Attributes:
        weight, activation: global site settings.
        bias: bias settings; None means "like the weight" (decision 4: own quantizer, same init).
        overrides: per-layer settings, applied in order (later ones win).
        exclude: fnmatch patterns of layers (conv, linear or activation) left in float.
        init_from_weights: initialise weight and bias quantizers from the float weights
            (spec 6); otherwise the data-free ``d0 = 2^-3``.
        input_shape: per-sample input shape for the dry forward (default: the model's
            ``default_input_shape``).
        activation_sites: which stored tensors are activation sites (:mod:`mixq.sites`):
            ``"relu"`` (the paper's convention: activation outputs, ReLU/ReLU6 quantized
            unsigned, other activations counted in float) or ``"inputs"`` (every layer input
            and activation output, all quantized; signed unless known non-negative).
        uncounted: fnmatch patterns of site names (e.g. ``"input"``) left out of the memory
            model; the report lists them.
    """

    weight: SiteConfig = field(default_factory=SiteConfig)
    bias: SiteConfig | None = None
    activation: SiteConfig = field(default_factory=SiteConfig)
    overrides: tuple[LayerOverride, ...] = ()
    exclude: tuple[str, ...] = ()
    init_from_weights: bool = True
    input_shape: tuple[int, ...] | None = None
    activation_sites: Literal["relu", "inputs"] = "relu"
    uncounted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.input_shape is not None and (
            not self.input_shape or any(int(d) < 1 for d in self.input_shape)
        ):
            raise ConfigError(f"input_shape={list(self.input_shape)} must be a list of sizes >= 1 "
                              "(per sample, e.g. [3, 32, 32]) or null")  # fmt: skip
        if self.activation_sites not in ("relu", "inputs"):
            raise ConfigError(
                f"activation_sites={self.activation_sites!r}: use 'relu' (the paper's ReLU "
                "outputs) or 'inputs' (every layer input and activation output)"
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantConfig:
        """Load from a YAML file with the same keys as the dataclass."""
        return from_dict(cls, load_yaml(path))
