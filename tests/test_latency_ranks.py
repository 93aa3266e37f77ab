"""Ranks by measured latency: the allocation's invariants on fake timers, the grid, the prune step.

No timing is asserted: the timer is a formula wherever only the allocation matters.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import lrexport
from lrexport.deploy.planning import latency_ranks as LR
from lrexport.deploy.planning.tune import TuneLayer, LayerShape, Target
from lrexport.deploy.backends import RuntimeOptions
from lrexport.lowrank import decompose, energy_rank, svd_layers
from lrexport.lowrank.allocate import DENSE, LayerTable, allocate, discarded_curve
from lrexport.recipe import recipe_from_dict
from lrexport.errors import RecipeError
from lrexport.sweep import first_phase

torch.set_num_threads(1)


def spectrum(rng, full: int) -> np.ndarray:
    tau = math.exp(rng.uniform(math.log(0.04), math.log(0.4)))
    return np.exp(-np.arange(full) / (tau * full))


def fake_ms(rank, full: int, step: int = 16, dense_factor: float = 0.9) -> float:
    """A runtime that charges pairs per started block of ``step`` channels, plus a fixed launch cost."""
    if rank == DENSE:
        return dense_factor * full
    return 2.0 + math.ceil(rank / step) * step


def tables(seed: int, layers: int = 6, grid: int = 8, energy: float = 0.05, dense_first: int = -1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(layers):
        full = int(rng.choice([16, 32, 64, 128]))
        s = spectrum(rng, full)
        curve = discarded_curve(s)
        ranks = [r for r in range(1, int(0.9 * full)) if LR.on_grid(r, grid)]
        # layer ``dense_first``: the dense conv beats every pair
        factor = 0.01 if i == dense_first else 0.9
        times = {DENSE: fake_ms(DENSE, full, dense_factor=factor)} | {r: fake_ms(r, full) for r in ranks}
        out.append(LayerTable(f"l{i}", curve, times, energy_rank(torch.tensor(s), energy)))
    return out


def budget_of(ts) -> float:
    return sum(t.discarded[t.rule_rank] for t in ts) / len(ts)


@pytest.mark.parametrize("seed", range(8))
def test_allocation_respects_budget_cap_and_grid_and_beats_the_energy_rule(seed):
    ts = tables(seed, dense_first=seed % 6)
    budget, cap = budget_of(ts), 0.5
    a = allocate(ts, budget, cap)
    discards = [t.discard(a.ranks[t.name]) for t in ts]
    assert sum(discards) / len(ts) <= budget * (1 + 1e-9)
    assert max(discards) <= cap
    for t in ts:
        choice = a.ranks[t.name]
        assert choice == DENSE or (choice in t.times and LR.on_grid(choice, 8))
        assert a.predicted_ms[t.name] == t.times[choice]
    dense_layer = ts[seed % 6]
    assert a.ranks[dense_layer.name] == DENSE  # the timer says dense is fastest there
    rule_ms = sum(t.times[t.rule_on_grid(cap)] for t in ts)
    assert a.total_ms <= rule_ms + 1e-12 and a.rule_ms == pytest.approx(rule_ms)


def test_a_layer_stays_dense_where_dense_is_fastest_even_with_budget_to_spare():
    ts = tables(3, layers=4)
    for t in ts:
        t.times[DENSE] = 0.5 * min(v for k, v in t.times.items() if k != DENSE)
    a = allocate(ts, budget=0.9, cap=0.99)
    assert set(a.ranks.values()) == {DENSE} and a.mean_discarded == 0.0


def test_cap_binds_per_layer():
    ts = tables(5)
    a = allocate(ts, budget=0.5, cap=0.02)
    assert all(t.discard(a.ranks[t.name]) <= 0.02 for t in ts)


def test_zero_budget_discards_nothing():
    ts = tables(1)
    a = allocate(ts, budget=0.0, cap=0.5)
    assert a.mean_discarded == 0.0


def brute_force(ts, budget, cap) -> float:
    opts = [[DENSE] + [r for r in t.times if r != DENSE and t.discard(r) <= cap] for t in ts]
    best = math.inf
    for combo in itertools.product(*opts):
        if sum(t.discard(c) for t, c in zip(ts, combo)) <= budget * len(ts):
            best = min(best, sum(t.times[c] for t, c in zip(ts, combo)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dp_is_optimal_up_to_one_budget_unit_per_layer(seed):
    # rounding each discard up to whole units loses at most one unit per layer: the DP is at
    # least as good as the exact optimum at a budget that much smaller
    ts = tables(seed, layers=3)
    budget, resolution = budget_of(ts), 400
    a = allocate(ts, budget, cap=0.6, resolution=resolution)
    assert a.total_ms <= brute_force(ts, budget * (1 - len(ts) / resolution), 0.6) + 1e-12
    assert a.total_ms >= brute_force(ts, budget, 0.6) - 1e-12


def test_discarded_curve():
    c = discarded_curve([3.0, 0.0, 4.0])
    assert c[0] == 1.0 and c[-1] == 0.0
    assert c[1] == pytest.approx(9 / 25) and c[2] == pytest.approx(0.0)


SHAPE = LayerShape("channel", 256, 256, 3, 3, (1, 1), (1, 1), (1, 1), (14, 14))


def test_grid_ranks_are_multiples_within_the_cap_and_below_break_even():
    layer = TuneLayer("l", SHAPE, 256, 256, 231, 256)
    ranks = LR.grid_ranks(layer, lowest=20, rule=37, grid=8)
    assert all(r % 8 == 0 and 20 <= r < 231 for r in ranks)
    assert 40 in ranks  # the energy rule's rank rounded up to the grid
    assert len(ranks) <= LR.MAX_CANDIDATES + 1
    assert LR.grid_ranks(layer, lowest=20, rule=37, grid=8, max_candidates=100) == list(range(24, 231, 8))
    assert LR.grid_ranks(TuneLayer("s", SHAPE, 16, 16, 10, 16), lowest=1, rule=3, grid=8) == [1, 2, 4, 8]
    assert LR.grid_ranks(TuneLayer("s", SHAPE, 16, 16, 10, 16), lowest=3, rule=3, grid=8) == [4, 8]
    assert all(LR.on_grid(r, 8) for r in (1, 2, 4, 8, 16, 24)) and not any(LR.on_grid(r, 8) for r in (3, 5, 12))


def fake_layer_times(layer, cands, target, batch, cache, stat="median_ms", **timing):
    full = min(layer.shape.n, layer.shape.c * layer.shape.kh * layer.shape.kw)
    return {c: batch * fake_ms(c, full, dense_factor=0.5 if layer.shape.c == 16 else 0.9) for c in cands}, len(cands)


def test_latency_prune_truncates_to_the_allocation(monkeypatch):
    target = Target("ort", RuntimeOptions(threads=1), {"runtime": "ort", "threads": 1, "precision": "fp32"}, (1, 8))
    monkeypatch.setattr(LR, "layer_times", fake_layer_times)
    monkeypatch.setattr(LR, "open_candidates", lambda *args: {})  # the stand-in times nothing: nothing to open ahead
    monkeypatch.setattr(LR, "make_target", lambda runtime, options, batches: target)
    torch.manual_seed(0)
    model = lrexport.create_model("cifar_resnet20", num_classes=10).eval()
    decompose(model, "channel")
    energy = 0.2
    events = []
    result = LR.latency_prune(model, (3, 16, 16), energy, LR.cap_of("auto", energy), LR.LatencyConfig("ort", (1, 8)),
                              progress=events.append)
    rec = result.record
    # the user is told what the allocation predicts
    assert f"{rec['dense_ms']:.3f} all dense ({rec['dense_ms'] / rec['predicted_ms']:.2f}x)" in events[-1].text
    assert rec["cap"] == pytest.approx(2.0) and rec["mean_discarded"] <= rec["budget"] * (1 + 1e-9)
    assert rec["predicted_ms"] <= rec["energy_rule_ms"]
    # all dense discards nothing, so it is always within the budget: the allocation is never predicted slower
    assert rec["dense_ms"] == pytest.approx(sum(layer["times_ms"][DENSE] for layer in rec["layers"].values()))
    assert rec["predicted_ms"] <= rec["dense_ms"]
    layers = dict(svd_layers(model))
    for name, layer in rec["layers"].items():
        if layer["allocated"] == DENSE:
            assert layers[name].rank == layers[name].full_rank
        else:
            assert layers[name].rank == layer["allocated"] and LR.on_grid(layer["allocated"], 8)
        assert set(layer) >= {"energy_rank", "allocated", "discarded", "predicted_ms"}
    # 16-channel layers: the fake dense conv is faster than any pair there
    assert all(rec["layers"][n]["allocated"] == DENSE for n in layers if layers[n].in_channels == 16 and n != "conv1")
    assert LR.allocated_plan({"latency_ranks": rec}, "ort") == {n: l["allocated"] for n, l in rec["layers"].items()}
    assert LR.allocated_plan({"latency_ranks": rec}, "openvino") is None


def test_a_model_without_decomposed_convs_allocates_nothing(monkeypatch):
    target = Target("ort", RuntimeOptions(threads=1), {"runtime": "ort", "threads": 1, "precision": "fp32"}, (1,))
    monkeypatch.setattr(LR, "make_target", lambda runtime, options, batches: target)
    model = lrexport.create_model("cifar_resnet20", num_classes=10).eval()  # not decomposed
    events = []
    result = LR.latency_prune(model, (3, 16, 16), 0.1, 1.0, LR.LatencyConfig("ort", (1,)), progress=events.append)
    assert result.record["layers"] == {} and result.record["predicted_ms"] == result.record["dense_ms"] == 0
    assert events == []


def test_recipe_keys_validate_and_are_prune_phase_keys():
    p = recipe_from_dict({}).prune
    assert (p.latency, p.latency_batches, p.latency_grid, p.max_layer_energy) == ("none", [1, 8], 8, "auto")
    for bad in ("prune.latency=trt", "prune.latency_batches=[]", "prune.latency_batches=[0]", "prune.latency_grid=0",
                "prune.max_layer_energy=0", "prune.latency_threads=-1"):
        with pytest.raises(RecipeError):
            recipe_from_dict({}, overrides=[bad])
    with pytest.raises(RecipeError, match="needs prune.latency"):
        recipe_from_dict({}, overrides=["prune.latency=ort", "prune.latency_device=cuda"])
    recipe_from_dict({}, overrides=["prune.latency=torch", "prune.latency_device=cuda", "prune.latency_precision=fp16"])
    recipe_from_dict({}, overrides=["prune.latency=openvino", "prune.latency_precision=int8"])  # for export --precision int8
    with pytest.raises(RecipeError, match="int8"):
        recipe_from_dict({}, overrides=["prune.latency=torch", "prune.latency_precision=int8"])
    with pytest.raises(RecipeError, match="fp16"):
        recipe_from_dict({}, overrides=["prune.latency=ort", "prune.latency_precision=fp16"])
    assert {first_phase(k) for k in ("prune.latency", "prune.latency_batches", "prune.latency_grid", "prune.max_layer_energy",
                                      "prune.latency_threads", "prune.latency_precision")} == {"prune"}
