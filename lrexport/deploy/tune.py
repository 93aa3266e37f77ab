"""Per-layer deployment chosen by measured latency (DESIGN §6: MACs do not predict time).

For every decomposed conv the candidates are: the dense conv, and the thin pair at the
energy rule's rank r_e and at r_e rounded up to multiples of 8, 16 and 32 (below
break-even). Each candidate is built as a one-layer ONNX model with the geometry the
export gives it (conv1 → conv2 of the pair, or one conv, bias as after BN folding), set
between cheap depthwise stand-ins for its neighbours (so that layout reorders land where
they would in the network), and timed on the target runtime at the deployment's batch and
input shape: warm-up, then rounds interleaved across the layer's candidates, median per
candidate, less the stand-ins' own time.

``choose`` then keeps the fastest candidate that does not change the model: dense, or a
pair at a rank ≥ r_e (zero-padding a pair upward changes no output). Where the recipe allows
it (``prune.tune_below``), r_e rounded *down* to each multiple is a candidate too; such a
choice changes the model, so the export keeps it only where validation accuracy confirms it
(``lrexport.deploy.below``) and otherwise falls back to the fastest choice at ranks ≥ r_e.

Times are cached in a JSON file keyed by layer geometry, candidate, runtime, provider,
runtime version, CPU, threads and batch, so a second export (or another model with the
same layer shapes) times nothing twice.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LrexportError, RuntimeMissingError
from ..train.checkpoint import atomic_write_text
from .latency import LatencyStats, time_rounds

CACHE_FILE = "tune_cache.json"
CACHE_VERSION = 3  # 2: candidates timed between depthwise contexts; 3: worker threads spin during runs
DENSE = "dense"
RUNTIMES = ("ort",)
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
        from ..lowrank.macs import conv_out

        return tuple(conv_out(self.in_hw[i], (self.kh, self.kw)[i], self.stride[i], self.padding[i], self.dilation[i])
                     for i in (0, 1))

    def macs(self, rank: int | None) -> int:
        """MACs per image of the dense conv (``rank=None``) or the pair at ``rank``."""
        from ..lowrank import macs as M

        out_hw = self.out_hw
        if rank is None:
            return M.dense_conv_macs(self.c, self.n, self.kh, self.kw, out_hw)
        if self.mode == "channel":
            return M.channel_macs(self.c, self.n, self.kh, self.kw, rank, out_hw)
        return M.spatial_macs(self.c, self.n, self.kh, self.kw, rank, out_hw, mid_w=self.in_hw[1])


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
    from ..lowrank.rewrite import plan_layers
    from ..lowrank.svd_layers import SVDConv2d

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
        return Choice(fb.name, fb.choice, fb.ms, fb.default, fb.default_ms, fb.macs, fb.reason + note, self.times_ms, fb.energy_rank)

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


def layer_onnx(shape: LayerShape, candidate: str | int, batch: int, opset: int = 17, seed: int = 0, context: bool = True):
    """A one-layer ONNX model: the dense conv, or the thin pair at ``candidate`` rank, as exported.

    The last conv carries a bias, as every conv has after BatchNorm folding. With ``context``
    the layer sits between two depthwise 1×1 convs (on its input and its output, where they
    have ≥ 16 channels), which stand in for its neighbours: onnxruntime's CPU provider runs
    convs in a channel-blocked layout (NCHWc) and inserts layout reorders around ops that
    cannot use it (e.g. a conv whose input channels are not a multiple of 4). In a network
    those reorders sit between the layer and its neighbours; alone, a layer would be charged
    the reorders at the graph's edges instead, which favours the misaligned ranks.
    ``CONTEXT_IN`` / ``CONTEXT_OUT`` build the contexts alone (two depthwise convs each), to
    subtract half of each from the layer's time.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c, n, kh, kw = shape.c, shape.n, shape.kh, shape.kw
    (sh, sw), (ph, pw), (dh, dw) = shape.stride, shape.padding, shape.dilation
    inits, nodes = [], []

    def conv(name, x, out, w_shape, strides=(1, 1), pads=(0, 0), dilations=(1, 1), bias=False, group=1):
        w = rng.standard_normal(w_shape, dtype=np.float32) * 0.05
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inputs = [x, f"{name}.w"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(w_shape[0], dtype=np.float32), f"{name}.b"))
            inputs.append(f"{name}.b")
        nodes.append(helper.make_node("Conv", inputs, [out], name=name, kernel_shape=list(w_shape[2:]), strides=list(strides),
                                      pads=[pads[0], pads[1], pads[0], pads[1]], dilations=list(dilations), group=group))

    def depthwise(name, x, out, channels):
        conv(name, x, out, (channels, 1, 1, 1), bias=True, group=channels)

    if candidate in (CONTEXT_IN, CONTEXT_OUT):
        channels, hw = (c, shape.in_hw) if candidate == CONTEXT_IN else (n, shape.out_hw)
        depthwise("ctx1", "x", "mid", channels)
        depthwise("ctx2", "mid", "y", channels)
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, *hw])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, *hw])]
    else:
        pre = context and CONTEXT_IN in contexts(shape)
        post = context and CONTEXT_OUT in contexts(shape)
        if pre:
            depthwise("pre", "x", "x1", c)
        src, dst = ("x1" if pre else "x"), ("y1" if post else "y")
        if candidate == DENSE:
            conv("conv", src, dst, (n, c, kh, kw), (sh, sw), (ph, pw), (dh, dw), True)
        else:
            r = int(candidate)
            if shape.mode == "channel":
                conv("conv1", src, "mid", (r, c, kh, kw), (sh, sw), (ph, pw), (dh, dw))
                conv("conv2", "mid", dst, (n, r, 1, 1), bias=True)
            else:
                conv("conv1", src, "mid", (r, c, kh, 1), (sh, 1), (ph, 0), (dh, 1))
                conv("conv2", "mid", dst, (n, r, 1, kw), (1, sw), (0, pw), (1, dw), True)
        if post:
            depthwise("post", "y1", "y", n)
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, *shape.in_hw])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n, *shape.out_hw])]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


# -- timing on the runtime -----------------------------------------------------------------------
def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@dataclass
class Target:
    """Where the deployment runs: what a cached time is only valid for."""

    runtime: str = "ort"
    threads: int = 1
    batch: int = 1
    precision: str = "fp32"
    provider: str = "CPUExecutionProvider"
    version: str = ""
    device: str = ""

    def key(self) -> str:
        return f"{self.runtime}-{self.version}:{self.provider}:{self.device}:{self.precision}:t{self.threads}:b{self.batch}"


def ort_target(threads: int | None = None, batch: int = 1) -> Target:
    import onnxruntime

    return Target("ort", threads or os.cpu_count() or 1, batch, "fp32", "CPUExecutionProvider", onnxruntime.__version__, cpu_name())


def time_candidates(shape: LayerShape, candidates, target: Target, warmup: int = 3, budget_ms: float = 1500.0,
                    min_repeats: int = 9, max_repeats: int = 40) -> dict[str | int, LatencyStats]:
    """Latency of each candidate deployment of one layer on ``target`` (onnxruntime).

    Rounds are interleaved across candidates (a slow spell of a shared machine hits all
    alike); their number fits ``budget_ms`` of timed calls, within [min_repeats, max_repeats].
    """
    if target.runtime != "ort":
        raise RuntimeMissingError(f"tuning on runtime {target.runtime!r} is not implemented (only ort)")
    from .runtime import OrtRunner

    rng = np.random.default_rng(1)
    inputs = {
        (shape.c, *shape.in_hw): rng.standard_normal((target.batch, shape.c, *shape.in_hw), dtype=np.float32),
        (shape.n, *shape.out_hw): rng.standard_normal((target.batch, shape.n, *shape.out_hw), dtype=np.float32),
    }
    runners = {}
    for cand in candidates:
        runner = OrtRunner(layer_onnx(shape, cand, target.batch).SerializeToString(), target.threads)
        xi = inputs[(shape.n, *shape.out_hw) if cand == CONTEXT_OUT else (shape.c, *shape.in_hw)]
        runners[cand] = lambda _, run=runner.run, xi=xi: run(xi)  # each candidate on its own input (x unused)
    probe = time_rounds(runners, None, warmup=warmup, repeats=1)
    round_ms = sum(t[0] for t in probe.values())
    repeats = int(min(max_repeats, max(min_repeats, budget_ms / max(round_ms, 1e-3))))
    times = time_rounds(runners, None, warmup=0, repeats=repeats)
    return {cand: LatencyStats.from_ms(target.batch, t) for cand, t in times.items()}


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
    def key(target: Target, shape: LayerShape, candidate) -> str:
        return f"{target.key()}|{shape.key()}|{candidate}"

    def get(self, target: Target, shape: LayerShape, candidate) -> dict | None:
        return self.entries.get(self.key(target, shape, candidate))

    def put(self, target: Target, shape: LayerShape, candidate, stats: LatencyStats) -> None:
        self.entries[self.key(target, shape, candidate)] = {
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
    end_to_end: "EndToEnd | None" = None  # whole-model check of the tuned plan against the untuned one
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

    @property
    def default_plan(self) -> dict[str, str | int]:
        return {c.name: c.default for c in self.choices}

    @property
    def deployed(self) -> str:
        """"tuned", or "untuned" where the whole tuned model measured slower than the untuned one."""
        return self.end_to_end.deployed if self.end_to_end is not None else "tuned"

    def predicted(self) -> dict:
        """Sums of per-layer times (decomposed convs only): the deployed, tuned, untuned and dense models."""
        tuned, untuned = sum(c.ms for c in self.choices), sum(c.default_ms for c in self.choices)
        return {
            "batch": self.target.batch,
            "lowrank_ms": tuned if self.deployed == "tuned" else untuned,
            "tuned_ms": tuned,
            "untuned_ms": untuned,
            "dense_ms": sum(c.times_ms[DENSE] for c in self.choices),
            "layers": len(self.choices),
            "note": "sum of the decomposed convs' one-layer times; other ops (pooling, adds, fc, undecomposed convs) not included",
        }

    def to_dict(self) -> dict:
        return {
            "target": asdict(self.target), "margin": self.margin, "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses, "seconds": self.seconds, "predicted": self.predicted(),
            "rule": "fastest of dense and pairs at ranks ≥ the energy rank; the default kept within the margin"
                    + ("; a pair below the energy rank where faster by more than the margin and validation accuracy confirms it"
                       if self.below else ""),
            "deployed": self.deployed, "below_check": self.below_check,
            "end_to_end": None if self.end_to_end is None else self.end_to_end.to_dict(),
            "layers": [c.to_dict() for c in self.choices],
        }


@dataclass
class EndToEnd:
    """The whole tuned and untuned low-rank models timed side by side: one-layer times miss the
    layout changes (reorders) between neighbouring convs, so a plan must also win as a whole."""

    tuned_ms: float
    untuned_ms: float
    tuned_min_ms: float
    untuned_min_ms: float
    speedup: float  # median over interleaved rounds of untuned time / tuned time
    repeats: int

    @property
    def deployed(self) -> str:
        return "tuned" if self.speedup >= 1.0 else "untuned"

    def to_dict(self) -> dict:
        return asdict(self) | {"deployed": self.deployed}


def end_to_end(tuned_model: bytes, untuned_model: bytes, input_size, target: Target, warmup: int = 5,
               budget_ms: float = 6000.0, min_repeats: int = 21, max_repeats: int = 80) -> EndToEnd:
    """Time the two whole ONNX models (serialized) at ``target``'s batch, interleaved."""
    if target.runtime != "ort":
        raise RuntimeMissingError(f"tuning on runtime {target.runtime!r} is not implemented (only ort)")
    from .runtime import OrtRunner

    runners = {name: OrtRunner(m, target.threads).run for name, m in (("tuned", tuned_model), ("untuned", untuned_model))}
    x = np.random.default_rng(2).standard_normal((target.batch, *input_size), dtype=np.float32)
    probe = time_rounds(runners, x, warmup=warmup, repeats=1)
    round_ms = sum(t[0] for t in probe.values())
    repeats = int(min(max_repeats, max(min_repeats, budget_ms / max(round_ms, 1e-3))))
    times = time_rounds(runners, x, warmup=0, repeats=repeats)
    t, u = np.asarray(times["tuned"]), np.asarray(times["untuned"])
    return EndToEnd(float(np.median(t)), float(np.median(u)), float(t.min()), float(u.min()), float(np.median(u / t)), repeats)


def tune(layers: list[TuneLayer], target: Target, cache: TuneCache | None = None, margin: float = 0.02,
         multiples=MULTIPLES, progress=None, below: bool = False, **timing) -> TuneResult:
    """Time every candidate of every layer on ``target`` (cached ones excepted) and choose per layer.

    ``below``: ranks below the energy rank are candidates too (see ``choose``).

    ``progress(name, choice)`` is called after each layer (the CLI draws it). ``timing`` goes
    to ``time_candidates`` (warmup, budget_ms, min_repeats, max_repeats).
    """
    cache = cache if cache is not None else TuneCache(None)
    start = time.perf_counter()
    hits = misses = 0
    choices = []
    for layer in layers:
        cands = layer.candidates(multiples, below)
        ctx = contexts(layer.shape)
        raw, todo = {}, []
        for cand in cands + ctx:
            entry = cache.get(target, layer.shape, cand)
            if entry is None:
                todo.append(cand)
            else:
                raw[cand] = entry["median_ms"]
        hits += len(cands) - len([c for c in todo if c not in ctx])
        misses += len([c for c in todo if c not in ctx])
        if todo:
            for cand, stats in time_candidates(layer.shape, todo, target, **timing).items():
                cache.put(target, layer.shape, cand, stats)
                raw[cand] = stats.median_ms
            cache.save()  # per layer: an interrupted tune keeps what it timed
        # a candidate in context, less half of each context's own two depthwise convs (and their reorders)
        overhead = 0.5 * sum(raw[c] for c in ctx)
        times = {cand: max(raw[cand] - overhead, 1e-6) for cand in cands}
        choice = choose(times, layer, margin, below)
        choices.append(choice)
        if progress is not None:
            progress(layer.name, choice)
    return TuneResult(target, choices, hits, misses, time.perf_counter() - start, margin, below=below)


def tune_model(model, input_size, batch: int = 1, threads: int | None = None, runtime: str = "ort",
               cache_path: str | Path | None = None, multiple_of: int = 8, margin: float = 0.02, progress=None,
               below: bool = False, **timing) -> TuneResult:
    """Tune every decomposed conv of ``model`` at ``input_size`` (C, H, W) and ``batch`` on ``runtime``."""
    if runtime not in RUNTIMES:
        raise RuntimeMissingError(f"--tune supports runtime {', '.join(RUNTIMES)} here; {runtime!r} is not implemented")
    if batch < 1:
        raise LrexportError(f"tune batch must be ≥ 1; got {batch}")
    target = ort_target(threads, batch)
    return tune(tune_layers_of(model, input_size, multiple_of), target, TuneCache(cache_path), margin,
                progress=progress, below=below, **timing)
