"""The prune step that knows its target: each layer's rank from the runtime's measured latency.

For every decomposed conv, the dense conv and the thin pair at the grid ranks (multiples of
``grid`` and powers of two below it, from the lowest rank the per-layer cap admits up to
break-even; the energy rule's rank rounded up to the grid always among them) are timed on the target runtime at the
layer's real input shape, with the tuning machinery and its cache (lrexport.deploy.planning.tune).
A layer's time is its per-image time (its fastest timed call, robust to other load) summed
over the batches. lrexport.lowrank.allocate then
picks the ranks that minimise the summed time within the energy rule's budget, and the model
is truncated to them, before finetuning (DESIGN §8: choices that change the model belong there).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import LrexportError
from ...progress import LayerTimed, Message, Progress, quiet
from ...lowrank.allocate import DENSE, Allocation, LayerTable, allocate, discarded_curve, energy_budget
from ...lowrank.prune import PruneResult, check_energy, energy_rank, prune, rule_rank
from ..backends import RuntimeOptions
from .tune import TuneCache, TuneLayer, layer_times, make_target, open_candidates, tune_layers_of

MAX_CANDIDATES = 12  # pair ranks timed per layer: wide layers get a coarser multiple of the grid
TIMING = {"warmup": 3, "budget_ms": 300.0, "min_repeats": 7, "max_repeats": 30}


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how the ranks are measured (the recipe's ``prune.latency*`` keys)."""

    runtime: str
    batches: tuple[int, ...] = (1, 8)
    options: RuntimeOptions = RuntimeOptions()
    grid: int = 8
    cache: Path | None = None
    timing: dict = field(default_factory=lambda: dict(TIMING))
    # each candidate's fastest call: a ranking of many candidates must not follow one slow spell of a shared machine
    stat: str = "min_ms"


def cap_of(max_layer_energy: float | str, energy: float) -> float:
    """The per-layer cap on discarded energy: the recipe's value, or "auto" = 10·e."""
    return 10.0 * energy if max_layer_energy == "auto" else float(max_layer_energy)


def lowest_rank(s, cap: float) -> int:
    """The smallest rank that discards at most ``cap`` of the layer's energy."""
    return 1 if cap >= 1.0 else energy_rank(s, cap)


def on_grid(rank: int, grid: int) -> bool:
    """The rank grid: multiples of ``grid``, and powers of two below it (concentrated spectra keep very few values)."""
    return rank % grid == 0 or (rank < grid and rank & (rank - 1) == 0)


def grid_ranks(layer: TuneLayer, lowest: int, rule: int, grid: int, max_candidates: int = MAX_CANDIDATES) -> list[int]:
    """Pair ranks to time: grid ranks (multiples of ``grid`` coarser where there would be too
    many) in [lowest, break-even), and ``rule`` rounded up to the grid."""
    top = min(layer.break_even, layer.full_rank + 1)  # pairs below break-even only
    first = math.ceil(lowest / grid) * grid
    count = max(0, math.ceil((top - first) / grid))
    step = grid * max(1, math.ceil(count / max_candidates))
    ranks = {r for r in range(math.ceil(lowest / step) * step, top, step)}
    ranks |= {1 << k for k in range(grid.bit_length()) if lowest <= 1 << k < min(grid, top)}
    up = next((r for r in range(max(rule, lowest), top) if on_grid(r, grid)), None)
    if up is not None:
        ranks.add(up)
    return sorted(r for r in ranks if r >= 1)


def measure(layers: list[TuneLayer], ranks: dict[str, list[int]], config: LatencyConfig, progress: Progress = quiet) -> tuple[dict, dict]:
    """name → {DENSE or rank: ms per image summed over the batches}; and the target's description."""
    target = make_target(config.runtime, config.options, config.batches)
    cache = TuneCache(config.cache)
    tables, timed, asked = {}, 0, 0
    runners = open_candidates([(layer.shape, [DENSE, *ranks[layer.name]]) for layer in layers], target, cache, progress)
    for i, layer in enumerate(layers):
        cands = [DENSE, *ranks[layer.name]]
        total = dict.fromkeys(cands, 0.0)
        for b in target.batches:
            ms, n = layer_times(layer, cands, target, b, cache, config.stat, runners=runners.get(b), **config.timing)
            timed, asked = timed + n, asked + len(cands)
            for c in cands:
                total[c] += ms[c] / b
        tables[layer.name] = total
        progress(LayerTimed(layer.name, i + 1, len(layers)))
    return tables, target.to_dict() | {"timed": timed, "cached": asked - timed}


@dataclass
class LatencyPrune:
    """What the latency-aware prune step did: per-layer results and the record for summary.json."""

    results: list[PruneResult]
    allocation: Allocation
    record: dict


def latency_prune(model, input_size, energy: float, cap: float, config: LatencyConfig, multiple_of: int = 1,
                  progress: Progress = quiet) -> LatencyPrune:
    """Time, allocate and truncate ``model``'s decomposed convs (other SVD layers: the energy rule)."""
    check_energy(energy)
    if config.grid < 1:
        raise LrexportError(f"prune.latency_grid must be ≥ 1; got {config.grid}")
    start = time.perf_counter()
    modules = dict(model.named_modules())
    layers = tune_layers_of(model, input_size)
    rules = {t.name: rule_rank(modules[t.name], energy, multiple_of) for t in layers}
    ranks = {t.name: grid_ranks(t, lowest_rank(modules[t.name].s, cap), rules[t.name], config.grid) for t in layers}
    times, target = measure(layers, ranks, config, progress)
    tables = layer_tables(model, layers, times, rules)
    budget = energy_budget(tables)
    alloc = allocate(tables, budget, cap)
    results = prune_to(model, alloc, energy, multiple_of)
    record = {
        "runtime": config.runtime, "target": target, "grid": config.grid, "energy": energy, "budget": budget, "cap": cap,
        "mean_discarded": alloc.mean_discarded, "method": alloc.method, "predicted_ms": alloc.total_ms,
        "energy_rule_ms": alloc.rule_ms, "dense_ms": sum(t.times[DENSE] for t in tables),
        "seconds": round(time.perf_counter() - start, 2),
        "note": "ms: per image, summed over the batches, of each decomposed conv timed alone (fastest call, context-corrected)",
        "layers": {t.name: {
            "energy_rank": t.rule_rank, "allocated": alloc.ranks[t.name], "discarded": alloc.discarded[t.name],
            "energy_discarded": float(t.discarded[t.rule_rank]), "predicted_ms": alloc.predicted_ms[t.name],
            "energy_rule": alloc.rule[t.name], "times_ms": {str(k): v for k, v in t.times.items()},
        } for t in tables},
    }
    if tables:  # a model without decomposed convs has nothing to predict
        progress(Message(f"  prune: ranks allocated by latency on {config.runtime}: decomposed convs predicted at "
                         f"{alloc.total_ms:.3f} ms/image, {alloc.rule_ms:.3f} at the energy rule's ranks, "
                         f"{record['dense_ms']:.3f} all dense ({record['dense_ms'] / alloc.total_ms:.2f}x)"))
    return LatencyPrune(results, alloc, record)


def layer_tables(model, layers: list[TuneLayer], costs: dict, rules: dict) -> list[LayerTable]:
    """An allocation table per decomposed conv: its discarded-energy curve, ``costs[name]`` per option
    (predicted ms; the benchmark's fewest-MACs allocation passes MACs), its energy-rule rank."""
    modules = dict(model.named_modules())
    return [LayerTable(t.name, discarded_curve(modules[t.name].s.detach().cpu()), costs[t.name], rules[t.name]) for t in layers]


def prune_to(model, allocation: Allocation, energy: float, multiple_of: int = 1) -> list[PruneResult]:
    """Truncate ``model``'s decomposed convs to ``allocation``'s ranks (a dense choice keeps its full
    rank); other SVD layers follow the energy rule."""
    modules = dict(model.named_modules())
    ranks = {name: modules[name].rank if c == DENSE else int(c) for name, c in allocation.ranks.items()}
    return prune(model, energy, multiple_of, ranks=ranks)


def allocated_plan(summary: dict, runtime: str) -> dict | None:
    """The deployment plan (name → DENSE or rank) a run's latency-aware prune step chose for ``runtime``, if any."""
    record = summary.get("latency_ranks")
    if not record or record.get("runtime") != runtime:
        return None
    return {name: layer["allocated"] for name, layer in record["layers"].items()}


def latency_config(prune_cfg) -> LatencyConfig:
    """The measurement settings of a recipe's [prune] table; the machine's timing cache."""
    from .plan import default_cache

    options = RuntimeOptions(threads=prune_cfg.latency_threads or None, device=prune_cfg.latency_device,
                             precision=prune_cfg.latency_precision)
    return LatencyConfig(prune_cfg.latency, tuple(prune_cfg.latency_batches), options, prune_cfg.latency_grid, default_cache())
