"""Latency-tuned deployment: candidates, the selection rule on given tables, the cache, plans in to_plain.

No timing is asserted: selection is tested on hand-written latency tables, and the timer is
replaced by a fake wherever only the bookkeeping matters.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lrexport
from lrexport.deploy.planning import tune as T
from lrexport.lowrank import SVDConv2d, decompose, prune
from lrexport.lowrank.rewrite import plan_layers, relative_error, to_plain

torch.set_num_threads(1)

SHAPE = T.LayerShape("channel", 64, 64, 3, 3, (1, 1), (1, 1), (1, 1), (56, 56))


def layer(energy_rank=27, default=32, break_even=200, full_rank=64, name="l"):
    return T.TuneLayer(name, SHAPE, energy_rank, full_rank, break_even, default)


def test_candidates_are_dense_energy_rank_and_aligned_ranks_below_break_even():
    assert layer(27, 32).candidates() == ["dense", 27, 32]
    assert layer(41, 48, full_rank=576).candidates() == ["dense", 41, 48, 64]
    assert layer(41, 48, break_even=60, full_rank=576).candidates() == ["dense", 41, 48]
    assert layer(16, 16).candidates() == ["dense", 16, 32]
    assert layer(70, "dense", break_even=70, full_rank=576).candidates() == ["dense"]  # nothing below break-even
    assert set(layer(27, 32).candidates(multiples=(8,))) == {"dense", 27, 32}


def test_choose_fastest_eligible_candidate():
    times = {"dense": 2.0, "27": 1.5, "32": 1.4, "48": 1.0}
    c = T.choose(times, layer())
    assert c.choice == 48 and c.ms == 1.0 and c.default == 32 and c.default_ms == 1.4
    assert "pair r=48" in c.reason and "default pair r=32" in c.reason
    assert c.macs == SHAPE.macs(48)


def test_choose_dense_when_the_pair_is_slower():
    c = T.choose({"dense": 0.9, 27: 1.5, 32: 1.4}, layer())
    assert c.dense and c.choice == "dense" and "dense" in c.reason


def test_choose_never_goes_below_the_energy_rank():
    # a faster rank below r_e would change the model: not eligible
    c = T.choose({"dense": 2.0, 16: 0.5, 27: 1.5, 32: 1.4}, layer())
    assert c.choice == 32
    assert "16" not in c.times_ms


def test_candidates_below_the_energy_rank_only_when_allowed():
    assert layer(27, 32).candidates(below=True) == ["dense", 16, 24, 27, 32]
    assert layer(27, 32).candidates(below=False) == ["dense", 27, 32]
    assert layer(7, 8).candidates(below=True) == ["dense", 7, 8, 16, 32]  # no multiple of 8 below 7 (0 is no rank)


def test_choose_below_the_energy_rank_when_allowed_with_its_fallback():
    times = {"dense": 2.0, 16: 0.5, 24: 0.9, 27: 1.5, 32: 1.4}
    c = T.choose(times, layer(), below=True)
    assert c.choice == 16 and c.below and c.ms == 0.5 and c.macs == SHAPE.macs(16)
    assert "below the energy rank 27" in c.reason and "accuracy" in c.reason
    assert c.fallback.choice == 32 and not c.fallback.below  # what choose() gives without permission
    assert T.choose(times, layer()).choice == 32
    back = c.reverted()
    assert back.choice == 32 and back.ms == 1.4 and not back.below and "reverted" in back.reason
    assert c.to_dict()["fallback"] == 32 and back.to_dict()["fallback"] is None
    # not faster than the best model-preserving choice by more than the margin: not worth changing the model
    assert T.choose({"dense": 2.0, 24: 1.39, 32: 1.4}, layer(), margin=0.02, below=True).choice == 32


def test_tune_result_reverts_named_choices_below():
    times = {"dense": 2.0, 16: 0.5, 27: 1.5, 32: 1.4}
    a, b = T.choose(times, layer(name="a"), below=True), T.choose(times, layer(name="b"), below=True)
    res = T.TuneResult(fake_target((1,)), [a, b], 0, 0, 0.0, 0.02, below=True)
    assert res.below_ranks() == {"a": 16, "b": 16}
    res.revert(["b"])
    assert res.below_ranks() == {"a": 16} and res.plan == {"a": 16, "b": 32}
    assert "below the energy rank" in res.to_dict()["rule"]


def test_choose_keeps_the_default_within_the_margin():
    c = T.choose({"dense": 2.0, 32: 1.01, 48: 1.0}, layer(), margin=0.02)
    assert c.choice == 32 and "within 2%" in c.reason
    assert T.choose({"dense": 2.0, 32: 1.01, 48: 1.0}, layer(), margin=0.0).choice == 48


def test_choose_without_eligible_candidates_is_an_error():
    with pytest.raises(lrexport.errors.LrexportError):
        T.choose({16: 0.5}, layer())


def fake_timer(table: dict, calls: list):
    """time_candidates stand-in: the times of ``table`` (by candidate), every call recorded."""

    def time_candidates(shape, candidates, target, batch, **kw):
        calls.append((shape, list(candidates), batch))
        # the depthwise stand-ins for the neighbours cost 1 ms each: half of each is taken off every candidate
        ms = {c: 1.0 if c in (T.CONTEXT_IN, T.CONTEXT_OUT) else table(shape, c) + 0.5 * len(T.contexts(shape)) for c in candidates}
        return {c: T.Stats.from_ms(batch, [ms[c]]) for c in candidates}

    return time_candidates


def fake_target(batches):
    from lrexport.deploy.backends import RuntimeOptions

    settings = {"runtime": "ort", "version": "x", "provider": "CPU", "device": "cpu", "threads": 2, "precision": "fp32"}
    return T.Target("ort", RuntimeOptions(threads=2), settings, batches)


def small_model(mode="channel"):
    torch.manual_seed(0)
    model = lrexport.create_model("cifar_resnet20", num_classes=10).eval()
    decompose(model, mode)
    prune(model, 0.2)
    return model


def test_tune_uses_the_cache_on_the_second_run(tmp_path, monkeypatch):
    calls = []
    # pairs cost their rank, dense a constant: a deterministic "runtime"
    monkeypatch.setattr(T, "time_candidates", fake_timer(lambda s, c: 40.5 if c == "dense" else float(c), calls))
    monkeypatch.setattr(T, "open_candidates", lambda *args: {})  # the stand-in times nothing: nothing to open ahead
    model = small_model()
    target = fake_target((1,))
    layers = T.tune_layers_of(model, (3, 16, 16))
    cache_path = tmp_path / "cache.json"
    first = T.tune(layers, target, T.TuneCache(cache_path))
    n_candidates = sum(len(l.candidates()) for l in layers)
    assert first.cache_misses + first.cache_hits == n_candidates and first.cache_misses > 0
    contexts = len({(l.shape, c) for l in layers for c in T.contexts(l.shape)})
    assert cache_path.is_file() and len(json.loads(cache_path.read_text())["entries"]) == first.cache_misses + contexts
    timed = len(calls)
    second = T.tune(layers, target, T.TuneCache(cache_path))
    assert len(calls) == timed and second.cache_misses == 0 and second.cache_hits == n_candidates
    assert second.plan == first.plan
    # another batch (or thread count, runtime, CPU) is another key: timed afresh
    third = T.tune(layers, fake_target((8,)), T.TuneCache(cache_path))
    assert third.cache_misses == first.cache_misses and len(calls) > timed  # hits: layers of equal shape
    other_cpu = fake_target((1,))
    other_cpu.settings["device"] = "Another CPU (avx2)"  # the cache went to another machine
    assert T.tune(layers, other_cpu, T.TuneCache(cache_path)).cache_misses == first.cache_misses
    # the fake runtime makes the smallest eligible pair fastest wherever one is below 40.5
    for lay, choice in zip(layers, first.choices):
        pairs = [c for c in lay.candidates() if c != "dense" and c < 40.5]
        assert choice.choice == (min(pairs) if pairs else "dense")
    assert all(c.ms == pytest.approx(40.5 if c.dense else c.choice) for c in first.choices)  # contexts taken off
    [pred] = first.predicted()
    assert pred["batch"] == 1 and pred["tuned_ms"] == pytest.approx(sum(c.ms for c in first.choices))
    assert pred["dense_ms"] == pytest.approx(40.5 * len(layers))
    # two batches: each is timed, and a layer's choice goes by the sum of its times over them
    both = T.tune(layers, fake_target((1, 8)), T.TuneCache(cache_path))
    assert both.cache_misses == 0 and [p["batch"] for p in both.predicted()] == [1, 8]
    assert all(c.times_ms[str(c.choice)] == pytest.approx(2 * c.batch_ms["1"][str(c.choice)]) for c in both.choices)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_name_names_the_vector_extensions_the_kernels_choose_by():
    from lrexport.deploy.timing import ISA_FLAGS, cpu_name

    flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split(":")[1].split()
    name = cpu_name()
    assert [f for f in ISA_FLAGS if f in name] == [f for f in ISA_FLAGS if f in flags], name


def test_damaged_cache_is_ignored(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    assert T.TuneCache(path).entries == {}


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_plan_pads_ranks_or_merges_and_changes_no_output(mode):
    model = small_model(mode)
    plans = {p.name: p for p in plan_layers(model, (3, 16, 16), 1)}
    names = [n for n, p in plans.items() if p.rank + 5 < p.break_even][:3]
    assert len(names) >= 2
    plan = {names[0]: "dense", names[1]: plans[names[1]].rank + 5}
    if len(names) > 2:
        plan[names[2]] = plans[names[2]].rank  # exact rank, no padding
    plain, report = to_plain(model, (3, 16, 16), 8, plan)
    got = {p.name: p for p in report.layers}
    assert got[names[0]].dense
    assert got[names[1]].deployed_rank == plans[names[1]].rank + 5
    other = next(n for n in plans if n not in plan and not got[n].dense)
    assert got[other].deployed_rank % 8 == 0  # layers outside the plan keep the default rule
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(plain(x), model(x)) < 1e-4


def test_plan_below_the_rank_or_unknown_layer_is_refused():
    model = small_model()
    name, lay = next((n, m) for n, m in model.named_modules() if isinstance(m, SVDConv2d) and m.rank > 1)
    with pytest.raises(ValueError, match="below its rank"):
        to_plain(model, (3, 16, 16), 8, {name: lay.rank - 1})
    with pytest.raises(ValueError, match="not SVD layers"):
        to_plain(model, (3, 16, 16), 8, {"nope": 4})
    with pytest.raises(ValueError, match="rank or 'dense'"):
        to_plain(model, (3, 16, 16), 8, {name: "fast"})


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("candidate", ["dense", 12])
def test_one_layer_model_has_the_exported_geometry(mode, candidate):
    """The timed model computes what a conv of that geometry computes: same output shape as torch's."""
    import onnxruntime as ort

    shape = T.LayerShape(mode, 8, 16, 3, 5, (2, 1), (1, 2), (1, 1), (11, 13))
    proto = T.layer_onnx(shape, candidate, batch=2)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros((2, 8, 11, 13), np.float32)})[0]
    ref = nn.Conv2d(8, 16, (3, 5), (2, 1), (1, 2))(torch.zeros(2, 8, 11, 13))
    assert y.shape == tuple(ref.shape)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    # the layer, then a depthwise stand-in for the next layer (16 output channels; 8 input channels: none before)
    assert T.contexts(shape) == [T.CONTEXT_OUT]
    assert len(convs) == (1 if candidate == "dense" else 2) + 1
    assert [a.i for a in convs[-1].attribute if a.name == "group"] == [16]
    ctx = T.layer_onnx(shape, T.CONTEXT_OUT, batch=2)
    sess = ort.InferenceSession(ctx.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((2, 16, *shape.out_hw), np.float32)})[0].shape == y.shape
    bare = T.layer_onnx(shape, candidate, batch=2, context=False)
    assert len([n for n in bare.graph.node if n.op_type == "Conv"]) == len(convs) - 1


@pytest.mark.parametrize("runtime", ["ort", "openvino", "torch"])
def test_real_timing_of_a_tiny_layer_returns_stats(runtime):
    """Each CPU runtime end to end on a tiny layer: stats per candidate (values not asserted)."""
    from lrexport.deploy.backends import RuntimeOptions

    target = T.make_target(runtime, RuntimeOptions(threads=1), (2,))
    assert target.settings["runtime"] == runtime and target.settings["threads"] == 1
    shape = T.LayerShape("channel", 8, 8, 3, 3, (1, 1), (1, 1), (1, 1), (8, 8))
    cands = ["dense", 4, 8, T.CONTEXT_OUT]
    stats = T.time_candidates(shape, cands, target, 2, warmup=1, budget_ms=5, min_repeats=3, max_repeats=3)
    assert set(stats) == set(cands) and all(s.repeats == 3 and s.median_ms > 0 and s.batch == 2 for s in stats.values())


def test_tuning_on_a_runtime_without_layer_timing_is_one_line():
    from lrexport.deploy.backends import RuntimeOptions
    from lrexport.errors import RuntimeMissingError

    with pytest.raises(RuntimeMissingError, match="TensorRT"):
        T.make_target("trt", RuntimeOptions(), (1,))
