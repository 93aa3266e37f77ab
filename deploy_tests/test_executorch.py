"""ExecuTorch (XNNPACK) as a deployment target, on the real runtime: programs that reproduce PyTorch,
layer timing and the whole-model guard on XNNPACK, int8 through XNNPACK's quantizer with its per-layer
float fallback, and a machine without ExecuTorch as one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lrexport.deploy.backends import executorch as et
from lrexport.deploy.planning import latency_ranks as LR
from lrexport.deploy.export import ExportConfig, export_run
from lrexport.deploy.planning.plan import TuneConfig, plan_export
from lrexport.deploy.backends.qdq import QuantConfig
from lrexport.deploy.backends import RuntimeOptions
from lrexport.deploy.planning.tune import DENSE, TuneCache, layer_times, make_target, tune_layers_of
from lrexport.deploy.verify import VerifyConfig, verify_artifacts
from lrexport.errors import LrexportError
from lrexport.lowrank import decompose, svd_layers
from lrexport.lowrank.rewrite import relative_error, to_plain
from lrexport.recipe import load_recipe
from lrexport.train import run_recipe
from lrexport.train.checkpoint import load_model
from runs import IMAGE_SIZE, NO_TUNE, REPO, TINY_RUN

ONE_THREAD = RuntimeOptions(threads=1)
QUICK = VerifyConfig(warmup=1, repeats=3)
SIZE = (3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.fixture(scope="module")
def run(tiny_recipe, tmp_path_factory):
    """A tiny low-rank ResNet-20 run of this module's own (16×16, channel mode)."""
    return run_recipe(load_recipe(tiny_recipe(*TINY_RUN)), tmp_path_factory.mktemp("runs") / "et").run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """Its untuned fp32 export for ExecuTorch: programs at batches 1 and 8."""
    return export_run(run, tmp_path_factory.mktemp("art") / "et", ExportConfig(runtime="executorch", tune=NO_TUNE, options=ONE_THREAD))


def test_programs_reproduce_pytorch_and_verify_through_executorch(exported):
    meta = exported.meta
    assert meta["runtime"] == "executorch" and meta["versions"]["executorch"]
    assert meta["pte"] == {m: {"1": f"{stem}_b1.pte", "8": f"{stem}_b8.pte"} for m, stem in (("lowrank", "model"), ("dense", "dense"))}
    assert all((exported.out_dir / f).is_file() for files in meta["pte"].values() for f in files.values())
    parity = {c.what: c.rel_err for c in exported.checks if "executorch" in c.what}
    assert set(parity) == {"lowrank: executorch vs original", "dense: executorch vs original"}
    assert max(parity.values()) < 1e-4
    checked = verify_artifacts(exported.out_dir, options=ONE_THREAD, config=QUICK)  # on the runtime it was exported for
    report = checked.report
    assert checked.passed and report["runtime"] == "executorch" and report["settings"]["provider"] == "XNNPACK"
    assert report["accuracy"]["lowrank"]["top1_disagree"] == report["accuracy"]["dense"]["top1_disagree"] == 0
    assert [row["batch"] for row in report["latency"]] == [1, 8]


def test_stored_programs_run_any_batch_and_name_the_ones_they_lack(exported, run):
    from lrexport.deploy.verify import load_artifacts

    runner = et.ExecutorchRunner(ONE_THREAD, programs=et.BACKEND.own_files(exported.out_dir, load_artifacts(exported.out_dir).meta, "lowrank"))
    x = torch.randn(5, *SIZE)
    model, _ = load_model(run / "checkpoints/finetune_best.pt")
    with torch.no_grad():
        assert relative_error(torch.from_numpy(runner.run(x.numpy())), model.eval()(x)) < 1e-4  # batch 8's program, padded
    with pytest.raises(LrexportError, match="programs for batch 1, 8, not 4"):
        runner.bind(np.zeros((4, *SIZE), np.float32))


def test_layer_times_on_xnnpack_are_measured_then_cached(tmp_path):
    target = make_target("executorch", ONE_THREAD, (1,))
    assert target.settings["runtime"] == "executorch" and target.settings["threads"] == 1
    layer = next(t for t in tune_layers_of(decompose(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval()), (16, 8, 8)))
    cache = TuneCache(tmp_path / "cache.json")
    timing = {"warmup": 1, "budget_ms": 20.0, "min_repeats": 3, "max_repeats": 5}
    times, timed = layer_times(layer, [DENSE, 8], target, 1, cache, **timing)
    assert timed == 2 and set(times) == {DENSE, 8} and min(times.values()) > 0
    again, timed = layer_times(layer, [DENSE, 8], target, 1, TuneCache(tmp_path / "cache.json"), **timing)
    assert timed == 0 and again == times


def test_the_guard_times_the_plan_against_all_dense_on_xnnpack(run):
    model, _ = load_model(run / "checkpoints/finetune_best.pt")
    allocated = {name: layer.rank for name, layer in svd_layers(model)}  # every layer a thin pair at its trained rank
    plan = plan_export(model, SIZE, "executorch", ONE_THREAD, TuneConfig(batches=(1,), guard_budget_ms=200.0), None, 1,
                       allocated=allocated)
    (row,) = plan.guard
    assert plan.target["runtime"] == "executorch" and row["rounds"] >= 21 and {"allocated", "dense"} <= set(row)
    plans = [name for name in row if name not in ("batch", "rounds", "dense")]
    best = max(plans, key=lambda name: row[name]["speedup_over_dense"])
    # the fastest plan that is not slower than all dense goes out; none is: every layer dense
    assert plan.deployed == (best if row[best]["speedup_over_dense"] >= 1 else "dense")


def test_latency_ranks_are_allocated_on_xnnpack_timings(tmp_path, monkeypatch):
    monkeypatch.setattr(LR, "TIMING", {"warmup": 1, "budget_ms": 20.0, "min_repeats": 3, "max_repeats": 5})
    torch.manual_seed(0)
    model = decompose(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval())
    config = LR.LatencyConfig("executorch", (1,), ONE_THREAD, grid=16, cache=tmp_path / "cache.json")
    result = LR.latency_prune(model, (3, 8, 8), 0.05, 0.5, config)
    record = result.record
    assert record["runtime"] == "executorch" and record["target"]["provider"] == "XNNPACK"
    assert record["mean_discarded"] <= record["budget"] * (1 + 1e-9) and record["target"]["timed"] > 0
    assert {name: layer.rank for name, layer in svd_layers(model)} == {
        n: layer["allocated"] if layer["allocated"] != "dense" else dict(svd_layers(model))[n].full_rank
        for n, layer in record["layers"].items()}
    assert load_recipe(REPO / "recipes/quickstart.toml", ["prune.latency=executorch"]).prune.latency == "executorch"


@torch.no_grad()
def test_int8_keeps_the_convs_beyond_the_error_bound_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    plain, _ = to_plain(model, (3, 8, 8))
    batches = [np.random.default_rng(i).standard_normal((8, 3, 8, 8)).astype(np.float32) for i in range(3)]
    x = torch.from_numpy(batches[0])
    q_all, all_int8 = et.quantize_checked(plain, (3, 8, 8), batches, max_layer_error=1.0)
    q_none, none_int8 = et.quantize_checked(plain, (3, 8, 8), batches, max_layer_error=0.0)
    errors = all_int8["layer_errors"]
    assert set(errors) == {"0", "2"} and all(0 < e < 0.1 for e in errors.values()) and errors == none_int8["layer_errors"]
    assert all_int8["float_layers"] == [] and none_int8["float_layers"] == ["0", "2"]
    # through XNNPACK: int8 convs move the output a little; with both in float only the linear layer is int8
    error = {name: relative_error(torch.from_numpy(et.ExecutorchRunner(ONE_THREAD, programs={8: et.lower(q, x)}).run(x.numpy())), plain(x))
             for name, q in (("all", q_all), ("none", q_none))}
    assert 0 < error["none"] < error["all"] < 0.1


def test_int8_export_of_the_quickstart_holds_accuracy_on_executorch(quickstart_run, tmp_path):
    config = ExportConfig(runtime="executorch", tune=NO_TUNE, options=RuntimeOptions(threads=1, precision="int8"),
                          quant=QuantConfig(images=256))
    result = export_run(quickstart_run, tmp_path / "art", config)
    q = result.meta["quantization"]
    assert q["runtime"] == "executorch" and q["reference"] == {"dense_fp32": "dense.onnx"}
    assert set(result.meta["pte"]) == {"lowrank", "dense", "dense_fp32"}
    for m in ("lowrank", "dense"):
        evidence = result.plan.quantization[m]
        assert evidence["float_layers"] == sorted(n for n, e in evidence["layer_errors"].items() if e > 0.1)
        assert evidence["check"]["top1_agree"] > 0.9
    checked = verify_artifacts(tmp_path / "art", options=ONE_THREAD, config=QUICK)  # tolerance 0.5 points in int8
    assert checked.passed, checked.failures
    assert all("speedup_over_fp32" in row for row in checked.report["latency"])
    with pytest.raises(LrexportError, match="holds int8 models as ExecuTorch programs"):
        verify_artifacts(tmp_path / "art", runtime="ort")


def test_without_executorch_each_command_is_one_line(exported, run, tmp_path):
    blocker = tmp_path / "blocker" / "executorch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('executorch is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(REPO)]), OMP_NUM_THREADS="1")
    commands = {"export": ["export", str(run), "--runtime", "executorch", "--output", str(tmp_path / "out")],
                "verify": ["verify", str(exported.out_dir)]}
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "lrexport", *args], env=env, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, proc.stderr[-2000:])
        assert 'ExecuTorch is not installed' in lines[0] and 'pip install "lrexport[executorch]"' in lines[0], name
    assert not (tmp_path / "out").exists()
    assert json.loads((exported.out_dir / "meta.json").read_text())["runtime"] == "executorch"


def candidate_sources(precision: str, candidates=(DENSE, 8)):
    """Tuning's candidates of a small layer at batch 2, as ExecuTorch takes them."""
    from lrexport.deploy.planning.tune import LayerShape, layer_source

    shape = LayerShape("channel", 16, 16, 3, 3, (1, 1), (1, 1), (1, 1), (8, 8))
    return {c: layer_source(shape, c, 2, "executorch", precision) for c in candidates}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_candidates_lowered_together_run_as_each_lowered_alone(precision):
    """open_many lowers the candidates in one bundle; each program it cuts out computes what its module lowered
    alone does (int8: the same calibration, so the same ranges) and what PyTorch does."""
    from lrexport.deploy.backends import open_runners

    options = RuntimeOptions(threads=1, precision=precision)
    sources = candidate_sources(precision, (DENSE, 4, 8, "context-in") if precision == "fp32" else (DENSE, 8))
    together = open_runners("executorch", sources, options)
    alone = {k: et.BACKEND.open(s, et.RUNTIMES["executorch"].resolve(options)) for k, s in sources.items()}
    x = np.random.default_rng(0).standard_normal((2, 16, 8, 8), dtype=np.float32)
    for k, source in sources.items():
        assert together[k].module is None and list(together[k].programs) == [2]  # a program from the bundle
        out = together[k].run(x)
        np.testing.assert_allclose(out, alone[k].run(x), rtol=0, atol=1e-5)
        with torch.no_grad():
            reference = source.torch()(torch.from_numpy(x))
        assert relative_error(torch.from_numpy(out), reference) < (1e-5 if precision == "fp32" else 0.1)


def test_candidates_lowered_by_workers_are_the_programs_lowered_here(monkeypatch):
    """More candidates than one bundle holds: the bundles are lowered by worker processes, into the very programs
    lowering them here gives."""
    from lrexport.deploy.backends import open_runners
    from lrexport.deploy.backends.workers import deal

    monkeypatch.setattr(et, "BUNDLE_SIZE", 2)
    sources = candidate_sources("fp32", (DENSE, 4, 8, "context-in"))
    runners = open_runners("executorch", sources, ONE_THREAD)
    for chunk in deal(list(sources), 2):
        here = et.lower_bundle([sources[k].torch() for k in chunk], [sources[k].input_shape for k in chunk], False)
        assert [runners[k].programs[2] for k in chunk] == here


class Cumulative(nn.Module):
    """A conv and an op XNNPACK does not take (ExecuTorch's portable kernels run it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(x).cumsum(1)


def test_a_bundle_not_one_delegate_per_module_is_lowered_one_by_one():
    from lrexport.deploy.backends import ModelSource, open_runners

    torch.manual_seed(0)
    sources = candidate_sources("fp32")
    odd = Cumulative().eval()
    modules = [s.torch() for s in sources.values()] + [odd]
    assert et.lower_many(et.Bundle(modules).eval(), [torch.zeros(2, 16, 8, 8) for _ in modules]) is None
    sources["odd"] = ModelSource(torch=lambda: odd, input_shape=(2, 16, 8, 8))
    sources["no shape"] = ModelSource(torch=lambda: odd)
    runners = open_runners("executorch", sources, ONE_THREAD)
    x = np.random.default_rng(0).standard_normal((2, 16, 8, 8), dtype=np.float32)
    for k, source in sources.items():
        assert runners[k].module is not None  # lowered on its own
        with torch.no_grad():
            assert relative_error(torch.from_numpy(runners[k].run(x)), source.torch()(torch.from_numpy(x))) < 1e-5


def test_tuning_with_candidates_lowered_together_times_what_one_by_one_does(tmp_path, monkeypatch):
    from functools import partial

    from lrexport.deploy.backends import Backend
    from lrexport.deploy.planning.tune import tune

    torch.manual_seed(0)
    model = decompose(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval())
    layers = tune_layers_of(model, (16, 8, 8))
    target = make_target("executorch", ONE_THREAD, (1,))
    timing = {"warmup": 1, "budget_ms": 10.0, "min_repeats": 3, "max_repeats": 3}
    events = []
    together = tune(layers, target, TuneCache(tmp_path / "together.json"), progress=events.append, **timing)
    assert [e.text for e in events if hasattr(e, "text")][0].startswith("  tune: preparing")
    monkeypatch.setattr(et.BACKEND, "open_many", partial(Backend.open_many, et.BACKEND))  # the default: one by one
    alone = tune(layers, target, TuneCache(tmp_path / "alone.json"), **timing)
    assert together.cache_misses == alone.cache_misses > 0
    assert [set(c.times_ms) for c in together.choices] == [set(c.times_ms) for c in alone.choices]
    assert set(TuneCache(tmp_path / "together.json").entries) == set(TuneCache(tmp_path / "alone.json").entries)
