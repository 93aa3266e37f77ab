"""prune.latency = "ort" end to end on the real onnxruntime runner: train (tiny), allocate, export, verify, report."""

import json

import pytest
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.planning import latency_ranks as LR
from lrexport.deploy.export import ExportConfig, export_run
from lrexport.deploy.planning.plan import TuneConfig, plan_export
from lrexport.deploy.backends import RuntimeOptions
from lrexport.lowrank import svd_layers
from lrexport.recipe import load_recipe
from lrexport.report import build_report
from lrexport.train import run_recipe
from lrexport.train.checkpoint import load_model

from runs import expected_conv_shapes
from runs import REPO


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """The quickstart recipe shrunk to seconds, its ranks allocated by latency on onnxruntime."""
    overrides = [
        "data.train_size=256", "data.val_size=64", "data.batch_size=64", "data.eval_batch_size=64", "device=cpu",
        "phases.dense.epochs=2", "phases.svd.epochs=1", "phases.finetune.epochs=1", "prune.energy=0.05",
        "prune.latency=ort", "prune.latency_batches=[1, 4]", "prune.latency_threads=1",
    ]
    with pytest.MonkeyPatch.context() as mp:  # a short timing budget: the test checks bookkeeping, not speed
        mp.setattr(LR, "TIMING", {"warmup": 1, "budget_ms": 20.0, "min_repeats": 3, "max_repeats": 5})
        recipe = load_recipe(REPO / "recipes/quickstart.toml", overrides)
        return run_recipe(recipe, tmp_path_factory.mktemp("runs") / "latency").run_dir


def test_summary_records_the_allocation_and_finetuning_used_it(latency_run):
    s = json.loads((latency_run / "summary.json").read_text())
    rec = s["latency_ranks"]
    assert rec["runtime"] == "ort" and rec["target"]["batches"] == [1, 4] and rec["target"]["threads"] == 1
    assert rec["mean_discarded"] <= rec["budget"] * (1 + 1e-9)
    assert rec["predicted_ms"] <= rec["energy_rule_ms"] + 1e-12
    model, _ = load_model(latency_run / "checkpoints/finetune_best.pt")
    layers = dict(svd_layers(model))
    for name, layer in rec["layers"].items():
        assert layer["discarded"] <= rec["cap"]
        want = layers[name].full_rank if layer["allocated"] == "dense" else layer["allocated"]
        assert layers[name].rank == want == s["ranks"][name]["final"]


def test_export_deploys_exactly_the_allocated_ranks(latency_run, tmp_path):
    config = ExportConfig(options=RuntimeOptions(threads=1), tune=TuneConfig(guard=False))
    result = export_run(latency_run, tmp_path / "art", config)
    allocated = {n: l["allocated"] for n, l in json.loads((latency_run / "summary.json").read_text())["latency_ranks"]["layers"].items()}
    assert result.plan.deployed == "allocated" and result.plan.layers == allocated
    layers = result.meta["models"]["lowrank"]["layers"]
    assert {l["name"]: "dense" if l["dense"] else l["deployed_rank"] for l in layers} == allocated
    import onnx

    shapes = sorted(tuple(t.dims) for t in onnx.load(tmp_path / "art/model.onnx").graph.initializer if len(t.dims) == 4)
    assert shapes == expected_conv_shapes(latency_run, layers, "channel")
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "art"), "--threads", "1", "--warmup", "1", "--repeats", "3"])
    assert res.exit_code == 0, res.output


def guarded_plan(run_dir, allocation):
    """The export's plan of the run's model for ort at batch 1, had its prune step allocated ``allocation(layer)``."""
    model, _ = load_model(run_dir / "checkpoints/finetune_best.pt")
    allocated = {name: allocation(layer) for name, layer in svd_layers(model)}
    config = TuneConfig(batches=(1,), guard_budget_ms=200.0)
    return plan_export(model, (3, 16, 16), "ort", RuntimeOptions(threads=1), config, None, 1, allocated=allocated), allocated


def test_the_guard_times_an_allocation_against_all_dense(latency_run):
    # the run's own allocation may come out all dense on a slow tiny model (then there is nothing to guard),
    # so the guard is given one with every layer a thin pair at its trained rank
    plan, allocated = guarded_plan(latency_run, lambda layer: layer.rank)
    # the guard keeps it or, if slower than dense (or than the MACs rule, where that differs), deploys that
    assert plan.deployed in ("allocated", "dense", "untuned") and len(plan.guard) == 1
    row = plan.guard[0]
    assert row["batch"] == 1 and row["rounds"] >= 21
    assert "allocated" in row and "dense" in row  # timed under its own name, even where the MACs rule agrees
    if plan.deployed == "allocated":
        assert plan.layers == allocated
    assert plan.tune is None  # nothing tuned: the ranks were chosen before finetuning


def test_an_all_dense_allocation_is_not_timed_as_low_rank(latency_run):
    plan, _ = guarded_plan(latency_run, lambda layer: "dense")
    if plan.guard:  # the MACs rule decomposes some layer: the guard times it against the allocation (all dense)
        assert plan.deployed in ("dense", "untuned") and "untuned" in plan.guard[0] and "allocated" not in plan.guard[0]
    else:
        assert plan.deployed == "dense" and "allocated every layer dense" in plan.note


def test_report_shows_the_allocated_ranks(latency_run, tmp_path):
    text = (build_report([latency_run], tmp_path / "report").output / "report.md").read_text()
    assert "Latency-allocated ranks" in text and "| layer1.0.conv1 |" in text and "ms all dense (" in text
