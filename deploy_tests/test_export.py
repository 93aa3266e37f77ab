"""ONNX export of a run: clean graphs, the ranks as planned, parity with PyTorch."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.export import ExportCheckError, ExportConfig, export_run
from lrexport.deploy.onnx_graph import conv_weight_shapes
from lrexport.rundir import open_run
from lrexport.lowrank.rewrite import relative_error
from lrexport.train.checkpoint import load_model

from runs import NO_TUNE, expected_conv_shapes

# what a ResNet needs, nothing that reshapes or multiplies weights at run time
STANDARD_OPS = {"Conv", "Relu", "Add", "GlobalAveragePool", "ReduceMean", "Flatten", "Gemm", "MaxPool", "Pad", "Slice"}


def val_images(run, n=32) -> np.ndarray:
    val = open_run(run).validation_set()
    return torch.stack([val[i][0] for i in range(n)]).numpy()


def ort_logits(path, x) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_artifacts_hold_checked_clean_graphs(exported):
    run, result = exported
    art = result.out_dir
    assert art == run / "artifacts"
    for name in ("model.onnx", "dense.onnx"):
        proto = onnx.load(str(art / name))
        onnx.checker.check_model(proto, full_check=True)
        ops = Counter(node.op_type for node in proto.graph.node)
        assert set(ops) <= STANDARD_OPS, ops
        assert "BatchNormalization" not in ops and "Identity" not in ops
        assert [i.name for i in proto.graph.input] == ["input"]
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch by default
    assert json.loads((art / "meta.json").read_text()) == result.meta


def test_conv_channel_counts_in_onnx_match_the_planned_ranks(exported):
    run, result = exported
    meta = result.meta
    layers = meta["models"]["lowrank"]["layers"]
    mode = {layer["kind"] for layer in layers}.pop().removeprefix("svd-")
    # the fixture is built so that both deployments occur
    assert any(layer["dense"] for layer in layers) and any(not layer["dense"] for layer in layers)
    for layer in layers:
        if not layer["dense"]:
            assert layer["deployed_rank"] % 8 == 0 and layer["rank"] <= layer["deployed_rank"] < layer["break_even"]
        else:
            assert -(-layer["rank"] // 8) * 8 >= layer["break_even"]
    model = onnx.load(str(result.out_dir / "model.onnx"))
    assert sorted(conv_weight_shapes(model)) == expected_conv_shapes(run, layers, mode)
    dense = onnx.load(str(result.out_dir / "dense.onnx"))
    dense_convs = [tuple(m.weight.shape) for m in load_model(run / "checkpoints/dense.pt")[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(conv_weight_shapes(dense)) == sorted(dense_convs)


def test_onnxruntime_matches_pytorch_on_validation_images(exported):
    run, result = exported
    x = val_images(run)
    for file, ckpt in (("model.onnx", "finetune_best.pt"), ("dense.onnx", "dense.pt")):
        model, _ = load_model(run / "checkpoints" / ckpt)
        with torch.no_grad():
            ref = model.eval()(torch.from_numpy(x))
        out = torch.from_numpy(ort_logits(result.out_dir / file, x))
        assert relative_error(out, ref) < 1e-4
        assert torch.equal(out.argmax(1), ref.argmax(1))


def test_meta_describes_inputs_macs_and_source(exported):
    run, result = exported
    meta = result.meta
    summary = json.loads((run / "summary.json").read_text())
    assert meta["input"]["shape"] == [None, 3, 16, 16]
    assert meta["input"]["mean"] == summary["data_info"]["mean"] and meta["input"]["std"] == summary["data_info"]["std"]
    assert meta["class_names"] == summary["data_info"]["class_names"]
    lr, dense = meta["models"]["lowrank"], meta["models"]["dense"]
    assert dense["macs"] == dense["deployed_macs"] > lr["deployed_macs"] >= lr["macs"]
    assert meta["macs_speedup"] == pytest.approx(dense["macs"] / lr["macs"])
    assert meta["source"]["recipe_hash"] == summary["recipe_hash"] and meta["source"]["name"] == summary["name"]
    assert {"torch", "onnx", "onnxruntime", "lrexport"} <= set(meta["versions"])
    assert all(c["rel_err"] < 1e-4 for c in meta["checks"]["results"])
    assert dense["bn_folded"] == lr["bn_folded"] == 21 and lr["bn_left"] == 0


def test_fixed_batch_and_exact_ranks(channel_export, tmp_path):
    run, _ = channel_export
    result = export_run(run, tmp_path / "b4", ExportConfig(batch=4, multiple_of=1, check_images=10, tune=NO_TUNE))
    proto = onnx.load(str(tmp_path / "b4/model.onnx"))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 16, 16]
    layers = result.meta["models"]["lowrank"]["layers"]
    assert [layer["deployed_rank"] for layer in layers] == [None if layer["dense"] else layer["rank"] for layer in layers]
    assert sorted(conv_weight_shapes(proto)) == expected_conv_shapes(run, layers, "channel")
    x = val_images(run, 4)
    with torch.no_grad():
        ref = load_model(run / "checkpoints/finetune_best.pt")[0].eval()(torch.from_numpy(x))
    assert relative_error(torch.from_numpy(ort_logits(tmp_path / "b4/model.onnx", x)), ref) < 1e-4


def test_mismatch_beyond_tolerance_fails_and_writes_nothing(channel_export, tmp_path):
    run, _ = channel_export
    with pytest.raises(ExportCheckError, match=r"relative error \d.*max \|diff\|"):
        export_run(run, tmp_path / "strict", ExportConfig(tolerance=1e-12, check_images=8))
    assert not (tmp_path / "strict").exists()


def test_cli_export_defaults_to_newest_run(channel_export, tmp_path, monkeypatch):
    run, _ = channel_export
    shutil.copytree(run, tmp_path / "runs" / run.name, ignore=shutil.ignore_patterns("artifacts"))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["export", "--check-images", "8", "--no-tune"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / run.name / "artifacts/model.onnx").is_file()
    assert "MACs speedup" in res.output
    res = CliRunner().invoke(main, ["export", str(tmp_path)])  # not a run directory
    assert res.exit_code == 1 and "no summary.json" in res.output


def test_run_without_finetuned_checkpoint_is_clear(channel_export, tmp_path):
    run, _ = channel_export
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "summary.json", partial)
    shutil.copy(run / "checkpoints/dense.pt", partial / "checkpoints")
    res = CliRunner().invoke(main, ["export", str(partial)])
    assert res.exit_code == 1 and "finetune_best.pt" in res.output
