"""verify: accuracy and latency through the runtime itself, against PyTorch's."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.onnx_graph import to_onnx
from lrexport.rundir import open_run
from lrexport.deploy.backends import RuntimeOptions
from lrexport.deploy.verify import VerifyConfig, VerifyError, verify_artifacts
from lrexport.train.checkpoint import load_model
from runs import NO_TUNE, one_line

ONE_THREAD = RuntimeOptions(threads=1)
FAST = dict(options=ONE_THREAD, config=VerifyConfig(batch_sizes=(1, 8), warmup=1, repeats=3))


def torch_top1(model_path, val) -> float:
    """Top-1 accuracy (%) of a checkpoint on the validation set, in PyTorch."""
    model, _ = load_model(model_path)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([int(val[i][1]) for i in range(len(val))])
    with torch.no_grad():
        return 100.0 * (model.eval()(x).argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("runtime", ["ort", "openvino", "torch"])
def test_accuracy_through_runtime_equals_pytorch(channel_export, runtime, tmp_path):
    run, result = channel_export
    # from the artifacts alone: copied away from the run, the run's checkpoints gone
    art = shutil.copytree(result.out_dir, tmp_path / "art")
    shutil.move(run / "checkpoints", tmp_path / "ckpt")
    try:
        res = verify_artifacts(art, runtime=runtime, **FAST)
    finally:
        shutil.move(tmp_path / "ckpt", run / "checkpoints")
    report = res.report
    assert res.passed and report["passed"] and report["failures"] == []
    val = open_run(run).validation_set()
    acc = report["accuracy"]
    assert acc["images"] == len(val) == 64
    assert report["settings"]["runtime"] == runtime and report["settings"]["threads"] == 1
    assert acc["lowrank"]["top1"] == pytest.approx(torch_top1(run / "checkpoints/finetune_best.pt", val))
    assert acc["dense"]["top1"] == pytest.approx(torch_top1(run / "checkpoints/dense.pt", val))
    for m in ("lowrank", "dense"):
        assert acc[m]["top1_disagree"] == 0
        assert acc[m]["top1"] == acc[m]["torch_top1"] and acc[m]["top5"] == acc[m]["torch_top5"]
        assert acc[m]["top1"] <= acc[m]["top5"]
    assert [row["batch"] for row in report["latency"]] == [1, 8]
    for row in report["latency"]:
        for m in ("lowrank", "dense"):
            stats = row[m]
            assert stats["repeats"] == 3 and 0 < stats["min_ms"] <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
        assert row["wall_speedup"] > 0  # the median of per-round ratios (lrexport.deploy.timing)
        assert row["ratio"] == pytest.approx(row["wall_speedup"] / report["macs"]["speedup"])
    assert report["threads"] == 1 and report["runtime"] == runtime
    assert json.loads((art / "verify.json").read_text()) == json.loads(json.dumps(report))


def test_fixed_batch_artifacts_are_timed_at_their_batch(channel_export, tmp_path):
    from lrexport.deploy.export import ExportConfig, export_run

    run, _ = channel_export
    art = export_run(run, tmp_path / "b3", ExportConfig(batch=3, check_images=6, tune=NO_TUNE)).out_dir
    config = VerifyConfig(limit=10, warmup=1, repeats=3)
    report = verify_artifacts(art, options=ONE_THREAD, config=config).report  # 10 images: the last batch is padded
    assert [row["batch"] for row in report["latency"]] == [3]
    assert report["accuracy"]["images"] == 10
    assert report["accuracy"]["lowrank"]["top1_disagree"] == 0


def test_wrong_artifact_fails_verify_with_exit_1(channel_export, tmp_path):
    """A model.onnx that is not the run's model: accuracy through the runtime departs from PyTorch's."""
    run, result = channel_export
    art = tmp_path / "wrong"
    shutil.copytree(result.out_dir, art)
    val = open_run(run).validation_set()
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    torch_acc = torch_top1(run / "checkpoints/finetune_best.pt", val)
    # always answers one class, picked so its frequency differs from the real accuracy
    cls = next(c for c in range(10) if abs(100.0 * (labels == c).mean() - torch_acc) > 1)
    const = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 10).float())
    (art / "model.onnx").write_bytes(to_onnx(const, (3, 16, 16)).SerializeToString())
    with pytest.raises(VerifyError, match="lowrank top1 through ort"):
        verify_artifacts(art, **FAST).check()
    res = CliRunner().invoke(main, ["verify", str(art), "--threads", "1", "--warmup", "0", "--repeats", "2", "--batch-sizes", "2"])
    assert res.exit_code == 1, res.output
    assert "lowrank top1 through ort" in res.output
    assert json.loads((art / "verify.json").read_text())["passed"] is False


def test_cli_verify_prints_tables(channel_export):
    _, result = channel_export
    res = CliRunner().invoke(main, ["verify", str(result.out_dir), "--threads", "1", "--warmup", "1", "--repeats", "3"])
    assert res.exit_code == 0, res.output
    assert "accuracy through ort" in res.output and "wall x" in res.output and "median of per-round" in res.output
    notes = json.loads((result.out_dir / "verify.json").read_text())["notes"]  # timing-dependent: either way, printed as written
    assert all(f"note: {n}"[:60] in " ".join(res.output.split()) for n in notes)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_runtime_missing_is_one_line_exit_2(channel_export):
    _, result = channel_export
    res = CliRunner().invoke(main, ["verify", str(result.out_dir), "--runtime", "trt"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "TensorRT" in lines[0]


def test_missing_artifacts_is_clear(tmp_path):
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and "no meta.json" in res.output


def test_bad_artifacts_and_runtimes_are_one_line(channel_export, tmp_path):
    _, result = channel_export
    res = CliRunner().invoke(main, ["verify", str(result.out_dir), "--runtime", "tflite"])
    assert res.exit_code == 2 and "unknown runtime 'tflite'" in one_line(res)
    art = shutil.copytree(result.out_dir, tmp_path / "noplan")
    (art / "plan.json").unlink()
    res = CliRunner().invoke(main, ["verify", str(art)])
    assert res.exit_code == 1 and "plan.json" in one_line(res)
    # validation data that moved: an ImageFolder that is gone
    art = shutil.copytree(result.out_dir, tmp_path / "moved")
    meta = json.loads((art / "meta.json").read_text())
    meta["data_config"] |= {"dataset": "imagefolder", "root": str(tmp_path / "gone")}
    (art / "meta.json").write_text(json.dumps(meta))
    res = CliRunner().invoke(main, ["verify", str(art)])
    assert res.exit_code == 1 and "gone" in one_line(res)


def test_slower_low_rank_model_gets_a_note():
    from lrexport.deploy.verify import slower_than_dense

    rows = [{"batch": 1, "wall_speedup": 0.84}, {"batch": 8, "wall_speedup": 1.2}]
    (note,) = slower_than_dense(rows, "ort", deployed="untuned")
    assert "0.84x at batch 1" in note and "batch 8" not in note and "--no-tune" in note
    assert "--runtime ort --batch" in slower_than_dense(rows, "ort", deployed="tuned")[0]
    assert slower_than_dense([{"batch": 1, "wall_speedup": 0.98}], "ort", deployed="tuned") == []  # within noise


def test_predicted_time_is_the_deployed_models():
    from lrexport.deploy.verify import predicted_latency

    tune = {"predicted": [{"batch": 1, "tuned_ms": 0.2, "untuned_ms": 0.3, "dense_ms": 0.4}]}
    measured = [{"batch": 1, "lowrank": {"median_ms": 0.5}, "dense": {"median_ms": 0.45}}]
    for deployed, ms in (("tuned", 0.2), ("untuned", 0.3), ("dense", 0.4)):  # the guard's dense plan runs every layer dense
        [row] = predicted_latency({"deployed": deployed, "tune": tune}, measured)
        assert row["lowrank_ms"] == ms and row["dense_ms"] == 0.4 and row["measured_lowrank_ms"] == 0.5
    assert predicted_latency({"deployed": "allocated", "tune": None}, measured) == []  # nothing tuned, nothing predicted


def test_torch_on_cuda_without_a_gpu_is_one_line(channel_export):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: test_torch_runner_on_cuda covers it")
    _, result = channel_export
    res = CliRunner().invoke(main, ["verify", str(result.out_dir), "--runtime", "torch", "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA GPU visible" in one_line(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_runner_on_cuda(precision):
    from lrexport.deploy.backends.pytorch import TorchRunner
    from lrexport.deploy.timing import interleave

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10))
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    runner = TorchRunner(net.eval(), RuntimeOptions(device="cuda", precision=precision, channels_last=True))
    assert np.abs(runner.run(x) - ref).max() / np.abs(ref).max() < (1e-4 if precision == "fp32" else 5e-2)
    timed = interleave({"net": runner.bind(x)}, warmup=2, repeats=5, cuda=True)  # a CUDA-graph replay
    assert timed.clock == "cuda-events" and len(timed.times_ms["net"]) == 5 and runner.settings()["cuda_graph"]
