"""The ``mixq-packed`` container: bit-packed integer codes + float tensors + a JSON manifest.

File layout (version 1, all integers little-endian)::

    bytes 0..7     magic b"MIXQPACK"
    bytes 8..11    container version, uint32 (= 1)
    bytes 12..15   flags, uint32: bit 0 set = the manifest is zlib-compressed (always on write)
    bytes 16..23   manifest length M, uint64
    bytes 24..     manifest: M bytes of (zlib-compressed) UTF-8 JSON
    then           payload: manifest["payload_bytes"] bytes; the file ends there

``python -c "from mixq.export import read_packed; print(read_packed('f.mxq')[0])"`` shows the
manifest.

The manifest (JSON object) holds:

* ``"format": "mixq-packed"``, ``"version": 1``;
* ``payload_bytes``, ``payload_sha256`` (of the payload), ``quantized_bytes`` (the packed
  tensors), ``raw_bytes`` (the float tensors), ``weight_bits`` (``mixq.cost.weight_bits``);
* ``arch``: ``{"name": ..., "kwargs": {...}}`` for ``mixq.models.create_model``, or null;
* ``input_shape``: per-sample input shape (for the activation sizes), or null;
* ``folded_bn``: batch-norm modules folded away (the loader replaces them by ``nn.Identity``);
* ``logit_scale``: true when the model multiplies its output by the stored scalar
  ``logit_scale`` (:func:`mixq.layers.add_logit_scale`);
* ``activations``: every ``QuantAct`` site: ``module``, ``cap`` (6 for a ReLU6) and
  ``quantizer`` (as below) or null for a float site;
* ``tensors``: one entry per stored tensor: ``name`` (its ``state_dict`` key), ``shape``,
  ``offset`` and ``nbytes`` (into the payload) and either

* ``"storage": "packed"``: codes bit-packed at ``bits`` bits each (see
  :mod:`mixq.export.bitpack`: LSB-first, each tensor starting on a byte boundary), with
  ``kind``, ``encoding`` (``twos_complement`` for signed uniform codes, ``unsigned``,
  ``sign_exponent`` for signed power-of-two), ``declared_bitwidth``, ``widened``, ``d`` and ``k``
  (uniform, value ``d * code``) or ``q_min``, ``q_max``, ``L``, ``m_bits``, ``with_zero``
  (pow-2, value ``(-1)^s * q_min * 2^m``, see :mod:`mixq.export.codes`), and ``quantizer`` (the
  raw parameters and bounds that rebuild it exactly); or
* ``"storage": "raw"`` with ``dtype`` (``float32``, ``int64``, ...): raw little-endian values
  (batch norm parameters and statistics, unquantized layers; BN's ``num_batches_tracked``
  counters are not stored).

All packed tensors come first, so ``quantized_bytes`` = sum of ``ceil(numel * bits / 8)``.
``activations`` lists every ``QuantAct`` site (module name, ``cap``, ``quantizer`` or null),
``outputs`` every ``QuantOut`` site (module name, ``signed``, ``quantizer`` or null), ``inputs``
every quantizer applied at a layer's input (``layers`` that share it, ``quantizer``), and
``site_config`` the ``activation_sites`` mode and ``uncounted`` names of the model's config.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixq.convert import record_sizes, site_config, to_float
from mixq.cost import weight_bits
from mixq.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from mixq.export.codes import build_quantizer, decode, encode, quantizer_spec
from mixq.export.errors import ExportError, PackedFormatError
from mixq.export.files import write_atomic
from mixq.layers import (
    ACTIVATIONS,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    QuantOut,
    add_logit_scale,
    input_quantizer,
    scale_logits,
)
from mixq.models import create_model
from mixq.quant.base import Quantizer

MAGIC = b"MIXQPACK"
FORMAT = "mixq-packed"
VERSION = 1
_HEADER = struct.Struct("<8sIIQ")
_ZLIB = 1
#: The largest manifest read (decompressed): a model's manifest is a few hundred KB.
MAX_MANIFEST_BYTES = 64 * 1024**2


def output_scale(model: nn.Module) -> torch.Tensor | None:
    """The ``logit_scale`` that :func:`mixq.layers.add_logit_scale` applies through a forward
    hook (None without one). Any other hook raises: the packed file would silently drop it."""
    scale = None
    for name, m in model.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        for h in hooks:
            if m is model and h is scale_logits:
                scale = model.logit_scale.detach().float().cpu()
                continue
            raise ExportError(
                f"module {name or type(model).__name__!r} has a forward hook ({h!r}) that the "
                "packed format cannot reproduce; remove it before exporting"
            )
    return scale


def check_quantized(model: nn.Module) -> None:
    """Raise :class:`ExportError` unless ``model`` went through ``mixq.quantize_model``."""
    if not any(isinstance(m, (QuantConv2d, QuantLinear, QuantAct)) for m in model.modules()):
        raise ExportError(
            f"{type(model).__name__} is a float model (no mixq quantized layer): convert it with "
            "mixq.convert.quantize_model(model, config) (and train it) before exporting"
        )


def _raw_entry(name: str, t: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    arr = t.detach().cpu().contiguous().numpy()
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {"name": name, "shape": list(arr.shape), "storage": "raw",
            "dtype": arr.dtype.name}, arr.tobytes()  # fmt: skip


def _collect(model: nn.Module) -> tuple[list, list, list[dict[str, Any]]]:
    """``(packed, raw, activations)``: ``(entry, bytes)`` pairs and activation entries."""
    packed, done = [], set()
    for mname, m in model.named_modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        for attr in ("weight", "bias"):
            t, q = getattr(m, attr), getattr(m, f"{attr}_quantizer", None)
            if t is None or q is None:
                continue
            name = f"{mname}.{attr}" if mname else attr
            enc = encode(name, q, t)
            entry = {"name": name, "shape": list(t.shape), "storage": "packed", **enc.meta}
            packed.append((entry, pack_bits(enc.codes, enc.bits, enc.signed)))
            done.add(name)
    qprefixes = tuple(f"{n}." for n, mod in model.named_modules() if _is_quantizer(mod))
    raw = [_raw_entry(k, v) for k, v in model.state_dict().items()
           if k not in done and not k.startswith(qprefixes)
           and not k.endswith("num_batches_tracked")]  # fmt: skip
    return packed, raw, _activation_entries(model)


def _activation_entries(model: nn.Module) -> dict[str, Any]:
    """The manifest's activation sites: ``activations`` (``QuantAct``), ``outputs``
    (``QuantOut``), ``inputs`` (one quantizer read at the input of the layers sharing it) and
    ``site_config`` (what :func:`mixq.convert.record_sizes` needs to rebuild the site table)."""
    acts, outs, inputs, by_id = [], [], [], {}
    for mname, m in model.named_modules():
        if isinstance(m, QuantAct):
            spec = quantizer_spec(m.quantizer) if m.quantizer is not None else None
            acts.append({"module": mname, "cap": m.cap, "quantizer": spec})
        elif isinstance(m, QuantOut):
            spec = quantizer_spec(m.quantizer) if m.quantizer is not None else None
            outs.append({"module": mname, "signed": m.quantizer_signed, "quantizer": spec})
        elif isinstance(m, (QuantConv2d, QuantLinear)) and (q := input_quantizer(m)) is not None:
            if id(q) not in by_id:  # one entry per quantizer; every layer that reads it
                by_id[id(q)] = {"layers": [], "quantizer": quantizer_spec(q)}
                inputs.append(by_id[id(q)])
            by_id[id(q)]["layers"].append(mname)
    mode, uncounted = site_config(model)
    return {"activations": acts, "outputs": outs, "inputs": inputs,
            "site_config": {"mode": mode, "uncounted": list(uncounted)}}  # fmt: skip


def _is_quantizer(m: nn.Module) -> bool:
    return isinstance(m, Quantizer)


def save_packed(model: nn.Module, path: str | Path, *,
                input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write ``model`` (quantized) as a ``mixq-packed`` file; returns the manifest."""
    check_quantized(model)
    has_scale = output_scale(model) is not None
    packed, raw, acts = _collect(model)
    chunks, offset, entries = [], 0, []
    for entry, data in packed + raw:
        entry.update(offset=offset, nbytes=len(data))
        entries.append(entry)
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)
    shape = input_shape or getattr(model, "default_input_shape", None)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "arch": getattr(model, "mixq_arch", None),
        "input_shape": list(shape) if shape is not None else None,
        "folded_bn": list(getattr(model, "mixq_folded_bn", [])),
        "logit_scale": has_scale,
        "weight_bits": float(weight_bits(model).detach()),
        "quantized_bytes": sum(len(d) for _, d in packed),
        "raw_bytes": sum(len(d) for _, d in raw),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": entries,
        **acts,
    }
    blob = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode("utf-8"), 9)
    write_atomic(path, _HEADER.pack(MAGIC, VERSION, _ZLIB, len(blob)) + blob + payload)
    return manifest


def read_packed(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """``(manifest, payload)`` of a ``mixq-packed`` file, verified (size and sha256).

    Raises:
        PackedFormatError: not a mixq-packed file, unsupported version, corrupt manifest,
            truncated or oversized payload, checksum mismatch.
    """
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise PackedFormatError(f"{path}: not a mixq-packed file (unknown format; expected the "
                                f"magic {MAGIC!r} at the start)")  # fmt: skip
    _, version, flags, mlen = _HEADER.unpack_from(data)
    if version != VERSION:
        raise PackedFormatError(f"{path}: container version {version} is not supported "
                                f"(this mixq reads version {VERSION})")  # fmt: skip
    end = _HEADER.size + mlen
    if len(data) < end:
        raise PackedFormatError(f"{path}: truncated file (manifest incomplete)")
    try:
        blob = data[_HEADER.size : end]
        if flags & _ZLIB:  # bounded: a small zlib bomb must not take gigabytes of memory
            inflate = zlib.decompressobj()
            blob = inflate.decompress(blob, MAX_MANIFEST_BYTES)
            if inflate.unconsumed_tail or not inflate.eof:
                raise PackedFormatError(f"{path}: corrupt manifest (over {MAX_MANIFEST_BYTES} "
                                        "bytes decompressed, or incomplete)")  # fmt: skip
        if len(blob) > MAX_MANIFEST_BYTES:
            raise PackedFormatError(f"{path}: corrupt manifest (over {MAX_MANIFEST_BYTES} bytes)")
        manifest = json.loads(blob.decode("utf-8"))
        ok = isinstance(manifest, dict) and isinstance(manifest.get("tensors"), list)
    except (UnicodeDecodeError, json.JSONDecodeError, zlib.error) as e:
        raise PackedFormatError(f"{path}: corrupt manifest ({e})") from None
    if not ok:
        raise PackedFormatError(f"{path}: corrupt manifest (no tensor list)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        fmt, ver = manifest.get("format"), manifest.get("version")
        raise PackedFormatError(f"{path}: unknown format {fmt!r} version {ver!r}; expected "
                                f"{FORMAT!r} {VERSION}")  # fmt: skip
    payload = data[end:]
    size = manifest.get("payload_bytes")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise PackedFormatError(f"{path}: corrupt manifest (payload_bytes {size!r})")
    if len(payload) < size:
        raise PackedFormatError(f"{path}: truncated file: payload has {len(payload)} of {size} "
                                "bytes")  # fmt: skip
    if len(payload) > size:
        raise PackedFormatError(f"{path}: corrupt file: {len(payload) - size} trailing bytes")
    if hashlib.sha256(payload).hexdigest() != manifest.get("payload_sha256"):
        raise PackedFormatError(f"{path}: checksum mismatch: the payload is corrupt")
    return manifest, payload


def _tensor(entry: dict[str, Any], payload: bytes) -> torch.Tensor:
    try:
        shape, off, nb = tuple(entry["shape"]), entry["offset"], entry["nbytes"]
        if not all(_is_count(v) for v in (*shape, off, nb)):
            raise ValueError(f"shape {list(shape)}, offset {off!r}, nbytes {nb!r}: expected "
                             "integers >= 0")  # fmt: skip
        if off + nb > len(payload):
            raise ValueError("byte range outside the payload")
        n = math.prod(shape)  # exact (no int64 overflow); checked against nbytes before use
        chunk = payload[off : off + nb]
        if entry["storage"] == "raw":
            dtype = np.dtype(entry["dtype"])
            if dtype.kind not in "fiub" or n * dtype.itemsize != nb:
                raise ValueError(f"{nb} bytes for {n} values of dtype {dtype}")
            arr = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
            return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).reshape(shape)
        bits = entry["bits"]
        if not _is_count(bits) or not 1 <= bits <= 32:
            raise ValueError(f"bits {bits!r} not in [1, 32]")
        if nb != packed_nbytes(n, bits):
            raise ValueError(f"{nb} bytes for {n} {bits}-bit codes")
        signed = entry["encoding"] == "twos_complement"
        return decode(entry, unpack_bits(chunk, n, bits, signed), shape)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as e:
        raise PackedFormatError(f"corrupt tensor entry {entry.get('name')!r}: {e}") from None


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _skeleton(manifest: dict[str, Any], model: nn.Module | None, max_numel: int) -> nn.Module:
    if model is None:
        arch = manifest.get("arch")
        if not arch:
            raise PackedFormatError(
                "the file has no architecture reference (model.mixq_arch was unset at export): "
                "pass load_packed(path, model=skeleton)"
            )
        try:
            if not isinstance(arch, dict) or not isinstance(arch.get("kwargs", {}), dict):
                raise TypeError(f"arch {arch!r} is not {{name, kwargs}}")
            # Sizes first, on the meta device (no memory): a crafted width must not make the
            # real build allocate terabytes. The file's tensors bound what a fitting model has.
            with torch.device("meta"):
                probe = create_model(arch["name"], **arch.get("kwargs", {}))
            need = sum(p.numel() for p in probe.parameters())
            if need > 4 * max_numel + 2**20:  # slack: folded batch norms left the file
                raise ValueError(f"the architecture has {need} parameters but the file holds "
                                 f"{max_numel} values")  # fmt: skip
            model = create_model(arch["name"], **arch.get("kwargs", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise PackedFormatError(f"the file's architecture cannot be built: {e}") from None
        model.mixq_arch = arch
    return to_float(model)


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the quantized model of a ``mixq-packed`` file (in eval mode).

    Conv/linear layers get their weight and bias quantizers back (same raw parameters, so the
    same bitwidths and derived values) and hold the dequantized weights ``d * code``, which
    the quantizers map to themselves: the outputs equal those of the exported fake-quantized
    model bit for bit. Activation sites get their quantizers from the manifest.

    Args:
        path: the file.
        model: a float or quantized skeleton of the architecture (modified in place); default:
            built from the manifest's ``arch`` with :func:`mixq.models.create_model`.
    """
    manifest, payload = read_packed(path)
    try:  # every tensor is decoded (sizes checked against the payload) before any model
        tensors = {e["name"]: e for e in manifest["tensors"]}
        state = {name: _tensor(e, payload) for name, e in tensors.items()}
    except (KeyError, TypeError) as e:
        raise PackedFormatError(f"{path}: corrupt manifest (tensor list: {e!r})") from None
    model = _skeleton(manifest, model, sum(t.numel() for t in state.values()))
    mods = dict(model.named_modules())
    try:
        for bn in manifest.get("folded_bn", []):
            _replace(model, bn, nn.Identity())
        for mname, m in mods.items():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            prefix = f"{mname}." if mname else ""
            qs = {a: tensors.get(prefix + a, {}).get("quantizer") for a in ("weight", "bias")}
            if m.bias is None and prefix + "bias" in tensors:
                m.bias = nn.Parameter(m.weight.new_zeros(m.weight.shape[0]))
            if qs["weight"] or qs["bias"]:
                wq, bq = (build_quantizer(s) if s else None for s in (qs["weight"], qs["bias"]))
                for q in (wq, bq):
                    if q is not None:
                        q.to(m.weight.device)
                _replace(model, mname, _quant_type(m).from_float(m, wq, bq))
        for act in manifest.get("activations", []):
            m = mods.get(act["module"])
            if type(m) not in ACTIVATIONS:
                raise PackedFormatError(f"activation site {act['module']!r} is not a ReLU/ReLU6 "
                                        "in the model skeleton")  # fmt: skip
            q = build_quantizer(act["quantizer"]) if act["quantizer"] else None
            if q is not None and (p := next(model.parameters(), None)) is not None:
                q.to(p.device)
            _replace(model, act["module"], QuantAct(q, cap=act["cap"]))
        _attach_outputs_and_inputs(model, manifest)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as e:
        raise PackedFormatError(f"{path}: manifest does not match the model: {e!r}") from None
    if manifest.get("logit_scale") and not hasattr(model, "logit_scale"):
        add_logit_scale(model)
    _load_state(model, state, path)
    try:
        sites = manifest.get("site_config") or {"mode": "relu", "uncounted": []}
        model.mixq_site_config = (sites["mode"], tuple(sites["uncounted"]))
        model.mixq_folded_bn = list(manifest.get("folded_bn", []))
        if manifest.get("input_shape"):
            record_sizes(model, input_shape=tuple(manifest["input_shape"]))
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as e:
        raise PackedFormatError(f"{path}: corrupt manifest (sites or input shape: {e!r})") from None
    return model.eval()


def _attach_outputs_and_inputs(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Wrap the ``outputs`` sites in ``QuantOut`` and give the ``inputs`` quantizers (one
    object per entry, shared by its layers) back to the layers that read them."""
    device = next(model.parameters()).device
    for out in manifest.get("outputs", []):
        m = model.get_submodule(out["module"])
        q = build_quantizer(out["quantizer"]) if out["quantizer"] else None
        _replace(model, out["module"], QuantOut(m, q.to(device) if q else None, out["signed"]))
    for entry in manifest.get("inputs", []):
        q = build_quantizer(entry["quantizer"]).to(device)
        for name in entry["layers"]:
            layer = model.get_submodule(name)
            if not isinstance(layer, (QuantConv2d, QuantLinear)):
                raise PackedFormatError(f"input quantizer of {name!r}: the skeleton's {name!r} "
                                        "is not a quantized conv/linear layer")  # fmt: skip
            layer.input_quantizer = q


def _quant_type(m: nn.Module) -> type:
    """The quantized layer class for a float conv/linear layer."""
    return QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise PackedFormatError(f"{path}: tensors do not fit the model skeleton: {e}") from None
    qkeys = {k for n, mod in model.named_modules() if _is_quantizer(mod)
             for k in (f"{n}.{p}" for p, _ in mod.named_parameters())}  # fmt: skip
    missing = [k for k in missing if k not in qkeys and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise PackedFormatError(f"{path}: file and model skeleton differ: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")  # fmt: skip
