"""ONNX (QDQ) and QONNX files through PyTorch's own exporter.

The graph comes from ``torch.export`` and ``torch.onnx.export(..., dynamo=True)``: every op that
PyTorch can export is exported. mixq contributes only the quantization nodes and the weight
storage: inside :func:`mixq.export.quant_nodes.export_mode` each quantizer emits its own nodes
(see there for the node groups of each format). After conversion the integer codes of tensors
with at most 4 bits are narrowed to ``INT4``/``UINT4`` initializers (opset >= 21; two codes per
byte), those with at most 2 bits to ``INT2``/``UINT2`` (opset >= 25; four per byte, ONNX's
narrowest integer type; 3-bit codes take 4), PyTorch's per-node debug metadata and node names
are dropped, values get short names (a tensor's codes keep the tensor's name), and the
file records in ``metadata_props`` (read them with :func:`read_metadata`): ``mixq.format``,
``mixq.tensors`` (per tensor: kind, bits, storage type, ``d``/``k`` or
``q_min``/``q_max``/``L``), ``mixq.activations`` (per activation quantizer: kind, bitwidth,
``d``/``k`` or ``q_min``/``q_max``/``L``), ``mixq.arch``,
``mixq.rounding``, ``mixq.ties``. Quantization nodes also carry ``mixq.bitwidth`` and
``mixq.activation``/``mixq.tensor`` in their own ``metadata_props``.

Batch: symbolic (``N``) by default for ``onnx``; ``batch=n`` fixes it (the ``qonnx`` executor
refuses a symbolic batch, so ``qonnx`` defaults to the example input's batch size).
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mixq.export.bitpack import pack_bits
from mixq.export.errors import ExportError, require_onnx
from mixq.export.files import write_atomic
from mixq.export.packed import check_quantized
from mixq.export.quant_nodes import Emitter, export_mode

DEFAULT_OPSET = {"onnx": 21, "qonnx": 18}
MIN_OPSET = 18  # torch.onnx's dynamo exporter
ROUNDING_NOTE = (
    "mixq rounds half away from zero; ONNX QuantizeLinear (and QONNX Quant ROUND) round half "
    "to even. Weights are stored as exact integer codes (no difference); an activation differs "
    "only where x/d is exactly m + 1/2 (mixq.ties = away removes the difference)."
)
_FIX = (
    "change that part of the model's forward to ops torch.export/torch.onnx support (or move it "
    "out of the exported module); the packed format (format='packed') works on every model"
)


def example_for(model: nn.Module, example_input: Tensor | None) -> Tensor:
    """``example_input`` or ``zeros(1, *model.default_input_shape)``."""
    if example_input is not None:
        return example_input.detach().float().cpu()
    shape = getattr(model, "default_input_shape", None)
    if shape is None:
        raise ExportError(f"pass example_input=... ({type(model).__name__} has no "
                          "default_input_shape)")  # fmt: skip
    return torch.zeros(1, *shape)


def _where(text: str) -> str:
    """The op named in a PyTorch error message and the user-code lines around it."""
    lines = [ln.strip() for ln in text.splitlines()]
    ops = list(dict.fromkeys(re.findall(r"\baten\.\w+(?:\.\w+)?", text)))
    frames = list(dict.fromkeys(ln for ln in lines if ln.startswith("File ")
                                and "/torch/" not in ln))  # fmt: skip
    for i, ln in enumerate(lines):  # the graph dump: "# File: path:line in fn, code: ..."
        if ops and ops[0] in ln:
            code = [c for c in lines[:i] if c.startswith("# File:") and "/torch/" not in c]
            frames = code[-1:] if code else frames
            break
    out = [f"op {ops[0]}"] if ops else []
    if frames:
        out.append("at " + " <- ".join(reversed(frames[-3:])).lstrip("# "))
    return "; ".join(out)


def _cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    return e


def _locate(model: nn.Module, x: Tensor, dyn: Any, text: str) -> str:
    """For a node that torch.onnx could not translate: its module and source line."""
    found = re.search(r"translating node %(\w+)", text)
    if not found:
        return ""
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=dyn, strict=False)
        graph = program.run_decompositions().graph  # the graph that torch.onnx translates
    except Exception:  # the capture itself worked once; be safe anyway
        return ""
    for n in graph.nodes:
        if n.name == found.group(1):
            stack = list((n.meta.get("nn_module_stack") or {}).values())
            trace = [ln.strip() for ln in (n.meta.get("stack_trace") or "").splitlines()]
            files = [ln for ln in trace if ln.startswith("File ") and "/torch/" not in ln]
            path, cls = stack[-1] if stack else ("", type(model).__qualname__)
            where = f"module {path!r} ({cls.rsplit('.', 1)[-1]}.forward)" if path else \
                f"the forward of {cls.rsplit('.', 1)[-1]}"  # fmt: skip
            return f"\nFile {files[-1][5:]}, {where}" if files else f"\nFile in {where}"
    return ""


def _error(stage: str, model: nn.Module, e: Exception, located: str = "") -> ExportError:
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{e}\n{_cause(e)}{located}")
    root = _cause(e)
    first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), type(root).__name__)
    where = _where(text)
    where = f" ({where})" if where else ""
    fix = _FIX
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        fix = ("the forward branches on tensor values (if/while on data): make the condition a "
               "Python value or use torch.cond; " + _FIX)  # fmt: skip
    return ExportError(f"{stage} failed on {type(model).__name__}: {type(root).__name__}: "
                       f"{first[:300]}{where}. Fix: {fix}")  # fmt: skip


def capture(model: nn.Module, x: Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export.export(model, (x,))`` (non-strict; batch dimension symbolic when asked),
    with an :class:`ExportError` naming the op and the place when PyTorch cannot capture it."""
    dyn = ({0: torch.export.Dim("N")},) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (x,), dynamic_shapes=dyn, strict=False)
    except Exception as e:  # torch.export raises many types
        raise _error("torch.export (graph capture)", model, e) from e


def _require_exporter() -> None:
    require_onnx()
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the 'onnxscript' package (PyTorch's ONNX "
                          "exporter): pip install 'mixq[onnx]'") from e  # fmt: skip


def narrow_width(bits: int, opset: int) -> int | None:
    """The packed ONNX integer width for codes of ``bits`` bits: 2 (INT2/UINT2, opset >= 25)
    for <= 2 bits, 4 (INT4/UINT4, opset >= 21) for <= 4 bits, else None (INT8/INT16)."""
    if bits <= 2 and opset >= 25:
        return 2
    return 4 if bits <= 4 and opset >= 21 else None


def _stored_input(node: Any, producer: dict[str, Any]) -> str | None:
    """The value holding a quantized tensor's stored form, read by its ``mixq.tensor`` node:
    ``DequantizeLinear(codes, d)``, pow-2 ``Gather(levels, Cast(codes))`` (through the Cast),
    QONNX ``Quant(values, d, 0, b)``; None for any other node."""
    if node.op_type in ("DequantizeLinear", "Quant"):
        return node.input[0]
    if node.op_type != "Gather":
        return None
    key = node.input[1]
    cast = producer.get(key)
    return cast.input[0] if cast is not None and cast.op_type == "Cast" else key


def _narrow_codes(onnx: Any, proto: Any, emitter: Emitter, opset: int) -> None:
    """Store codes of <= 4 bits as INT4/UINT4 (opset >= 21), of <= 2 bits as INT2/UINT2
    (opset >= 25), and record each storage type.

    The codes initializer of a tensor is found from its node (``mixq.tensor`` metadata), not by
    name: PyTorch's optimizer merges identical initializers and nodes (e.g. two all-zero
    biases with one step); a merged tensor is recorded as ``"merged": true``.
    """
    tp = onnx.TensorProto
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = {p.value: n for n in proto.graph.node for p in n.metadata_props
             if p.key == "mixq.tensor"}  # fmt: skip
    done: set[str] = set()
    for name, rec in emitter.tensors.items():
        if rec.pop("initializer", None) is None:
            continue
        node = nodes.get(name)
        if node is None:  # an identical tensor's nodes compute it
            rec["merged"] = True
            continue
        key = _stored_input(node, producer)
        if key not in inits:
            raise ExportError(f"{name}: the exporter folded its integer codes away; please "
                              "report this with the model")  # fmt: skip
        init = inits[key]
        signed = rec["kind"] == "uniform"
        width = narrow_width(rec["bits"], opset)
        if width and key not in done:
            codes = onnx.numpy_helper.to_array(init)
            dtype = {(2, True): tp.INT2, (2, False): tp.UINT2,
                     (4, True): tp.INT4, (4, False): tp.UINT4}[(width, signed)]  # fmt: skip
            raw = pack_bits(codes.astype(np.int64), width, signed)
            init.CopyFrom(onnx.helper.make_tensor(key, dtype, list(codes.shape), raw, raw=True))
            for vi in proto.graph.value_info:
                if vi.name == key:
                    vi.type.tensor_type.elem_type = dtype
        done.add(key)
        rec["storage"] = tp.DataType.Name(init.data_type)


#: Ops that only move elements: a per-tensor Quantize/DequantizeLinear pair commutes with them.
_VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


def _qdq_after_views(onnx: Any, proto: Any) -> None:
    """Move every activation ``QuantizeLinear -> DequantizeLinear`` pair that feeds a view op
    (Reshape, Flatten, Squeeze, Unsqueeze, Transpose) to the view's output.

    Exact, since a per-tensor pair is elementwise and a view only moves elements; and needed,
    because onnxruntime's QDQ propagation (its default ``ORT_ENABLE_ALL`` optimizations,
    1.32) rewrites ``DequantizeLinear(INT8) -> Reshape`` into an invalid graph (``output_dtype
    INT8 does not match y_zero_point type UINT8``, cf. microsoft/onnxruntime#27845): a signed
    activation before a flatten (hard-swish or tanh, then a classifier) would not load.
    A pair whose output has no reader left is removed.
    """
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    nodes = []
    for n in g.node:
        dq = producer.get(n.input[0]) if n.op_type in _VIEW_OPS and n.input else None
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
            else None  # fmt: skip
        if q is None or q.op_type != "QuantizeLinear":
            nodes.append(n)
            continue
        out = n.output[0]
        n.input[0], n.output[0] = q.input[0], f"{out}__float"
        new_q = onnx.helper.make_node("QuantizeLinear", [n.output[0], *q.input[1:]],
                                      [f"{out}__q"], name=f"{n.name}__q")  # fmt: skip
        new_dq = onnx.helper.make_node("DequantizeLinear", [new_q.output[0], *dq.input[1:]],
                                       [out], name=f"{n.name}__dq")  # fmt: skip
        for old, copy in ((q, new_q), (dq, new_dq)):
            copy.attribute.extend(old.attribute)
            copy.metadata_props.extend(old.metadata_props)
        producer.update({n.output[0]: n, new_q.output[0]: new_q, out: new_dq})
        nodes += [n, new_q, new_dq]
    while True:  # drop the pairs nothing reads any more (a DQ first, then its Q)
        read = {i for n in nodes for i in n.input} | {o.name for o in g.output}
        kept = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                or any(o in read for o in n.output)]  # fmt: skip
        if len(kept) == len(nodes):
            break
        nodes = kept
    del g.node[:]
    g.node.extend(nodes)


def _strip_debug(proto: Any, keep_shapes: bool) -> None:
    """Drop PyTorch's per-node debug metadata (stack traces, fx nodes): it doubles the file;
    and the intermediate shapes unless ``keep_shapes`` (the qonnx executor needs them)."""

    def keep(props: Any) -> None:
        kept = [(p.key, p.value) for p in props if p.key.startswith("mixq.")]
        del props[:]
        for k, v in kept:
            props.add(key=k, value=v)

    graphs = [proto.graph]
    for g in graphs:
        for n in g.node:
            keep(n.metadata_props)
            graphs += [a.g for a in n.attribute if a.HasField("g")]
        for vi in (*g.input, *g.output, *g.value_info):
            keep(vi.metadata_props)
        for init in g.initializer:
            keep(init.metadata_props)
        if not keep_shapes:
            del g.value_info[:]  # onnxruntime infers them
        del g.metadata_props[:]  # the exported program's text
        for n in g.node:
            n.name = ""  # optional in ONNX; PyTorch's names are ~15 bytes a node


def _short_names(proto: Any) -> None:
    """Rename values so that names do not outweigh small models' 4-bit payloads.

    A quantized tensor's stored form (integer codes; QONNX: float values) takes the tensor's own
    name (``layer1.0.conv1.weight``, the key of ``mixq.tensors``; the first tensor's where
    PyTorch merged identical ones), every other initializer ``c<i>`` and every intermediate value
    ``t<i>``; the graph's inputs and outputs keep theirs. Graphs with subgraphs (``If``/``Loop``
    from ``torch.cond``) are left as PyTorch named them, since subgraphs may read outer names.
    """
    g = proto.graph
    if any(a.HasField("g") or len(a.graphs) for n in g.node for a in n.attribute):
        return
    keep = {v.name for v in (*g.input, *g.output)}
    producer = {o: n for n in g.node for o in n.output}
    stored: dict[str, str] = {}  # stored-form value -> tensor name (the first, if merged)
    for n in g.node:
        tensor = next((p.value for p in n.metadata_props if p.key == "mixq.tensor"), None)
        key = _stored_input(n, producer) if tensor is not None else None
        if key is not None and tensor not in keep and tensor not in stored.values():
            stored.setdefault(key, tensor)
    taken = keep | set(stored.values())
    rename: dict[str, str] = {}
    counters = {"c": 0, "t": 0}

    def fresh(prefix: str) -> str:
        while True:
            name = f"{prefix}{counters[prefix]}"
            counters[prefix] += 1
            if name not in taken:
                return name

    for i in g.initializer:
        if i.name not in keep:
            rename[i.name] = stored.get(i.name) or fresh("c")
    for n in g.node:
        for o in n.output:
            if o and o not in keep and o not in rename:
                rename[o] = fresh("t")
    for i in g.initializer:
        i.name = rename.get(i.name, i.name)
    for n in g.node:
        n.input[:] = [rename.get(v, v) for v in n.input]
        n.output[:] = [rename.get(v, v) for v in n.output]
    for vi in g.value_info:
        vi.name = rename.get(vi.name, vi.name)


#: ``metadata_props`` written as tables (``[{"columns": [...], "rows": {name: [...]}}, ...]``,
#: one per set of fields): one record per tensor repeats the same keys, a third of a small
#: model's metadata.
TABLE_KEYS = ("mixq.tensors", "mixq.activations")


def _tables(records: dict[str, dict]) -> list[dict]:
    tables: dict[tuple[str, ...], dict] = {}
    for name, rec in records.items():
        t = tables.setdefault(tuple(rec), {"columns": list(rec), "rows": {}})
        t["rows"][name] = list(rec.values())
    return list(tables.values())


def read_metadata(model: Any) -> dict[str, Any]:
    """The ``mixq.*`` metadata of an exported ONNX/QONNX file (a path or a loaded proto).

    Returns ``{key: value}``: ``mixq.tensors`` and ``mixq.activations`` as
    ``{name: {field: value}}`` (stored as tables, :data:`TABLE_KEYS`), ``mixq.arch`` decoded
    from JSON, the rest as strings.
    """
    if isinstance(model, (str, Path)):
        model = require_onnx().load(str(model), load_external_data=False)
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        value: Any = p.value
        if p.key in TABLE_KEYS:
            value = {n: dict(zip(t["columns"], row, strict=True)) for t in json.loads(value)
                     for n, row in t["rows"].items()}  # fmt: skip
        elif p.key == "mixq.arch":
            with contextlib.suppress(ValueError):  # a plain string
                value = json.loads(value)
        out[p.key] = value
    return out


def _set_batch(proto: Any, batch: int | None) -> None:
    for vi in (*proto.graph.input, *proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            if batch is None:
                dims[0].dim_param = "N"
            else:
                dims[0].dim_value = batch


def export_onnx(model: nn.Module, path: str | Path, *, format: str = "onnx",
                example_input: Tensor | None = None, opset: int | None = None,
                ties: str = "even", batch: int | str | None = "default") -> Any:  # fmt: skip
    """Write ``model`` as an ONNX (QDQ) or QONNX file (module docstring); returns the proto.

    Args:
        model: a quantized model (``mixq.quantize_model``); exported in eval mode.
        path: output file.
        format: ``"onnx"`` (QDQ, onnxruntime) or ``"qonnx"`` (``Quant`` nodes, FINN/qonnx).
        example_input: one batch for the capture (default: zeros of
            ``model.default_input_shape``).
        opset: default-domain opset (>= 18; default 21 for ``onnx`` (INT4/INT16 need it), 18
            for ``qonnx``).
        ties: ``"even"`` (plain QuantizeLinear/Quant: activation ties round half to even) or
            ``"away"`` (ties round half away from zero, as mixq).
        batch: ``None`` for a symbolic batch dimension, an int to fix it; ``"default"``: symbolic
            for ``onnx``, the example input's batch for ``qonnx``.
    """
    if format not in DEFAULT_OPSET:
        raise ExportError(f"unknown ONNX format {format!r}; valid: {list(DEFAULT_OPSET)}")
    _require_exporter()
    import onnx
    import onnxscript.optimizer

    check_quantized(model)
    opset = DEFAULT_OPSET[format] if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: PyTorch's ONNX exporter needs {MIN_OPSET} "
                          "or newer (21 for INT4 weights and 16-bit activations)")  # fmt: skip
    x = example_for(model, example_input)
    if batch == "default":
        batch = None if format == "onnx" else int(x.shape[0])
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch={batch!r} must be a positive int or None (symbolic)")
    n = 2 if batch is None else batch  # torch.export specializes a batch of 1
    x = x[:1].expand(n, *x.shape[1:]).contiguous()
    emitter = Emitter(format, opset, ties)
    was_training = model.training
    model.eval()
    try:
        with export_mode(model, emitter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = ({0: torch.export.Dim("N")},) if batch is None else None
            try:
                onnx_program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                                 dynamic_shapes=dyn, verbose=False,
                                                 optimize=False)  # fmt: skip
            except Exception as e:  # torch.export / torch.onnx raise many types
                located = _locate(model, x, dyn, f"{e}\n{_cause(e)}")
                raise _error("PyTorch's ONNX exporter", model, e, located) from e
    finally:
        model.train(was_training)
    # PyTorch's default optimization would constant-fold DequantizeLinear(codes, d) back into
    # float weights; folding only ops on scalars keeps the integer storage
    onnxscript.optimizer.optimize_ir(onnx_program.model, input_size_limit=1)
    proto = onnx_program.model_proto
    _narrow_codes(onnx, proto, emitter, opset)
    if format == "onnx":
        _qdq_after_views(onnx, proto)
    _strip_debug(proto, keep_shapes=format == "qonnx")
    _short_names(proto)
    _set_batch(proto, batch)
    meta = {"mixq.format": "onnx-qdq" if format == "onnx" else "qonnx",
            "mixq.tensors": emitter.tensors, "mixq.activations": emitter.activations,
            "mixq.rounding": ROUNDING_NOTE, "mixq.ties": ties}  # fmt: skip
    if getattr(model, "mixq_arch", None) is not None:
        meta["mixq.arch"] = model.mixq_arch
    del proto.metadata_props[:]
    for key, value in meta.items():
        if key in TABLE_KEYS:
            value = _tables(value)
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else
                                 json.dumps(value, separators=(",", ":")))  # fmt: skip
    proto.producer_name = "mixq"
    onnx.checker.check_model(proto)
    write_atomic(path, proto.SerializeToString())
    return proto
