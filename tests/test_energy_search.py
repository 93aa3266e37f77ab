"""The energy line search on a model whose spectra are set by hand, so the answer is known."""

import copy

import pytest
import torch
from torch import nn

from lrexport.errors import LrexportError
from lrexport.lowrank import count_macs, decompose, layer_ranks, prune, svd_layers
from lrexport.lowrank.energy_search import EnergySearchError, search_energy

INPUT = (3, 8, 8)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q



@pytest.fixture
def model():
    """Two SVD convs, each with four singular values of 10 and twelve of 1e-3.

    The tail holds 12e-6 / 400 = 3e-8 of a layer's energy and each big value 25%, so a
    threshold below 0.25 keeps rank 4, one in [0.25, 0.5) rank 3, one in [0.5, 0.75) rank 2.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))  # no pooling: predictions vary with the input
    decompose(net, mode="channel")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in svd_layers(net):
            rows, r = layer.U.shape
            layer.U.copy_(_orthonormal(rows, r, gen))
            layer.V.copy_(_orthonormal(layer.V.shape[1], r, gen).T)
            layer.s.copy_(torch.tensor([10.0] * 4 + [1e-3] * (r - 4)))
    return net.eval()


@pytest.fixture
def agreement(model):
    """Top-1 agreement (%) with the unpruned model's predictions on fixed inputs: a real measurement."""
    x = torch.randn(256, *INPUT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x).argmax(1)

    @torch.no_grad()
    def evaluate(m):
        return 100.0 * (m.eval()(x).argmax(1) == reference).float().mean().item()

    return evaluate


LADDER = [0.6, 1e-6, 1e-2, 0.2, 0.3, 1e-4]  # unsorted on purpose


def test_picks_the_largest_threshold_before_the_cliff(model, agreement):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = search_energy(model, agreement, LADDER, tolerance=1.0, input_size=INPUT)

    assert choice.energy == 0.2
    assert choice.base_top1 == 100.0
    assert [s.energy for s in choice.ladder] == [1e-6, 1e-4, 1e-2, 0.2, 0.3, 0.6]
    expected_rank = {1e-6: 4, 1e-4: 4, 1e-2: 4, 0.2: 4, 0.3: 3, 0.6: 2}
    for step in choice.ladder:
        assert set(step.ranks.values()) == {expected_rank[step.energy]}
        assert step.drop == pytest.approx(choice.base_top1 - step.top1)
        assert step.within == (step.drop <= 1.0)
    assert [s.within for s in choice.ladder] == [True, True, True, True, False, False]
    assert choice.ladder[4].top1 < 90.0  # cutting a big singular value really changes predictions

    # the table's numbers are those of an independently pruned copy
    again = copy.deepcopy(model)
    prune(again, 0.3)
    assert choice.ladder[4].top1 == agreement(again)
    macs = count_macs(again, INPUT)
    assert (choice.ladder[4].macs, choice.ladder[4].speedup) == (macs.deployed, macs.speedup)
    speedups = [s.speedup for s in choice.ladder]
    assert speedups == sorted(speedups) and speedups[0] > 1.0

    # the searched model is untouched
    assert layer_ranks(model) == {"0": 16, "2": 16}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert choice.to_dict()["ladder"][3]["energy"] == 0.2


def test_rounding_ranks_up_makes_pruning_gentler(model, agreement):
    # multiple_of=8 rounds ranks 2..4 up to 8: every rung keeps the four big values
    choice = search_energy(model, agreement, LADDER, tolerance=1.0, multiple_of=8, input_size=INPUT)
    assert choice.energy == 0.6
    assert all(set(s.ranks.values()) == {8} for s in choice.ladder)


def test_known_base_accuracy_is_used(model, agreement):
    choice = search_energy(model, agreement, [1e-3, 0.3], tolerance=5.0, input_size=INPUT, base_top1=90.0)
    assert choice.base_top1 == 90.0 and choice.energy == 1e-3  # 100 % ≥ 90 − 5; the cut rung is far below


def test_progress_reports_each_rung(model, agreement):
    events = []
    search_energy(model, agreement, [1e-3, 0.3], tolerance=1.0, input_size=INPUT, progress=events.append)
    assert [(type(e).__name__, e.index, e.steps, e.energy) for e in events] == [("EnergyStep", 1, 2, 1e-3), ("EnergyStep", 2, 2, 0.3)]


def test_no_passing_threshold_is_a_clear_error(model, agreement):
    with pytest.raises(EnergySearchError, match=r"smallest, e = 0.3, drops [0-9.]+ points"):
        search_energy(model, agreement, [0.3, 0.6], tolerance=1.0, input_size=INPUT)


@pytest.mark.parametrize("ladder, tolerance, message", [
    ([], 1.0, "ladder is empty"), ([0.1, 1.5], 1.0, r"energy threshold must be in \[0, 1\)"), ([0.1], -1.0, "tolerance must be"),
])
def test_bad_ladder_or_tolerance(model, agreement, ladder, tolerance, message):
    with pytest.raises(LrexportError, match=message):
        search_energy(model, agreement, ladder, tolerance, input_size=INPUT)
