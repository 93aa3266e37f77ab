"""int8 export: onnxruntime's static QDQ quantization, calibrated on the run's images, verified through the runtime."""

import json
import shutil
from collections import Counter

import onnx
import pytest
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.export import ExportConfig, export_run
from lrexport.deploy.backends.qdq import QuantConfig, layer_errors, quantize, random_batches
from lrexport.deploy.backends import RuntimeOptions
from lrexport.deploy.verify import VerifyConfig, verify_artifacts
from runs import NO_TUNE, one_line

INT8 = RuntimeOptions(threads=1, precision="int8")


@pytest.fixture(scope="module")
def int8_export(quickstart_run, tmp_path_factory):
    config = ExportConfig(check_images=16, options=INT8, tune=NO_TUNE, quant=QuantConfig(images=128))
    return quickstart_run, export_run(quickstart_run, tmp_path_factory.mktemp("int8") / "art", config)


def ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_int8_artifacts_are_quantized_graphs_with_their_evidence(int8_export):
    _, result = int8_export
    art, meta = result.out_dir, result.meta
    for name in ("model.onnx", "dense.onnx"):
        assert ops(art / name)["QuantizeLinear"] > 0 and ops(art / name)["DequantizeLinear"] > ops(art / name)["QuantizeLinear"]
    assert "QuantizeLinear" not in ops(art / "dense_fp32.onnx")  # the reference verify times against
    assert meta["precision"] == "int8" and meta["quantization"]["calibration"] == {"split": "train", "images": 128}
    plan = json.loads((art / "plan.json").read_text())
    q = plan["quantization"]
    convs = ops(art / "dense_fp32.onnx")["Conv"]
    assert len(q["dense"]["layer_errors"]) == convs and q["dense"]["float_layers"] == []
    assert all(0 < e < q["dense"]["max_layer_error"] for e in q["dense"]["layer_errors"].values())
    assert q["lowrank"]["check"]["top1_agree"] >= 0.9 and q["dense"]["check"]["top1_agree"] >= 0.9


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_int8_accuracy_through_the_runtime_is_within_half_a_point(int8_export, runtime):
    _, result = int8_export
    res = verify_artifacts(result.out_dir, runtime, RuntimeOptions(threads=1), VerifyConfig(batch_sizes=(2,), warmup=1, repeats=3))
    report = res.report
    assert report["precision"] == "int8" and report["settings"]["precision"] == "int8" and report["tolerance"] == 0.5
    assert res.passed, res.failures
    for m in ("lowrank", "dense"):  # through int8, against PyTorch's fp32 model on the same images
        assert abs(report["accuracy"][m]["top1"] - report["accuracy"][m]["torch_top1"]) <= 0.5
    [row] = report["latency"]
    assert row["dense_fp32"]["repeats"] == 3 and row["speedup_over_fp32"] > 0 and row["dense_speedup_over_fp32"] > 0


def test_a_layer_beyond_the_error_bound_stays_in_float(channel_export, tmp_path):
    _, result = channel_export
    fp32 = onnx.load(str(result.out_dir / "model.onnx"))
    batches = random_batches((4, 3, 16, 16), count=2)
    qdq = quantize(fp32, batches)
    errors = layer_errors(fp32, qdq, batches)
    assert set(errors) == {n.name for n in fp32.graph.node if n.op_type == "Conv"} and all(e > 0 for e in errors.values())
    worst = max(errors, key=errors.get)
    # a bound just below the worst layer's error leaves exactly that layer in float
    from lrexport.deploy.backends.qdq import quantize_checked

    mixed, evidence = quantize_checked(fp32, batches, errors[worst] * 0.999)
    assert evidence["float_layers"] == [worst]
    made_by = {out: n for n in mixed.graph.node for out in n.output}
    conv = next(n for n in mixed.graph.node if n.name == worst)
    assert made_by.get(conv.input[1]) is None or made_by[conv.input[1]].op_type != "DequantizeLinear"


def test_int8_without_calibration_images_or_int8_support_is_one_line(channel_export, tmp_path):
    run, _ = channel_export
    gone = shutil.copytree(run, tmp_path / "gone", ignore=shutil.ignore_patterns("artifacts"))
    summary = json.loads((gone / "summary.json").read_text())
    summary["data_config"] |= {"dataset": "imagefolder", "root": str(tmp_path / "moved-away")}
    (gone / "summary.json").write_text(json.dumps(summary))
    res = CliRunner().invoke(main, ["export", str(gone), "--precision", "int8", "--no-tune"])
    assert res.exit_code == 2 and "calibrates on the run's train images" in one_line(res)
    assert not (gone / "artifacts").exists()
    res = CliRunner().invoke(main, ["export", str(run), "--precision", "int8", "--runtime", "torch", "--output", str(tmp_path / "t")])
    assert res.exit_code == 2 and "int8" in one_line(res) and not (tmp_path / "t").exists()


def test_cli_int8_export_then_verify_prints_the_fp32_reference(int8_export):
    _, result = int8_export
    res = CliRunner().invoke(main, ["verify", str(result.out_dir), "--threads", "1", "--warmup", "1", "--repeats", "3", "--batch-sizes", "1"])
    assert res.exit_code == 0, res.output
    assert "(int8)" in res.output and "vs fp32: of dense fp32/low-rank" in " ".join(res.output.split())
    assert "dense_fp32" in json.loads((result.out_dir / "verify.json").read_text())["latency"][0]
