"""Ranks below the energy rule's, kept only where validation accuracy confirms them.

``export --tune`` may find a pair below a layer's energy rank r_e faster than anything at
r_e or above (on a CPU whose conv kernels work in blocks of 16 channels, rank 17 costs what
32 does). Such a rank drops singular values the energy rule kept, so it changes the model.
Where the recipe allows it (``prune.tune_below``), this module checks the change on the
run's validation images: the low-rank model with every proposed truncation must stay within
``prune.tolerance`` top-1 points of the model as trained. If it does not, proposals are
withdrawn, most energy dropped first, and the smallest withdrawal that holds accuracy is
found by bisection over that order. Every set of truncations that is kept was evaluated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...lowrank.prune import energy_dropped, truncated
from ...progress import Message, Progress, quiet


@dataclass
class BelowCheck:
    tolerance: float  # top-1 points the truncated model may lose
    images: int
    reference_top1: float  # the model as trained
    top1: float  # with the kept truncations
    kept: dict[str, int]  # name → rank below its energy rank, confirmed
    reverted: list[str]  # proposed, withdrawn: accuracy did not hold with them
    energy_dropped: dict[str, float]  # per proposed layer, fraction of its Σ s² the lower rank drops
    evaluations: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def top1(model: nn.Module, val, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of ``model`` (eval mode, CPU) on ``val``."""
    from torch.utils.data import DataLoader

    model.eval()
    hits = seen = 0
    for x, y in DataLoader(val, batch_size=batch_size, shuffle=False):
        hits += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    return 100.0 * hits / max(seen, 1)


def confirm_below(model: nn.Module, proposed: dict[str, int], val, tolerance: float, progress: Progress = quiet) -> BelowCheck:
    """Which of the ``proposed`` truncations (name → rank) ``model`` keeps within ``tolerance`` points on ``val``.

    ``progress`` hears a Message for each evaluation (each is a pass over ``val``).
    """
    log = lambda text: progress(Message(text))
    layers = dict(model.named_modules())
    dropped = {name: energy_dropped(layers[name].s, k) for name, k in proposed.items()}
    order = sorted(proposed, key=lambda n: (-dropped[n], n))  # withdrawn first: the most energy dropped
    log(f"accuracy check of {len(order)} ranks below the energy rule's on {len(val)} validation images")
    reference = top1(model, val)
    log(f"  as trained: top-1 {reference:.2f}%")
    results: dict[int, float] = {}  # withdrawn count → top-1 with the rest kept

    def accuracy(withdrawn: int) -> float:
        if withdrawn not in results:
            results[withdrawn] = top1(truncated(model, {n: proposed[n] for n in order[withdrawn:]}), val)
            log(f"  {len(order) - withdrawn} of {len(order)} below: top-1 {results[withdrawn]:.2f}%")
        return results[withdrawn]

    def holds(withdrawn: int) -> bool:
        return withdrawn == len(order) or accuracy(withdrawn) >= reference - tolerance

    hi = 0  # proposals withdrawn
    if not holds(0):
        lo, hi = 0, len(order)  # withdrawing lo does not hold, withdrawing hi does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    kept = {n: proposed[n] for n in order[hi:]}
    return BelowCheck(
        tolerance, len(val), reference, results.get(hi, reference), kept, order[:hi],
        {n: round(d, 6) for n, d in dropped.items()}, len(results) + 1,
    )
