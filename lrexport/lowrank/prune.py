"""Energy-threshold pruning of singular values (DESIGN §3) and rank rounding."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LrexportError
from .svd_layers import svd_layers


def check_energy(e: float) -> float:
    if not (isinstance(e, (int, float)) and 0.0 <= e < 1.0):
        raise LrexportError(f"energy threshold must be in [0, 1); got {e!r}")
    return float(e)


def _energies(s: torch.Tensor) -> torch.Tensor:
    """s², largest first, in float64: what the energy rule sums."""
    return torch.sort(s.detach().double() ** 2, descending=True).values


def energy_rank(s: torch.Tensor, e: float) -> int:
    """Smallest k with Σ_{i≤k} s_i² ≥ (1 − e)·Σ s² over s sorted descending; at least 1."""
    check_energy(e)
    energy = _energies(s).cumsum(0)
    total = energy[-1]
    if total <= 0:
        return 1
    return max(1, int(torch.searchsorted(energy, (1.0 - e) * total).item()) + 1)


def round_rank(k: int, multiple_of: int, full_rank: int) -> int:
    """Nearest multiple of ``multiple_of`` (halves up), never 0, never above full rank."""
    if multiple_of <= 1:
        return k
    rounded = max(multiple_of, int((k + multiple_of / 2) // multiple_of) * multiple_of)
    return min(rounded, full_rank)


@torch.no_grad()
def truncate(layer: nn.Module, k: int) -> None:
    """Keep the k largest singular values and their vectors; the layer really shrinks."""
    keep = torch.argsort(layer.s.detach().abs(), descending=True)[:k].sort().values
    layer.U = nn.Parameter(layer.U[:, keep].clone())
    layer.s = nn.Parameter(layer.s[keep].clone())
    layer.V = nn.Parameter(layer.V[keep].clone())


def energy_dropped(s: torch.Tensor, k: int) -> float:
    """Fraction of Σ s² that keeping only the k largest |s| drops."""
    energy = _energies(s)
    total = float(energy.sum())
    return 0.0 if total <= 0 else float(energy[k:].sum()) / total


def truncated(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """A copy of ``model`` with the named SVD layers truncated to the given (lower) ranks."""
    model = copy.deepcopy(model)
    for name, k in ranks.items():
        layer = model.get_submodule(name)
        if not 1 <= k <= layer.rank:
            raise LrexportError(f"cannot truncate {name} (rank {layer.rank}) to rank {k}")
        if k < layer.rank:
            truncate(layer, k)
    return model


@dataclass
class PruneResult:
    name: str
    before: int
    after: int
    full_rank: int


def rule_rank(layer: nn.Module, energy: float, multiple_of: int = 1) -> int:
    """The rank the energy rule gives ``layer`` at ``energy`` (rounded to ``multiple_of``), never above its rank."""
    return min(layer.rank, round_rank(energy_rank(layer.s, energy), multiple_of, layer.full_rank))


def prune(model: nn.Module, energy: float, multiple_of: int = 1, ranks: dict[str, int] | None = None) -> list[PruneResult]:
    """Cut every SVD layer to its energy rank (optionally rounded); returns per-layer ranks.

    ``ranks`` (name → rank) overrides the rule for the layers it names (a rank chosen by
    measured latency, lrexport.deploy.planning.latency_ranks). Parameters are replaced, so an
    optimizer built before pruning must be rebuilt.
    """
    check_energy(energy)
    if multiple_of < 1:
        raise LrexportError(f"multiple_of must be ≥ 1; got {multiple_of}")
    ranks = ranks or {}
    results = []
    for name, layer in svd_layers(model):
        before = layer.rank
        k = min(before, ranks[name]) if name in ranks else rule_rank(layer, energy, multiple_of)
        if k < before:
            truncate(layer, k)
        results.append(PruneResult(name, before, k, layer.full_rank))
    return results
