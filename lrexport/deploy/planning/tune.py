"""Per-layer deployment chosen by measured latency (DESIGN §6: MACs do not predict time).

For every decomposed conv the candidates are: the dense conv, and the thin pair at the
energy rule's rank r_e and at r_e rounded up to multiples of 8, 16 and 32 (below
break-even). Each candidate is built as a one-layer ONNX model with the geometry the
export gives it (conv1 → conv2 of the pair, or one conv, bias as after BN folding), set
between cheap depthwise stand-ins for its neighbours (so that layout reorders land where
they would in the network), and timed on the target runtime (any backend of
``lrexport.deploy.backends`` that times layers alone) at each deployment batch and input shape: warm-up, then rounds
interleaved across the layer's candidates, median per candidate, less the stand-ins' own
time. A layer's candidates are compared by the sum of their times over the batches. All layers'
uncached candidates, at every batch, are opened with one ``open_runners`` call before any is timed
(a runtime that lowers or converts each model prepares them together); they are timed layer by layer.

``choose`` then keeps the fastest candidate that does not change the model: dense, or a
pair at a rank ≥ r_e (zero-padding a pair upward changes no output). Where the recipe allows
it (``prune.tune_below``), r_e rounded *down* to each multiple is a candidate too; such a
choice changes the model, so the export keeps it only where validation accuracy confirms it
(``lrexport.deploy.planning.below``) and otherwise falls back to the fastest choice at ranks ≥ r_e.

Times are cached in a JSON file keyed by layer geometry, candidate, runtime, provider,
runtime version, device (the CPU or GPU), threads, precision, layout and batch, so a second export (or another model with the
same layer shapes) times nothing twice.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ...errors import LrexportError, RuntimeMissingError
from ...io import atomic_write_text
from ...progress import LayerTuned, Message, Progress, quiet
from ..backends import ModelSource, RuntimeOptions, get_runtime, open_runner, open_runners
from ..timing import CUDA_EVENTS, Stats, interleave_within

CACHE_FILE = "tune_cache.json"
CACHE_VERSION = 6  # 2: candidates timed between depthwise contexts; 3: worker threads spin during runs; 4: any runtime; 5: the CPU named with its vector extensions; 6: rounds in drawn orders
DENSE = "dense"
MULTIPLES = (8, 16, 32)


# -- the layers and their candidates ----------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """Geometry of one decomposed conv as deployed: what its time depends on."""

    mode: str  # "channel" or "spatial"
    c: int
    n: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_hw: tuple[int, int]

    def key(self) -> str:
        return (f"{self.mode}:c{self.c}:n{self.n}:k{self.kh}x{self.kw}:s{self.stride[0]}x{self.stride[1]}"
                f":p{self.padding[0]}x{self.padding[1]}:d{self.dilation[0]}x{self.dilation[1]}:hw{self.in_hw[0]}x{self.in_hw[1]}")

    @property
    def out_hw(self) -> tuple[int, int]:
        from ...lowrank.macs import conv_out

        return tuple(conv_out(self.in_hw[i], (self.kh, self.kw)[i], self.stride[i], self.padding[i], self.dilation[i])
                     for i in (0, 1))

    def macs(self, rank: int | None) -> int:
        """MACs per image of the dense conv (``rank=None``) or the pair at ``rank``."""
        from ...lowrank.svd_layers import conv_macs

        dense, pair = conv_macs(self.c, self.n, (self.kh, self.kw), self.stride, self.padding, self.dilation, self.mode,
                                self.in_hw, rank or 1)
        return dense if rank is None else pair


@dataclass
class TuneLayer:
    """One decomposed conv: its shape, the energy rule's rank and the untuned export's choice."""

    name: str
    shape: LayerShape
    energy_rank: int  # the rank as trained (the energy rule's)
    full_rank: int
    break_even: int
    default: str | int  # what the export does without tuning: DENSE or the aligned rank

    def candidates(self, multiples=MULTIPLES, below: bool = False) -> list[str | int]:
        """DENSE, r_e and r_e rounded up (``below``: and down) to each multiple, pairs only below
        break-even; the default always."""
        ranks = {self.energy_rank} | {math.ceil(self.energy_rank / m) * m for m in multiples}
        if below:
            ranks |= {self.energy_rank // m * m for m in multiples if self.energy_rank >= m}
        ranks = sorted(r for r in ranks if r < self.break_even and r <= self.full_rank)
        out: list[str | int] = [DENSE, *ranks]
        if self.default not in out:
            out.append(self.default)
        return out

    def macs(self, candidate: str | int) -> int:
        return self.shape.macs(None if candidate == DENSE else int(candidate))


def tune_layers_of(model, input_size, multiple_of: int = 8) -> list[TuneLayer]:
    """The decomposed convs of ``model`` (SVD linears are left to the default rule)."""
    from ...lowrank.rewrite import plan_layers
    from ...lowrank.svd_layers import SVDConv2d

    modules = dict(model.named_modules())
    layers = []
    for plan in plan_layers(model, input_size, multiple_of):
        layer = modules[plan.name]
        if not isinstance(layer, SVDConv2d):
            continue
        shape = LayerShape(layer.mode, layer.in_channels, layer.out_channels, *layer.kernel_size,
                           tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), tuple(plan.in_hw))
        default = DENSE if plan.dense else plan.deployed_rank
        layers.append(TuneLayer(plan.name, shape, plan.rank, plan.full_rank, plan.break_even, default))
    return layers


# -- choosing ---------------------------------------------------------------------------------
@dataclass
class Choice:
    name: str
    choice: str | int  # DENSE or the deployed rank
    ms: float
    default: str | int
    default_ms: float
    macs: int
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)
    energy_rank: int = 0
    batch_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # batch → candidate → ms (``times_ms`` sums them)
    # for a choice below the energy rank: the fastest choice at ranks ≥ it, deployed if accuracy does not confirm
    fallback: "Choice | None" = None

    @property
    def dense(self) -> bool:
        return self.choice == DENSE

    @property
    def below(self) -> bool:
        """A pair at a rank below the energy rule's: it changes the model."""
        return not self.dense and int(self.choice) < self.energy_rank

    def reverted(self) -> "Choice":
        """The fallback, saying why: the rank below r_e did not hold validation accuracy."""
        fb = self.fallback
        note = f"; {_label(self.choice)} (below the energy rank {self.energy_rank}, {self.ms:.3f} ms) reverted: validation accuracy fell too far"
        return Choice(fb.name, fb.choice, fb.ms, fb.default, fb.default_ms, fb.macs, fb.reason + note, self.times_ms, fb.energy_rank,
                      self.batch_ms)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fallback"] = None if self.fallback is None else self.fallback.choice
        return d


def _label(c: str | int) -> str:
    return DENSE if c == DENSE else f"pair r={c}"


def choose(times: dict, layer: TuneLayer, margin: float = 0.02, below: bool = False) -> Choice:
    """The deployment of ``layer`` given ``times`` (candidate → ms; keys DENSE or ranks, str or int).

    Eligible: DENSE, and pairs at ranks ≥ the energy rank (lower ranks change the model).
    The fastest eligible candidate wins, unless the untuned default is within ``margin``
    (relative) of it: a change must be measurably faster, not noise. With ``below``, a pair
    below the energy rank wins if it is faster than that choice by more than ``margin``; it
    carries that choice as its ``fallback``. Pure: no timing here.
    """
    safe = _choose_preserving(times, layer, margin)
    lower = {int(k): float(ms) for k, ms in times.items() if k != DENSE and int(k) < layer.energy_rank}
    if not below or not lower:
        return safe
    rank = min(lower, key=lambda r: (lower[r], r))
    if not lower[rank] < safe.ms * (1 - margin):
        return safe
    reason = (f"{_label(rank)} fastest at {lower[rank]:.3f} ms, below the energy rank {layer.energy_rank}: "
              f"{100 * (1 - lower[rank] / safe.ms):.0f}% faster than {_label(safe.choice)} {safe.ms:.3f} ms; "
              "kept only if validation accuracy confirms it")
    table = {str(r): ms for r, ms in sorted(lower.items())} | safe.times_ms
    return Choice(layer.name, rank, lower[rank], layer.default, safe.default_ms, layer.macs(rank), reason, table,
                  layer.energy_rank, fallback=safe)


def _choose_preserving(times: dict, layer: TuneLayer, margin: float) -> Choice:
    """``choose`` among the candidates that leave the model's output unchanged."""
    table: dict[str | int, float] = {}
    for key, ms in times.items():
        cand = DENSE if key == DENSE else int(key)
        if cand == DENSE or cand >= layer.energy_rank:
            table[cand] = float(ms)
    if not table:
        raise LrexportError(f"no timed candidate for layer {layer.name} (need dense or a rank ≥ {layer.energy_rank})")
    best = min(table, key=lambda c: (table[c], layer.macs(c)))
    default_ms = table.get(layer.default, math.nan)
    others = sorted((c for c in table if c != best), key=lambda c: table[c])
    if layer.default in table and default_ms <= table[best] * (1 + margin):
        pick = layer.default
        if pick == best:
            nxt = f"; next {_label(others[0])} {table[others[0]]:.3f} ms" if others else ""
            reason = f"default {_label(pick)} fastest of {len(table)} at {default_ms:.3f} ms{nxt}"
        else:
            reason = (f"default {_label(pick)} kept at {default_ms:.3f} ms: within {100 * margin:g}% of the fastest, "
                      f"{_label(best)} {table[best]:.3f} ms")
    else:
        pick = best
        if layer.default in table:
            vs = f"default {_label(layer.default)} {default_ms:.3f} ms ({100 * (1 - table[pick] / default_ms):.0f}% faster)"
        else:
            vs = f"default {_label(layer.default)} not timed"
        reason = f"{_label(pick)} fastest of {len(table)} at {table[pick]:.3f} ms vs {vs}"
    return Choice(
        layer.name, pick, table[pick], layer.default, default_ms, layer.macs(pick), reason,
        {str(c): table[c] for c in sorted(table, key=lambda c: (c != DENSE, 0 if c == DENSE else c))}, layer.energy_rank,
    )


# -- one-layer ONNX models ----------------------------------------------------------------------
CONTEXT_IN, CONTEXT_OUT = "context-in", "context-out"
CONTEXT_MIN_CHANNELS = 16  # below this a neighbour would not keep a blocked layout either


def contexts(shape: LayerShape) -> list[str]:
    """The context-only models a layer's times are corrected by (see ``layer_onnx``)."""
    return ([CONTEXT_IN] if shape.c >= CONTEXT_MIN_CHANNELS else []) + ([CONTEXT_OUT] if shape.n >= CONTEXT_MIN_CHANNELS else [])


class _ConvGraph:
    """Conv nodes with random weights, built into a one-input ("x"), one-output ("y") ONNX model."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.inits, self.nodes = [], []

    def conv(self, name, x, out, w_shape, strides=(1, 1), pads=(0, 0), dilations=(1, 1), bias=False, group=1):
        from onnx import helper, numpy_helper

        w = self.rng.standard_normal(w_shape, dtype=np.float32) * 0.05
        self.inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inputs = [x, f"{name}.w"]
        if bias:
            self.inits.append(numpy_helper.from_array(self.rng.standard_normal(w_shape[0], dtype=np.float32), f"{name}.b"))
            inputs.append(f"{name}.b")
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=name, kernel_shape=list(w_shape[2:]),
                                           strides=list(strides), pads=[pads[0], pads[1], pads[0], pads[1]],
                                           dilations=list(dilations), group=group))

    def depthwise(self, name, x, out, channels):
        self.conv(name, x, out, (channels, 1, 1, 1), bias=True, group=channels)

    def model(self, in_shape, out_shape, opset: int):
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(self.nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 8)
        onnx.checker.check_model(model)
        return model


def _candidate_convs(g: _ConvGraph, shape: LayerShape, candidate, src: str, dst: str) -> None:
    """The dense conv, or the thin pair at rank ``candidate``, with the geometry the export gives it."""
    c, n, kh, kw = shape.c, shape.n, shape.kh, shape.kw
    (sh, sw), (ph, pw), (dh, dw) = shape.stride, shape.padding, shape.dilation
    if candidate == DENSE:
        g.conv("conv", src, dst, (n, c, kh, kw), (sh, sw), (ph, pw), (dh, dw), True)
    elif shape.mode == "channel":
        g.conv("conv1", src, "mid", (int(candidate), c, kh, kw), (sh, sw), (ph, pw), (dh, dw))
        g.conv("conv2", "mid", dst, (n, int(candidate), 1, 1), bias=True)
    else:
        g.conv("conv1", src, "mid", (int(candidate), c, kh, 1), (sh, 1), (ph, 0), (dh, 1))
        g.conv("conv2", "mid", dst, (n, int(candidate), 1, kw), (1, sw), (0, pw), (1, dw), True)


def layer_onnx(shape: LayerShape, candidate: str | int, batch: int, opset: int = 17, seed: int = 0, context: bool = True):
    """A one-layer ONNX model: the dense conv, or the thin pair at ``candidate`` rank, as exported.

    The last conv carries a bias, as every conv has after BatchNorm folding. With ``context``
    the layer sits between two depthwise 1×1 convs (on its input and its output, where they
    have ≥ 16 channels), which stand in for its neighbours: CPU runtimes run convs in a
    channel-blocked layout (NCHWc) and insert layout reorders around ops that
    cannot use it (e.g. a conv whose input channels are not a multiple of 4). In a network
    those reorders sit between the layer and its neighbours; alone, a layer would be charged
    the reorders at the graph's edges instead, which favours the misaligned ranks.
    ``CONTEXT_IN`` / ``CONTEXT_OUT`` build the contexts alone (two depthwise convs each), to
    subtract half of each from the layer's time.
    """
    g = _ConvGraph(seed)
    if candidate in (CONTEXT_IN, CONTEXT_OUT):
        channels, hw = (shape.c, shape.in_hw) if candidate == CONTEXT_IN else (shape.n, shape.out_hw)
        g.depthwise("ctx1", "x", "mid", channels)
        g.depthwise("ctx2", "mid", "y", channels)
        return g.model((batch, channels, *hw), (batch, channels, *hw), opset)
    pre = context and CONTEXT_IN in contexts(shape)
    post = context and CONTEXT_OUT in contexts(shape)
    if pre:
        g.depthwise("pre", "x", "x1", shape.c)
    _candidate_convs(g, shape, candidate, "x1" if pre else "x", "y1" if post else "y")
    if post:
        g.depthwise("post", "y1", "y", shape.n)
    return g.model((batch, shape.c, *shape.in_hw), (batch, shape.n, *shape.out_hw), opset)


# -- timing on the runtime -----------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where the deployment runs: the runtime, its settings as its runner reports them, the batches."""

    runtime: str
    options: RuntimeOptions
    settings: dict
    batches: tuple[int, ...]

    def key(self, batch: int) -> str:
        """What a cached time is only valid for: runtime, version, device (the CPU with its vector extensions, or the
        GPU: a home directory, and its cache, can move to another machine), provider, threads, precision, layout, batch."""
        s = self.settings
        return (f"{s['runtime']}-{s['version']}:{s['provider']}:{s['device']}:{s['precision']}:t{s['threads']}"
                f":cl{int(bool(s.get('channels_last')))}:b{batch}")

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, **self.settings, "batches": list(self.batches)}


def layer_source(shape: LayerShape, candidate, batch: int, runtime: str, precision: str = "fp32") -> ModelSource:
    """One candidate as ``runtime`` takes it (``Backend.timing_source``): its one-layer ONNX graph, and the same
    convs as PyTorch modules."""
    from ..onnx_graph import conv_chain_module

    proto = layer_onnx(shape, candidate, batch)
    input_shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    source = get_runtime(runtime).timing_source(precision, lambda: proto, lambda: conv_chain_module(proto), input_shape,
                                                f"candidate {candidate}")
    return replace(source, input_shape=tuple(input_shape))  # timed at this shape only: runtimes may prepare it ahead


def make_target(runtime: str, options: RuntimeOptions, batches) -> Target:
    """The target of ``runtime`` here, its settings read off a runner of a small layer."""
    batches = tuple(int(b) for b in batches)
    if not batches or min(batches) < 1:
        raise LrexportError(f"tune batches must be ≥ 1; got {list(batches)}")
    if not get_runtime(runtime).entry.tunable(options.device):
        raise RuntimeMissingError(f"per-layer tuning on {runtime} is not implemented; export with --no-tune")
    probe = LayerShape("channel", 8, 8, 1, 1, (1, 1), (0, 0), (1, 1), (4, 4))
    settings = open_runner(runtime, layer_source(probe, DENSE, 1, runtime, options.precision), options).settings()
    return Target(runtime, options, settings, batches)


def open_candidates(jobs, target: Target, cache: "TuneCache", progress: Progress = quiet) -> dict[int, dict]:
    """Runners of every candidate (and context) of ``jobs`` (per layer: its shape and candidates) not in ``cache``,
    at each of the target's batches, opened together (``open_runners``: a runtime with a large fixed cost per
    model prepares them at once); batch → (shape key, candidate) → runner. A shape shared by layers is opened once."""
    sources = {}
    for b in target.batches:
        for shape, cands in jobs:
            for cand in [*cands, *contexts(shape)]:
                key = (b, shape.key(), cand)
                if key not in sources and cache.get(target, b, shape, cand) is None:
                    sources[key] = layer_source(shape, cand, b, target.runtime, target.options.precision)
    if not sources:
        return {}
    progress(Message(f"  tune: preparing {len(sources)} candidates on {target.runtime} at batches "
                     f"{', '.join(str(b) for b in target.batches)}"))
    runners = {}
    for (b, *key), runner in open_runners(target.runtime, sources, target.options, progress).items():
        runners.setdefault(b, {})[tuple(key)] = runner
    return runners


def time_candidates(shape: LayerShape, candidates, target: Target, batch: int, warmup: int = 3, budget_ms: float = 1500.0,
                    min_repeats: int = 9, max_repeats: int = 40, runners: dict | None = None) -> dict[str | int, Stats]:
    """Latency of each candidate deployment of one layer on ``target`` at ``batch``.

    Rounds are interleaved across candidates (a slow spell of a shared machine hits all
    alike); their number fits ``budget_ms`` of timed calls, within [min_repeats, max_repeats].
    ``runners``: opened ahead (``open_candidates``' for this batch); each one used is taken out of it, the others opened here.
    """
    rng = np.random.default_rng(1)
    inputs = {
        CONTEXT_OUT: rng.standard_normal((batch, shape.n, *shape.out_hw), dtype=np.float32),
        "in": rng.standard_normal((batch, shape.c, *shape.in_hw), dtype=np.float32),
    }
    calls, clock = {}, None
    for cand in candidates:
        runner = (runners or {}).pop((shape.key(), cand), None) or open_runner(
            target.runtime, layer_source(shape, cand, batch, target.runtime, target.options.precision), target.options)
        calls[cand] = runner.bind(inputs[CONTEXT_OUT if cand == CONTEXT_OUT else "in"])
        clock = runner.clock
    timed = interleave_within(calls, budget_ms, min_repeats, max_repeats, warmup, cuda=clock == CUDA_EVENTS)
    return {cand: timed.stats(cand, batch) for cand in candidates}


# -- cache ------------------------------------------------------------------------------------------
class TuneCache:
    """Timed candidates in a JSON file: key "target|layer shape|candidate" → latency stats."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, OSError):
                data = {}  # a damaged cache only costs a re-time
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                self.entries = dict(data.get("entries", {}))

    @staticmethod
    def key(target: Target, batch: int, shape: LayerShape, candidate) -> str:
        return f"{target.key(batch)}|{shape.key()}|{candidate}"

    def get(self, target: Target, batch: int, shape: LayerShape, candidate) -> dict | None:
        return self.entries.get(self.key(target, batch, shape, candidate))

    def put(self, target: Target, batch: int, shape: LayerShape, candidate, stats: Stats) -> None:
        self.entries[self.key(target, batch, shape, candidate)] = {
            "median_ms": stats.median_ms, "min_ms": stats.min_ms, "p90_ms": stats.p90_ms, "repeats": stats.repeats,
        }

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1, sort_keys=True))


# -- the whole model ------------------------------------------------------------------------------
@dataclass
class TuneResult:
    target: Target
    choices: list[Choice]
    cache_hits: int
    cache_misses: int
    seconds: float
    margin: float
    below: bool = False  # ranks below the energy rule's were candidates
    below_check: dict | None = None  # the validation-accuracy check of the choices below it

    def below_ranks(self) -> dict[str, int]:
        """name → rank of the choices below the energy rank (not yet confirmed by accuracy)."""
        return {c.name: int(c.choice) for c in self.choices if c.below}

    def revert(self, names) -> None:
        """Replace the named choices below the energy rank by their fallbacks."""
        names = set(names)
        self.choices = [c.reverted() if c.name in names and c.below else c for c in self.choices]

    @property
    def plan(self) -> dict[str, str | int]:
        """name → DENSE or rank, for ``to_plain(..., plan=...)``: the per-layer choices."""
        return {c.name: c.choice for c in self.choices}

    def predicted(self) -> list[dict]:
        """Per batch, sums of one-layer times (decomposed convs only): the tuned, untuned and dense plans."""
        rows = []
        for b in self.target.batches:
            def total(pick) -> float:
                return sum(c.batch_ms.get(str(b), {}).get(str(pick(c)), math.nan) for c in self.choices)

            rows.append({"batch": b, "tuned_ms": total(lambda c: c.choice), "untuned_ms": total(lambda c: c.default),
                         "dense_ms": total(lambda c: DENSE)})
        return rows

    def to_dict(self) -> dict:
        return {
            "target": self.target.to_dict(), "margin": self.margin, "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses, "seconds": self.seconds, "predicted": self.predicted(),
            "predicted_note": "sums of the decomposed convs' one-layer times; other ops (pooling, adds, fc, undecomposed convs) not included",
            "rule": "fastest of dense and pairs at ranks ≥ the energy rank over the tune batches; the default kept within the margin"
                    + ("; a pair below the energy rank where faster by more than the margin and validation accuracy confirms it"
                       if self.below else ""),
            "below_check": self.below_check,
            "layers": [c.to_dict() for c in self.choices],
        }


def layer_times(layer: TuneLayer, cands, target: Target, batch: int, cache: TuneCache, stat: str = "median_ms",
                **timing) -> tuple[dict, int]:
    """Candidate → ms of one layer at ``batch`` (timed or cached), less its contexts' share; and how many were timed.

    ``stat``: "median_ms", or "min_ms" (the least disturbed call: robust to other load on a shared machine).
    ``timing`` goes to ``time_candidates`` (its ``runners``: those ``open_candidates`` opened at ``batch``).
    """
    ctx = contexts(layer.shape)
    raw, todo = {}, []
    for cand in cands + ctx:
        entry = cache.get(target, batch, layer.shape, cand)
        if entry is None:
            todo.append(cand)
        else:
            raw[cand] = entry[stat]
    if todo:
        for cand, stats in time_candidates(layer.shape, todo, target, batch, **timing).items():
            cache.put(target, batch, layer.shape, cand, stats)
            raw[cand] = getattr(stats, stat)
        cache.save()  # per layer: an interrupted tune keeps what it timed
    # a candidate in context, less half of each context's own two depthwise convs (and their reorders)
    overhead = 0.5 * sum(raw[c] for c in ctx)
    return {cand: max(raw[cand] - overhead, 1e-6) for cand in cands}, len([c for c in todo if c not in ctx])


def tune(layers: list[TuneLayer], target: Target, cache: TuneCache | None = None, margin: float = 0.02,
         multiples=MULTIPLES, progress: Progress = quiet, below: bool = False, **timing) -> TuneResult:
    """Time every candidate of every layer on ``target`` at each of its batches (cached ones excepted)
    and choose per layer by the sum of its times over those batches.

    ``below``: ranks below the energy rank are candidates too (see ``choose``).
    ``progress`` hears a LayerTuned event after each layer (the CLI draws it). ``timing`` goes
    to ``time_candidates`` (warmup, budget_ms, min_repeats, max_repeats).
    """
    cache = cache if cache is not None else TuneCache(None)
    start = time.perf_counter()
    timed = total = 0
    choices = []
    runners = open_candidates([(layer.shape, layer.candidates(multiples, below)) for layer in layers], target, cache, progress)
    for layer in layers:
        cands = layer.candidates(multiples, below)
        total += len(cands) * len(target.batches)
        per_batch = {}
        for b in target.batches:
            per_batch[b], n = layer_times(layer, cands, target, b, cache, runners=runners.get(b), **timing)
            timed += n
        times = {cand: sum(per_batch[b][cand] for b in target.batches) for cand in cands}
        choice = choose(times, layer, margin, below)
        choice.batch_ms = {str(b): {str(c): t for c, t in per_batch[b].items()} for b in target.batches}
        choices.append(choice)
        progress(LayerTuned(layer.name, choice))
    return TuneResult(target, choices, total - timed, timed, time.perf_counter() - start, margin, below=below)


def tune_model(model, input_size, target: Target, cache_path: str | Path | None = None, multiple_of: int = 8,
               margin: float = 0.02, progress: Progress = quiet, below: bool = False, **timing) -> TuneResult:
    """Tune every decomposed conv of ``model`` at ``input_size`` (C, H, W) for ``target`` (see ``make_target``)."""
    return tune(tune_layers_of(model, input_size, multiple_of), target, TuneCache(cache_path), margin,
                progress=progress, below=below, **timing)
