"""Channel-pruned runs deploy like any other: a sweep over the methods exports and verifies each result on
onnxruntime in the same command, the ONNX files reproduce the checkpoints, and the report compares the methods
in measured wall-clock."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.report import build_report
from lrexport.train.checkpoint import load_model

from runs import IMAGE_SIZE

METHODS = ("channels", "channels+lowrank")


@pytest.fixture(scope="module")
def swept(tiny_recipe, tmp_path_factory):
    recipe = tiny_recipe(f"data.image_size={IMAGE_SIZE}", 'model.kwargs.shortcut="B"', "device=cpu", "channels.speedup=2",
                         "phases.recover.epochs=1", "phases.recover.lr=0.01", "prune.energy=0.2")
    out = tmp_path_factory.mktemp("sweep") / "out"
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--grid", f"method={','.join(METHODS)}", "--runtime", "ort",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.parametrize("method", METHODS)
def test_each_leaf_is_exported_and_verified_on_the_runtime(swept, method):
    out, _ = swept
    run = out / f"method={method}"
    verify = json.loads((run / "artifacts" / "verify.json").read_text())
    assert verify["runtime"] == "ort" and verify["passed"]
    assert verify["accuracy"]["lowrank"]["top1_disagree"] == 0
    assert {row["batch"] for row in verify["latency"]} == {1, 8}
    # the deployed graph reproduces the run's checkpoint, run here independently of export's own check: the trained
    # model, or the dense one where the guard measured the pruned network slower than it
    original = json.loads((run / "artifacts" / "plan.json").read_text())["deployed"] == "original"
    model, _ = load_model(run / "checkpoints" / ("dense.pt" if original else "finetune_best.pt"))
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    session = ort.InferenceSession(str(run / "artifacts" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4
    summary = json.loads((run / "summary.json").read_text())
    # both against the unpruned model
    assert verify["macs"]["speedup"] == pytest.approx(1.0 if original else summary["macs_speedup"], rel=1e-6)


def test_sweep_table_and_report_put_measured_speedups_beside_accuracy(swept, tmp_path):
    out, output = swept
    assert "wall b1" in output and "wall b8" in output and "exporting for ort and verifying" in output
    report = build_report([out], tmp_path / "report")
    assert {r.method for r in report.rows} == set(METHODS) and all(set(r.wall) == {1, 8} for r in report.rows)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Pareto front" in md and "| wall-clock speedup, batch 8 |" in md
    assert (tmp_path / "report" / "pareto-cifar_resnet20-synthetic.png").is_file()


def test_a_rerun_sweep_keeps_verified_leaves(swept, tiny_recipe):
    """Verified since it last trained: a rerun neither trains nor exports it again."""
    out, _ = swept
    verify = out / "method=channels" / "artifacts" / "verify.json"
    stamp = verify.stat().st_mtime_ns
    recipe = json.loads((out / "sweep.json").read_text())["recipe"]
    result = CliRunner().invoke(main, ["sweep", recipe, "--grid", f"method={','.join(METHODS)}", "--runtime", "ort", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "exporting" not in result.output and verify.stat().st_mtime_ns == stamp



def test_the_guard_holds_a_narrower_model_against_the_one_before_pruning(tiny_recipe, tmp_path):
    """Every layer dense is still the narrower network: the guard times the model before pruning too, and what
    goes out is whichever it measured fastest, the pruned model or (never slower than dense) the dense one."""
    from lrexport.deploy.export import ExportConfig, export_run
    from lrexport.recipe import load_recipe
    from lrexport.train import run_recipe

    recipe = load_recipe(tiny_recipe(f"data.image_size={IMAGE_SIZE}", "device=cpu", "method=channels", "channels.ratio=0.5",
                                     "phases.finetune.epochs=0"))
    run = run_recipe(recipe, tmp_path / "run").run_dir
    exported = export_run(run, config=ExportConfig())
    plan = exported.plan
    # every speedup is over the model before pruning
    assert plan.guard and all(row["original"]["speedup_over_dense"] == 1.0 and "dense" in row for row in plan.guard)
    assert exported.meta["channels_pruned"] is True
    x = np.random.default_rng(0).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    outputs = {}
    for m in ("model", "dense"):
        session = ort.InferenceSession(str(exported.out_dir / f"{m}.onnx"), providers=["CPUExecutionProvider"])
        outputs[m] = session.run(None, {session.get_inputs()[0].name: x})[0]
    lowrank_macs, dense_macs = (exported.meta["models"][m]["macs"] for m in ("lowrank", "dense"))
    if plan.deployed == "original":  # nothing of the pruned model was faster: the dense model went out as model.onnx
        assert np.array_equal(outputs["model"], outputs["dense"]) and lowrank_macs == dense_macs
    else:
        worst = min(row[plan.deployed]["speedup_over_dense"] for row in plan.guard)
        assert worst >= 1.0 and lowrank_macs < dense_macs
