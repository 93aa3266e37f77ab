"""GPU tests: skipped, with the reason, where there is no GPU (or no TensorRT / onnxruntime-gpu).

The first test is the exception: the dry run of benchmarks/gpu/gpu_check.py runs its code paths on the CPU.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lrexport

HERE = Path(__file__).parent
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible (torch.cuda.is_available() is False)")
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs a CUDA GPU and TensorRT (pip install \"lrexport[trt]\")")


def load_gpu_check():
    """The script as a module (it is not in a package); dataclasses need it in sys.modules."""
    if "lrexport_gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lrexport_gpu_check", HERE.parents[1] / "benchmarks" / "gpu" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["lrexport_gpu_check"]


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    gpu_check = load_gpu_check()
    out = tmp_path / "report.json"
    gpu_check.main(["--dry-run", "--repeats", "2", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    text = capsys.readouterr().out
    assert "| model | batch | runtime |" in text and "dry run" in text
    report = json.loads(out.read_text())
    assert set(report["training"]["modes"]) == {"dense", "svd-channel", "svd-spatial"}
    runtimes = {row["runtime"] for row in report["latency"]}
    assert "pytorch" in runtimes and "tensorrt" in runtimes and any(r.startswith("onnxruntime") for r in runtimes)
    for row in report["latency"]:
        if row["runtime"] == "tensorrt":  # TensorRT needs a GPU: on the CPU it says what is missing
            assert row["note"].startswith("n/a: ") and "\n" not in row["note"]
        else:
            assert row["dense"]["repeats"] == 2 and row["lowrank"]["median_ms"] > 0
    assert report["macs"]["cifar_resnet20"]["speedup"] >= 2.0


def test_ranks_for_speedup_hits_the_target():
    gpu_check = load_gpu_check()
    model = lrexport.decompose(lrexport.create_model("cifar_resnet20", num_classes=10), "channel")
    ranks, speedup = gpu_check.ranks_for_speedup(model, (3, 32, 32), 2.0)
    layers = dict(lrexport.lowrank.svd_layers(model))
    assert speedup >= 2.0 and set(ranks) == set(layers)
    assert all(r % 8 == 0 or r == layers[name].full_rank for name, r in ranks.items())


# -- on a GPU ----------------------------------------------------------------------------------
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def export(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    return path


@needs_gpu
@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_svd_training_step_on_cuda_bf16(mode):
    model = lrexport.decompose(lrexport.create_model("cifar_resnet20", num_classes=10), mode).cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), torch.zeros(8, dtype=torch.long, device="cuda"))
        loss = loss + lrexport.orthogonality(model) + lrexport.hoyer(model)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@needs_trt
def test_trt_fp32_engine_matches_torch_and_reuses_timing_cache(tmp_path):
    from lrexport.deploy.backends.trt import TrtRunner, build_engine

    model = small_net()
    onnx_path = export(model, tmp_path / "m.onnx")
    engine = build_engine(onnx_path, tmp_path / "art", precision="fp32", batch_sizes=(1, 4), workspace_gb=1)
    assert engine.is_file() and (tmp_path / "art" / "timing.cache").stat().st_size > 0
    info = json.loads((tmp_path / "art" / "model.engine.json").read_text())
    assert info["profile"]["max"][0] == 4 and info["precision"] == "fp32"
    runner = TrtRunner(engine)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = runner.run(x)
    assert out.shape == ref.shape and np.abs(out - ref).max() / np.abs(ref).max() < 1e-4
    from lrexport.deploy.timing import interleave

    timing = interleave({"trt": runner.bind(np.resize(x, (4, *x.shape[1:])))}, warmup=5, repeats=20, cuda=True)
    assert len(timing.times_ms["trt"]) == 20 and timing.clock == "cuda-events"
    # after timing at batch 4, run() still works at another batch
    assert np.abs(runner.run(x[:1]) - ref[:1]).max() / np.abs(ref).max() < 1e-4
    build_engine(onnx_path, tmp_path / "art", precision="fp16", batch_sizes=(1, 4), workspace_gb=1, engine_name="fp16.engine")
    fp16 = TrtRunner(tmp_path / "art" / "fp16.engine").run(x)
    assert np.abs(fp16 - ref).max() / np.abs(ref).max() < 2e-2


@needs_trt
def test_trt_rejects_batches_outside_the_profile(tmp_path):
    from lrexport.deploy.backends.trt import TrtRunner, build_engine
    from lrexport.errors import LrexportError

    engine = build_engine(export(small_net(), tmp_path / "m.onnx"), tmp_path / "art", "fp32", (2, 4), workspace_gb=1)
    with pytest.raises(LrexportError, match="batches of 2…4"):
        TrtRunner(engine).run(np.zeros((5, 3, 32, 32), np.float32))


@needs_trt
def test_trt_int8_calibration_writes_its_cache(tmp_path):
    from lrexport.deploy.calibration import CalibrationReader
    from lrexport.deploy.backends.trt import TrtRunner, build_engine

    rng = np.random.default_rng(0)
    reader = CalibrationReader([rng.standard_normal((3, 32, 32), dtype=np.float32) for _ in range(16)], batch_size=8)
    engine = build_engine(export(small_net(), tmp_path / "m.onnx"), tmp_path / "art", "int8", (1, 8), reader, workspace_gb=1)
    assert (tmp_path / "art" / "calibration.cache").stat().st_size > 0
    assert TrtRunner(engine).run(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)


@needs_gpu
def test_ort_cuda_provider_runs_on_the_gpu(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from lrexport.deploy.backends.ort import CUDA, ort_providers, session_provider

    if CUDA not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (no CUDAExecutionProvider)")
    sess = ort.InferenceSession(str(export(small_net(), tmp_path / "m.onnx")), providers=ort_providers())
    assert session_provider(sess) == CUDA


@needs_gpu
def test_gpu_check_quick_on_gpu(tmp_path, capsys):
    gpu_check = load_gpu_check()
    gpu_check.main([
        "--image-size", "64", "--train-batch", "8", "--train-steps", "6", "--latency-batches", "1,2", "--repeats", "5",
        "--warmup", "2", "--models", "cifar_resnet20", "--train-model", "cifar_resnet20", "--workdir", str(tmp_path),
    ])
    text = capsys.readouterr().out
    assert "| cifar_resnet20 | 2 | pytorch | fp16 |" in text
