"""Ranks by measured latency under the energy rule's budget (a pure function: no timing here).

Each decomposed layer l offers options: "dense" (full rank, discards nothing) and thin pairs
at grid ranks r, each with a predicted time t_l and a discarded energy fraction
d_l(r) = Σ_{i>r} s_i² / Σ_i s_i². We choose one option per layer to minimise Σ_l t_l subject to

- mean_l d_l ≤ budget (the energy rule's own mean at e), and
- d_l ≤ cap for every layer (``prune.max_layer_energy``).

This is a multiple-choice knapsack. We solve it by dynamic programming over the budget cut
into ``resolution`` units, each option's discard rounded *up* to whole units, so every
solution the DP returns respects the budget exactly (rounding only costs optimality). The
energy rule's own choice moved onto the grid (its rank rounded up: it discards no more) is
always feasible, so it is kept as a fallback candidate: the result is never predicted slower
than it. Pairs no faster than the layer's dense conv are dominated by dense (faster, and
discarding nothing) and are dropped first, so a layer whose dense conv is fastest at every
admissible rank stays dense. Every constraint is checked again on the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import LrexportError

DENSE = "dense"


@dataclass
class LayerTable:
    """One layer's energy curve and measured times.

    ``discarded[r]`` is the fraction of energy dropped keeping the r largest values
    (r = 0 … full rank); ``times`` maps DENSE and each timed grid rank to predicted ms;
    ``rule_rank`` is the energy rule's rank at e (what the budget is spent by).
    """

    name: str
    discarded: np.ndarray
    times: dict
    rule_rank: int

    @property
    def full_rank(self) -> int:
        return len(self.discarded) - 1

    def discard(self, option) -> float:
        return 0.0 if option == DENSE else float(self.discarded[int(option)])

    def pairs(self) -> list[int]:
        return sorted(int(k) for k in self.times if k != DENSE)

    def rule_on_grid(self, cap: float):
        """The energy rule's choice on the grid: its rank rounded up to a timed rank, else dense."""
        up = [r for r in self.pairs() if r >= self.rule_rank and self.discard(r) <= cap]
        return up[0] if up else DENSE


def discarded_curve(s) -> np.ndarray:
    """``discarded[r]`` for r = 0 … len(s): the energy fraction dropped keeping the r largest |s|."""
    e = np.sort(np.asarray(s, dtype=np.float64) ** 2)[::-1]
    total = e.sum()
    if total <= 0:
        return np.zeros(len(e) + 1)
    kept = np.concatenate([[0.0], np.cumsum(e)])
    return np.clip((total - kept) / total, 0.0, 1.0)


def energy_budget(tables: list[LayerTable]) -> float:
    """The mean discarded energy fraction of the energy rule's own ranks: what an allocation may spend."""
    return sum(float(t.discarded[t.rule_rank]) for t in tables) / max(1, len(tables))


@dataclass
class Allocation:
    ranks: dict  # name → DENSE or rank
    discarded: dict[str, float]
    predicted_ms: dict[str, float]
    rule: dict  # name → the energy rule's choice on the grid
    rule_ms: float
    budget: float
    cap: float
    method: str  # "dp" or "energy rule" (the DP found nothing faster)
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(self.predicted_ms.values())

    @property
    def mean_discarded(self) -> float:
        return sum(self.discarded.values()) / max(1, len(self.discarded))


def _options(table: LayerTable, cap: float) -> list:
    """Admissible options of a layer: dense, and pairs within the cap that are faster than dense."""
    dense_ms = table.times[DENSE]
    return [DENSE] + [r for r in table.pairs() if table.discard(r) <= cap and table.times[r] < dense_ms]


def _dp(tables: list[LayerTable], options: list[list], units: int, unit: float) -> list | None:
    """Minimum total time with Σ ceil(d / unit) ≤ units; one option per layer (None: infeasible)."""
    best = np.full(units + 1, math.inf)
    best[0] = 0.0  # best[u]: least time with exactly u units spent so far
    picks = []
    for table, opts in zip(tables, options):
        new = np.full(units + 1, math.inf)
        arg = np.full(units + 1, -1)
        for i, opt in enumerate(opts):
            d = table.discard(opt)
            cost = 0 if d <= 0 else (units + 1 if unit <= 0 else math.ceil(d / unit - 1e-12))
            if cost > units:
                continue
            shifted = np.full(units + 1, math.inf)
            shifted[cost:] = best[: units + 1 - cost] + table.times[opt]
            better = shifted < new  # strict: ties keep the earlier option (dense first)
            new[better], arg[better] = shifted[better], i
        best = new
        picks.append((arg, opts, table))
    if not np.isfinite(best).any():
        return None
    u = int(np.argmin(best))
    chosen = []
    for arg, opts, table in reversed(picks):
        i = int(arg[u])
        chosen.append(opts[i])
        d = table.discard(opts[i])
        u -= 0 if d <= 0 else math.ceil(d / unit - 1e-12)
    return chosen[::-1]


def allocate(tables: list[LayerTable], budget: float, cap: float, resolution: int = 2000) -> Allocation:
    """Per-layer ranks minimising the summed predicted time (see the module docstring).

    ``budget``: the largest allowed mean discarded energy fraction over ``tables``;
    ``cap``: the largest per layer. Raises ``LrexportError`` if a layer has no dense time.
    """
    if not tables:
        return Allocation({}, {}, {}, {}, 0.0, budget, cap, "dp")
    for t in tables:
        if DENSE not in t.times:
            raise LrexportError(f"layer {t.name} has no dense time: cannot allocate its rank")
    options = [_options(t, cap) for t in tables]
    total = budget * len(tables)
    chosen = _dp(tables, options, resolution, total / resolution)
    rule = [t.rule_on_grid(cap) for t in tables]
    # a rule pair slower than dense is replaced by dense: faster, and it discards nothing
    rule_fast = [DENSE if c != DENSE and t.times[c] >= t.times[DENSE] else c for t, c in zip(tables, rule)]

    def time_of(choice):
        return sum(t.times[c] for t, c in zip(tables, choice))

    def feasible(choice) -> bool:
        ds = [t.discard(c) for t, c in zip(tables, choice)]
        return all(d <= cap for d in ds) and sum(ds) <= total * (1 + 1e-9) + 1e-15

    candidates = [("dp", chosen)] if chosen is not None else []
    candidates.append(("energy rule", rule_fast))
    candidates = [(m, c) for m, c in candidates if feasible(c)]
    if not candidates:  # every layer dense discards nothing: always feasible
        candidates = [("all dense", [DENSE] * len(tables))]
    method, pick = min(candidates, key=lambda mc: time_of(mc[1]))
    return Allocation(
        {t.name: c for t, c in zip(tables, pick)}, {t.name: t.discard(c) for t, c in zip(tables, pick)},
        {t.name: float(t.times[c]) for t, c in zip(tables, pick)}, {t.name: c for t, c in zip(tables, rule)},
        float(time_of(rule)), budget, cap, method,
    )
