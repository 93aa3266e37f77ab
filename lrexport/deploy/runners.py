"""The runtimes a model can be deployed on, behind one ``Runner`` protocol.

A runner runs a float32 NCHW batch (``run``), prepares a batch for timing (``bind``:
input copied once, to the device where there is one, returning the call to time) and says
what it is (``settings``: runtime, version, device, threads, precision). Tuning, the
export's whole-model guard, verify and the benchmarks all open models through
``open_runner`` and time them with ``lrexport.deploy.timing``.

A model reaches a runtime as a ``ModelSource``: the ONNX graph (onnxruntime, OpenVINO), the
plain PyTorch module (torch; ExecuTorch lowers it), ExecuTorch programs or a TensorRT engine.
A runtime that is not installed is a ``RuntimeMissingError``: one line, exit 2.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..errors import LrexportError, RuntimeMissingError
from .timing import CUDA_EVENTS, WALL, cpu_name


class UnknownRuntimeError(LrexportError):
    exit_code = 2


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime runs a model: the settings a measurement is only valid for."""

    threads: int | None = None  # None: all CPUs
    device: str = "cpu"  # "cpu" or "cuda" (torch)
    precision: str = "fp32"  # "fp32"; "int8" (quantized ONNX: ort, openvino); "fp16" (openvino, torch on CUDA), "bf16" (torch on CUDA)
    channels_last: bool = False  # torch
    cuda_graph: bool = True  # torch on CUDA: replay the call as one CUDA graph

    @property
    def cpu_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class ModelSource:
    """One model in the forms runtimes take; each runtime reads the one it needs."""

    onnx: bytes | Path | None = None
    torch: Callable[[], object] | None = None  # builds the plain nn.Module
    engine: Path | None = None
    pte: dict[int, bytes | Path] | None = None  # ExecuTorch programs by batch
    label: str = "the model"


class Runner(Protocol):
    clock: str  # timing.WALL or timing.CUDA_EVENTS

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def bind(self, x: np.ndarray) -> Callable[[], object]: ...

    def settings(self) -> dict: ...


# -- OpenVINO --------------------------------------------------------------------------------------
def _openvino():
    try:
        import openvino
    except ImportError:
        raise RuntimeMissingError('OpenVINO is not installed: pip install "lrexport[openvino]"') from None
    return openvino


class _StackT(ctypes.Structure):  # Linux's stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _signal_stack(new: _StackT | None = None) -> _StackT | None:
    """The main thread's alternate signal stack (sigaltstack), set to ``new`` if given; None off Linux."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    old = _StackT()
    ctypes.CDLL(None).sigaltstack(None if new is None else ctypes.byref(new), ctypes.byref(old))
    return old


# OpenVINO's CPU plugin points the calling thread's alternate signal stack at memory of its own
# when it runs a model, and leaves it there once the model is gone: the next signal Python handles
# (Ctrl-C; SIGTERM, on which training saves and stops) then ran on freed memory and the process
# died of a segfault. Each runner puts back the stack the process had before OpenVINO ran.
_stack_before_openvino = functools.cache(_signal_stack)


class OpenVinoRunner:
    """An ONNX model compiled by OpenVINO for the CPU, once per input shape (static shapes run fastest)."""

    clock = WALL

    def __init__(self, model: bytes | Path, options: RuntimeOptions, label: str = "the model"):
        ov = _openvino()
        if options.device != "cpu" or options.precision not in ("fp32", "fp16", "int8"):
            raise RuntimeMissingError(f"lrexport runs OpenVINO on the CPU in fp32, fp16 or int8; got {options.device} {options.precision}")
        self.version = ov.__version__
        self.options = options
        _stack_before_openvino()
        self.core = ov.Core()
        try:
            if isinstance(model, bytes):
                with tempfile.TemporaryDirectory() as tmp:  # read_model takes ONNX from a file
                    path = Path(tmp) / "model.onnx"
                    path.write_bytes(model)
                    self.model = self.core.read_model(str(path))
            else:
                self.model = self.core.read_model(str(model))
        except Exception as e:  # OpenVINO raises its own RuntimeError subclasses
            raise LrexportError(f"OpenVINO cannot read {label}: {str(e).splitlines()[0]}") from None
        self.compiled: dict[tuple, object] = {}

    def _request(self, shape: tuple):
        if shape not in self.compiled:
            model = self.model.clone()
            model.reshape({0: list(shape)})
            config = {
                "INFERENCE_NUM_THREADS": self.options.cpu_threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                # float layers in fp32 unless fp16 is asked for (CPUs with AMX would otherwise run bf16);
                # an int8 (QDQ) model runs its quantized layers in int8 either way
                "INFERENCE_PRECISION_HINT": "f16" if self.options.precision == "fp16" else "f32",
            }
            self.compiled[shape] = self.core.compile_model(model, "CPU", config).create_infer_request()
        return self.compiled[shape]

    def __del__(self):
        self.compiled, self.model, self.core = {}, None, None  # their destructors move the stack too
        before = _stack_before_openvino()
        if before is not None:
            _signal_stack(before)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        request = self._request(x.shape)
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    def bind(self, x: np.ndarray):
        import openvino as ov

        x = np.ascontiguousarray(x, dtype=np.float32)
        request = self._request(x.shape)
        request.set_input_tensor(ov.Tensor(x))
        return request.infer

    def settings(self) -> dict:
        settings = {"runtime": "openvino", "version": self.version, "device": cpu_name(), "provider": "CPU",
                    "threads": self.options.cpu_threads, "precision": self.options.precision}
        if self.compiled:  # what the plugin made of the hint: "fp16" runs bf16 on CPUs that have bf16 but not fp16 units
            request = next(iter(self.compiled.values()))
            settings["float_precision"] = request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT").to_string()
        return settings


# -- PyTorch ------------------------------------------------------------------------------------------
class TorchRunner:
    """The plain (rewritten) PyTorch module: CPU, or CUDA in fp32/fp16/bf16, channels_last, CUDA-graph replay."""

    def __init__(self, module, options: RuntimeOptions):
        import torch

        self.torch, self.options = torch, options
        self.device = torch.device(options.device)
        if options.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeMissingError("no CUDA GPU visible (torch.cuda.is_available() is False); use --device cpu")
        if options.precision == "int8":
            raise RuntimeMissingError("the torch runtime does not run int8; int8 (QDQ ONNX) runs on ort or openvino")
        if options.device == "cpu" and options.precision != "fp32":
            raise RuntimeMissingError(f"torch runs {options.precision} on CUDA only; use fp32 on the CPU")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.precision]
        if options.device == "cpu" and options.threads:
            torch.set_num_threads(options.threads)  # the process's intra-op pool: what a deployed torch model uses
        self.format = torch.channels_last if options.channels_last else torch.contiguous_format
        # in eval mode already (plain rewrites, exported programs, which refuse .eval())
        self.module = module.to(self.device, self.dtype).to(memory_format=self.format)
        self.clock = CUDA_EVENTS if options.device == "cuda" else WALL

    def _input(self, x: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.to(self.device, self.dtype).contiguous(memory_format=self.format)

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.module(self._input(x)).float().cpu().numpy()

    def bind(self, x: np.ndarray):
        torch = self.torch
        static = self._input(x)

        def call():
            with torch.inference_mode():
                return self.module(static)

        if self.options.device != "cuda" or not self.options.cuda_graph:
            return call
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graphs asks
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            self._graph_out = self.module(static)  # the graph's output buffer must stay alive
        return graph.replay

    def settings(self) -> dict:
        torch = self.torch
        cuda = self.options.device == "cuda"
        return {
            "runtime": "torch", "version": torch.__version__, "device": torch.cuda.get_device_name() if cuda else cpu_name(),
            "provider": self.options.device, "threads": None if cuda else torch.get_num_threads(),
            "precision": self.options.precision, "channels_last": self.options.channels_last,
            "cuda_graph": cuda and self.options.cuda_graph,
        }


# -- the registry ----------------------------------------------------------------------------------------
def _open_ort(source: ModelSource, options: RuntimeOptions):
    from .providers import CPU, CUDA, ort_providers
    from .runtime import OrtRunner

    if options.precision not in ("fp32", "int8"):
        raise RuntimeMissingError(f"lrexport runs onnxruntime in fp32 or int8; got {options.precision}")
    providers = ort_providers(prefer_gpu=options.device == "cuda")
    if options.device == "cuda" and CUDA not in providers:
        raise RuntimeMissingError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu on a machine with an NVIDIA GPU")
    # wall-clock timing through host copies on CUDA: what a caller of session.run gets
    return OrtRunner(source.onnx, options.cpu_threads, options.precision, tuple(providers) if options.device == "cuda" else (CPU,))


def _open_openvino(source: ModelSource, options: RuntimeOptions):
    return OpenVinoRunner(source.onnx, options, source.label)


def _open_torch(source: ModelSource, options: RuntimeOptions):
    if source.torch is None:
        raise LrexportError(f"{source.label} has no PyTorch program; re-export it with this lrexport")
    return TorchRunner(source.torch(), options)


def _open_trt(source: ModelSource, options: RuntimeOptions):
    from .trt import TrtRunner

    if source.engine is None:
        raise RuntimeMissingError(f"{source.label} has no TensorRT engine; export with `lrexport export --format trt`")
    return TrtRunner(source.engine)


def _open_executorch(source: ModelSource, options: RuntimeOptions):
    from .executorch import ExecutorchRunner

    if source.pte:
        return ExecutorchRunner(options, programs=source.pte, label=source.label)
    if source.torch is None:
        raise LrexportError(f"{source.label} has no ExecuTorch program; export it with --runtime executorch")
    return ExecutorchRunner(options, module=source.torch(), label=source.label)


def _check_executorch() -> None:
    from .executorch import require

    require()


def _check_trt() -> None:
    from .trt import import_tensorrt, require_gpu

    import_tensorrt()
    require_gpu()


@dataclass(frozen=True)
class Runtime:
    name: str
    open: Callable[[ModelSource, RuntimeOptions], Runner]
    check: Callable[[], object]  # raises RuntimeMissingError where the runtime is not installed
    tunable: bool = True  # layers can be timed on it one by one
    onnx: bool = True  # it runs ONNX graphs (the others take the PyTorch module, or their own files)
    int8: bool = False  # it runs int8 models (export --precision int8)


RUNTIMES: dict[str, Runtime] = {
    "ort": Runtime("ort", _open_ort, lambda: __import__("onnxruntime"), int8=True),  # CPU provider; CUDA with onnxruntime-gpu
    "openvino": Runtime("openvino", _open_openvino, _openvino, int8=True),  # CPU plugin
    "torch": Runtime("torch", _open_torch, lambda: None, onnx=False),  # the plain module: CPU, or CUDA
    # PyTorch's edge runtime with XNNPACK: programs lowered from the module (lrexport.deploy.executorch)
    "executorch": Runtime("executorch", _open_executorch, _check_executorch, onnx=False, int8=True),
    "trt": Runtime("trt", _open_trt, _check_trt, tunable=False),  # engines built by export --format trt
}


def timing_source(runtime: str, precision: str, graph: Callable[[], object], module: Callable[[], object], input_shape,
                  label: str) -> ModelSource:
    """A model as ``runtime`` takes it to be timed at ``precision``: its ONNX graph where the runtime reads
    ONNX (``graph()`` builds the fp32 one, only then; in int8 quantized on random inputs of ``input_shape``, as
    ranges do not change a kernel's speed), and the module builder (ExecuTorch quantizes that itself)."""
    onnx = None
    if RUNTIMES[runtime].onnx:
        proto = graph()
        if precision == "int8":
            from .quantize import quantize_for_timing

            proto = quantize_for_timing(proto, input_shape)
        onnx = proto.SerializeToString()
    return ModelSource(onnx=onnx, torch=module, label=label)


def get_runtime(name: str) -> Runtime:
    """The registered runtime ``name``, checked to be installed here."""
    if name not in RUNTIMES:
        raise UnknownRuntimeError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    runtime = RUNTIMES[name]
    runtime.check()
    return runtime


def open_runner(runtime: str, source: ModelSource, options: RuntimeOptions | None = None) -> Runner:
    return get_runtime(runtime).open(source, options or RuntimeOptions())

