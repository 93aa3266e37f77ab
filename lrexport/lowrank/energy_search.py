"""Choose the energy threshold by line search, as the paper does by hand (seed appendix A).

"The energy threshold is selected through a line search, where we find the highest
percentage of energy that can be pruned without leading to a sudden accuracy drop."
Each rung of an ascending ladder of thresholds prunes a copy of the SVD-trained model and
measures its validation accuracy right away (no finetuning); the largest threshold whose
drop from the unpruned accuracy stays within the tolerance wins.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from torch import nn

from ..errors import LrexportError
from ..progress import EnergyStep, Progress, quiet
from .decompose import layer_ranks
from .macs import count_macs
from .prune import check_energy, prune

EvaluateFn = Callable[[nn.Module], float]


class EnergySearchError(LrexportError):
    """No threshold of the ladder keeps the accuracy within the tolerance (or a bad ladder)."""


@dataclass
class LadderStep:
    """One rung: the pruned copy's accuracy and cost."""

    energy: float
    top1: float
    drop: float  # unpruned top-1 minus this rung's, in percentage points
    macs: int
    speedup: float  # MACs speedup over the dense model, costed as deployed
    ranks: dict[str, int] = field(default_factory=dict)
    within: bool = True  # drop ≤ tolerance


@dataclass
class EnergyChoice:
    energy: float  # the chosen threshold
    base_top1: float  # accuracy of the unpruned model
    tolerance: float
    ladder: list[LadderStep]

    @property
    def step(self) -> LadderStep:
        return next(s for s in self.ladder if s.energy == self.energy)

    def to_dict(self) -> dict:
        return {"energy": self.energy, "base_top1": self.base_top1, "tolerance": self.tolerance,
                "ladder": [asdict(s) for s in self.ladder]}


def check_ladder(ladder: Iterable[float]) -> list[float]:
    """Distinct thresholds in [0, 1), ascending."""
    values = sorted({check_energy(e) for e in ladder})
    if not values:
        raise EnergySearchError("the energy ladder is empty")
    return values


def search_energy(
    model: nn.Module,
    evaluate_fn: EvaluateFn,
    ladder: Iterable[float],
    tolerance: float,
    multiple_of: int = 1,
    *,
    input_size: tuple[int, ...],
    base_top1: float | None = None,
    progress: Progress = quiet,
) -> EnergyChoice:
    """The largest threshold of ``ladder`` whose pruned model loses at most ``tolerance`` points.

    ``evaluate_fn(model) -> top1`` (%) measures a model; ``model`` itself is never changed
    (each rung prunes a deep copy). ``base_top1`` is the unpruned accuracy if already known.
    Every rung is evaluated, so the ladder table is complete; the choice is the largest
    passing rung even if a smaller one failed (validation noise is not a cliff).
    ``input_size`` is one image's (C, H, W) for the MAC count. Raises EnergySearchError if
    no rung passes, naming the smallest rung's drop.
    """
    energies = check_ladder(ladder)
    if not tolerance >= 0:
        raise EnergySearchError(f"tolerance must be ≥ 0 accuracy points; got {tolerance!r}")
    base = float(evaluate_fn(model)) if base_top1 is None else float(base_top1)
    steps = []
    for i, e in enumerate(energies):
        pruned = copy.deepcopy(model)
        prune(pruned, e, multiple_of)
        top1 = float(evaluate_fn(pruned))
        macs = count_macs(pruned, tuple(input_size))
        drop = base - top1
        steps.append(LadderStep(e, top1, drop, macs.deployed, macs.speedup, layer_ranks(pruned), drop <= tolerance))
        del pruned
        progress(EnergyStep(i + 1, len(energies), e, top1, macs.speedup, drop <= tolerance))
    passing = [s for s in steps if s.within]
    if not passing:
        s = steps[0]
        raise EnergySearchError(
            f"no energy threshold keeps top-1 within {tolerance:g} points of {base:.2f}%: the smallest, "
            f"e = {s.energy:g}, drops {s.drop:.2f} points; add smaller thresholds to the ladder or raise the tolerance")
    return EnergyChoice(passing[-1].energy, base, float(tolerance), steps)
