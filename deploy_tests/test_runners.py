"""The Runner protocol against the real runtimes installable here: ort, openvino, torch (CPU)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lrexport.deploy.onnx_graph import to_onnx
from lrexport.deploy.backends import RUNTIMES, ModelSource, RuntimeOptions, UnknownRuntimeError, get_runtime, open_runner
from lrexport.deploy.timing import interleave
from lrexport.errors import RuntimeMissingError

CPU_RUNTIMES = ["ort", "openvino", "torch"]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    source = ModelSource(onnx=to_onnx(module, (3, 8, 8)).SerializeToString(), torch=lambda: module, label="the test net")
    return module, source


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_each_runtime_runs_binds_and_reports_itself(net, runtime):
    module, source = net
    runner = open_runner(runtime, source, RuntimeOptions(threads=1))
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert np.abs(runner.run(x) - ref).max() < 1e-4
    assert np.abs(runner.run(x[:1]) - ref[:1]).max() < 1e-4  # another batch size in the same runner
    timed = interleave({"net": runner.bind(x)}, warmup=1, repeats=4)
    assert timed.clock == runner.clock == "wall" and len(timed.times_ms["net"]) == 4
    settings = runner.settings()
    assert settings["runtime"] == runtime and settings["threads"] == 1 and settings["precision"] == "fp32" and settings["version"]


def test_openvino_fp16_records_what_the_cpu_compiled(net):
    module, source = net
    runner = open_runner("openvino", source, RuntimeOptions(threads=1, precision="fp16"))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert np.abs(runner.run(x) - ref).max() < 0.05 * np.abs(ref).max() + 1e-3
    assert runner.settings()["float_precision"] in ("f16", "bf16", "f32")


def test_unknown_missing_and_unsupported_runtimes_are_one_line(net):
    _, source = net
    with pytest.raises(UnknownRuntimeError, match="choose one of ort, openvino, torch, executorch, litert, trt"):
        get_runtime("tflite")
    assert set(RUNTIMES) == {"ort", "openvino", "torch", "executorch", "litert", "trt"}
    with pytest.raises(RuntimeMissingError, match="int8"):
        open_runner("torch", source, RuntimeOptions(precision="int8"))
    with pytest.raises(RuntimeMissingError, match="CUDA"):
        open_runner("torch", source, RuntimeOptions(precision="fp16"))
    for runtime in ("ort", "executorch", "litert"):
        with pytest.raises(RuntimeMissingError, match="fp32 or int8"):
            open_runner(runtime, source, RuntimeOptions(precision="fp16"))


def test_ort_on_cuda_needs_its_provider(net):
    import onnxruntime

    _, source = net
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert open_runner("ort", source, RuntimeOptions(device="cuda")).settings()["provider"] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    else:
        with pytest.raises(RuntimeMissingError, match="onnxruntime-gpu"):
            open_runner("ort", source, RuntimeOptions(device="cuda"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alternate signal stack is restored on Linux")
def test_a_signal_after_openvino_models_are_gone_is_handled_not_a_segfault(tmp_path):
    """OpenVINO leaves the thread's alternate signal stack on freed memory: Ctrl-C or SIGTERM (which
    training turns into save-and-stop) after an OpenVINO model ran used to kill the process. In a
    subprocess: what is tested is whether the process survives."""
    pytest.importorskip("openvino")
    script = textwrap.dedent("""
        import gc, os, signal, time
        import numpy as np
        import torch
        from lrexport.deploy.onnx_graph import to_onnx
        from lrexport.deploy.backends.openvino import OpenVinoRunner, RuntimeOptions

        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)).eval()
        onnx = to_onnx(net, (3, 16, 16)).SerializeToString()
        runners = [OpenVinoRunner(onnx, RuntimeOptions(threads=1)) for _ in range(2)]
        for runner in runners:
            for batch in (1, 4):
                runner.run(np.zeros((batch, 3, 16, 16), np.float32))
        del runners, runner
        gc.collect()
        caught = []
        signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("caught", caught)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "caught [15]" in proc.stdout
