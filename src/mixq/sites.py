"""Activation sites: which stored tensors the memory model counts, and how each is quantized.

A *site* is a value of the dry forward (:mod:`mixq.trace`) that a deployed network stores
(spec 5.1: ``S_x,l = b_l * A_l``): every tensor a conv/linear layer reads, and every output of an
activation. ``QuantConfig.activation_sites`` picks the counted ones:

* ``"relu"`` (default, the paper's convention, spec 5.3): the activation outputs. ReLU/ReLU6
  modules are fused into an unsigned quantizer (decision 5); a functional ``F.relu`` read by a
  layer is quantized unsigned at its readers; other activations (SiLU, GELU, ...) are counted
  in float (32 bits). The other layer inputs (the network input, pooled features, residual
  sums, linear bottlenecks) are listed as not counted, by this convention.
* ``"inputs"``: every layer input and every activation output is counted and quantized: at
  its producer for an activation module, otherwise at the layers that read it (one quantizer
  shared by all of them); unsigned where the producer is known to be non-negative.

A site is float when it cannot be quantized (a functional activation that no layer reads) or
is excluded (``QuantConfig.exclude``); ``QuantConfig.uncounted`` removes sites from the memory
model by name. Either way the report lists them.

**Peak memory** (``activation_peak``): the largest sum of the sites *alive at once*, as an
arena planner sees it. A chain of ops between two stored values is fused (conv, batch norm,
add and ReLU run as one kernel; a value read once, by the next op, is not stored), so a site is
alive from the op that produces it up to the production of the last stored value that reads
it, directly or through fused values, or to the end when it reaches the model output:
``peak = max_k sum_l alive[k, l] * S_x,l`` over the production steps ``k`` of the sites. Stored
values that are not sites (a residual stream that only norms and adds read) end lifetimes but
are not counted. Like (8c) the gradient goes to the first maximal step.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mixq.layers import QuantAct, QuantOut, input_quantizer
from mixq.quant.base import Quantizer
from mixq.trace import PART_FUNCTIONS, Graph

SITE_MODES = ("relu", "inputs")
NOT_COUNTED_BY_CONVENTION = (
    "not counted: activation_sites='relu' (the paper's convention) counts activation outputs "
    "only; activation_sites='inputs' counts and quantizes it"
)


@dataclass
class Site:
    """One activation site.

    Attributes:
        name: the producing call: module path (``relu#2`` for a reused module's 2nd call),
            ``module:function`` for a functional call, ``input`` for the network input.
        producer: what produced it, e.g. ``"ReLU"``, ``"function silu in layer1"``.
        consumers: the calls that read it.
        numel: elements per sample ``A_l``.
        nonneg: known to be >= 0 (an unsigned quantizer loses nothing).
        counted: in the memory model (sum, max, peak).
        quantizer: its learned quantizer, None for a float site (32 bits).
        quantized_at: the module holding the quantizer ("" for a float site).
        note: why it is float or not counted ("" for a quantized, counted site).
        by_convention: not counted because the paper's convention leaves it out (the network
            input, a pooling output), so no warning is due.
        start, end: the op steps between which it is alive (peak memory).
    """

    name: str
    producer: str
    consumers: tuple[str, ...]
    numel: int
    nonneg: bool
    counted: bool
    quantizer: Quantizer | None = field(default=None, repr=False)
    quantized_at: str = ""
    note: str = ""
    by_convention: bool = False
    start: int = 0
    end: int = 0


@dataclass
class SiteTable:
    """The sites of a model and the aliveness matrix of its counted sites.

    Attributes:
        mode: ``QuantConfig.activation_sites``.
        sites: every site, in production order (counted or not).
        steps: names of the ops at the peak-memory time steps (productions of stored values).
        alive: ``alive[k, j] = 1`` when counted site ``j`` is alive at step ``k``.
    """

    mode: str
    sites: list[Site]
    steps: list[str]
    alive: Tensor

    @property
    def counted(self) -> list[Site]:
        """The sites of the memory model, in production order."""
        return [s for s in self.sites if s.counted]

    def alive_at(self, k: int) -> list[str]:
        """Names of the counted sites alive at step ``k``."""
        return [s.name for s, a in zip(self.counted, self.alive[k].tolist(), strict=True) if a]


def _matches(name: str, patterns: tuple[str, ...]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def candidates(graph: Graph, mode: str) -> dict[int, bool]:
    """``{value: counted_by_mode}`` of every value that is a layer input or activation output."""
    if mode not in SITE_MODES:
        raise ValueError(f"activation_sites={mode!r}: valid values are {list(SITE_MODES)}")
    out = {}
    for v in graph.values:
        prod = graph.producer(v.index)
        act_out = prod is not None and prod.activation
        layer_in = any(graph.ops[r].layer for r in v.readers)
        if act_out or layer_in:
            out[v.index] = act_out or mode == "inputs"
    return out


def reader_groups(graph: Graph, values: list[int]) -> list[tuple[list[int], list[str]]]:
    """Values quantized at their readers, grouped so that each group shares one quantizer:
    values read by a common layer (a reused layer reads several) are in one group.

    Returns:
        ``[(values, layer_paths)]`` in production order.
    """
    parent = {v: v for v in values}

    def find(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    by_layer: dict[str, list[int]] = {}
    for v in values:
        for r in graph.values[v].readers:
            op = graph.ops[r]
            if op.layer:
                by_layer.setdefault(op.module, []).append(v)
    for vs in by_layer.values():
        for v in vs[1:]:
            parent[find(v)] = find(vs[0])
    groups: dict[int, tuple[list[int], list[str]]] = {}
    for v in values:
        groups.setdefault(find(v), ([], []))[0].append(v)
    for layer, vs in by_layer.items():
        groups[find(vs[0])][1].append(layer)
    return [g for g in groups.values() if g[1]]


def _producer_text(graph: Graph, v: int) -> str:
    op = graph.producer(v)
    if op is None:
        return "network input"
    if op.kind == "module":
        return op.target
    return f"function {op.target} in {op.module or 'the top-level forward'}"


def _lifetimes(graph: Graph, stored: set[int]) -> dict[int, tuple[int, int]]:
    """``{value: (start, end)}``: the op steps between which each stored value is alive."""
    end_all = len(graph.ops)
    outs = set(graph.outputs)
    eff = [0] * len(graph.ops)
    for op in reversed(graph.ops):
        # A stored output ends the fused chain here; an unstored one (e.g. the half of a chunk
        # that only a later cat reads) keeps its inputs alive until its own readers run.
        e = op.index
        for v in op.outputs:
            if v in stored:
                continue
            if v in outs:
                e = end_all
            for r in graph.values[v].readers:
                e = max(e, eff[r])
        eff[op.index] = e
    life = {}
    for v in stored:
        val = graph.values[v]
        end = max([eff[r] for r in val.readers], default=val.producer)
        life[v] = (val.producer, end_all if v in outs else max(end, val.producer))
    return life


def _float_note(graph: Graph, v: int, mode: str, quantizable: bool) -> str:
    """Why counted site ``v`` has no quantizer."""
    prod = graph.producer(v)
    if isinstance(graph.modules.get(graph.values[v].producer), (QuantAct, QuantOut)):
        return "float: excluded or configured float (QuantConfig.exclude / 'float')"
    if mode == "relu" and not (prod is not None and prod.relu):
        return "float: activation_sites='relu' quantizes ReLU/ReLU6 outputs only"
    if not quantizable:
        return ("float: a functional call that no conv/linear layer reads cannot be quantized; "
                "use an nn.Module activation (with activation_sites='inputs')")  # fmt: skip
    return "float: excluded or configured float (QuantConfig.exclude / 'float')"


def _quantizer_of(graph: Graph, model: nn.Module, v: int) -> tuple[Quantizer | None, str, bool]:
    """``(quantizer, owner path, can_be_quantized)`` of value ``v`` in a converted model."""
    prod = graph.producer(v)
    if prod is not None and prod.kind == "module":
        m = graph.modules.get(prod.index)
        if isinstance(m, (QuantAct, QuantOut)):
            return m.quantizer, prod.module, True
    for r in graph.values[v].readers:
        op = graph.ops[r]
        if op.layer:
            q = input_quantizer(graph.modules[r])
            if q is not None:
                return q, op.module, True
    readable = any(graph.ops[r].layer for r in graph.values[v].readers)
    return None, "", readable


def build_table(graph: Graph, model: nn.Module, mode: str,
                uncounted: tuple[str, ...] = ()) -> SiteTable:  # fmt: skip
    """The :class:`SiteTable` of a converted model from its dry-forward ``graph``."""
    cand = candidates(graph, mode)
    # A tensor that is not read once by the very next op cannot be fused into its reader: it
    # is stored too (a residual stream, a skip connection), which ends its inputs' lifetimes.
    # Only sites are counted; these other stored tensors are time boundaries of size 0.
    # Parts of a tensor (chunk, split, indexing) are views: they keep their input stored.
    stored = set(cand) | {
        v.index
        for v in graph.values
        if v.readers != [v.producer + 1]
        and v.index not in cand
        and graph.ops[v.producer].target not in PART_FUNCTIONS
    }
    life = _lifetimes(graph, stored)
    steps = sorted({life[v][0] for v in cand})
    sites = []
    for v in sorted(cand, key=lambda v: (graph.values[v].producer, v)):
        val = graph.values[v]
        prod = graph.producer(v)
        name = val.name
        q, at, quantizable = _quantizer_of(graph, model, v)
        counted, note = cand[v], ""
        pattern = _matches(name, uncounted)
        if pattern is not None:
            counted, note = False, f"not counted: QuantConfig.uncounted {pattern!r}"
        elif not counted:
            note = NOT_COUNTED_BY_CONVENTION
        elif q is None:
            note = _float_note(graph, v, mode, quantizable)
        consumers = tuple(dict.fromkeys(graph.ops[r].name for r in val.readers))
        if v in graph.outputs:
            consumers += ("model output",)
        start, end = life[v]
        convention = (
            not counted and pattern is None and (prod is None or "pool" in prod.target.lower())
        )
        sites.append(Site(name, _producer_text(graph, v), consumers, val.numel, val.nonneg,
                          counted, q, at, note, convention, start, end))  # fmt: skip
    counted_sites = [s for s in sites if s.counted]
    alive = torch.tensor([[float(s.start <= k <= s.end) for s in counted_sites] for k in steps])
    return SiteTable(mode, sites, [graph.ops[k].name for k in steps],
                     alive.reshape(len(steps), len(counted_sites)))  # fmt: skip


def table_of(model: nn.Module) -> SiteTable | None:
    """The site table recorded on ``model`` (or on a wrapped submodule), None if never recorded."""
    t = model.__dict__.get("mixq_sites")
    if t is not None:
        return t
    for m in model.modules():
        t = m.__dict__.get("mixq_sites")
        if t is not None:
            return t
    return None


__all__ = ["SITE_MODES", "Site", "SiteTable", "build_table", "candidates", "reader_groups",
           "table_of"]  # fmt: skip
