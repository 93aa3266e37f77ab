"""OpenVINO's CPU plugin: the exported ONNX graph compiled once per input shape (static shapes run fastest)."""

from __future__ import annotations

import ctypes
import functools
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...errors import LrexportError, RuntimeMissingError
from ..timing import WALL, cpu_name
from . import RUNTIMES
from .base import ModelSource, RuntimeOptions
from .qdq import OnnxBackend


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
        options = RUNTIMES["openvino"].resolve(options)
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


class OpenVinoBackend(OnnxBackend):
    def require(self) -> str:
        return _openvino().__version__

    def open(self, source: ModelSource, options: RuntimeOptions) -> OpenVinoRunner:
        return OpenVinoRunner(source.onnx, options, source.label)


BACKEND = OpenVinoBackend(RUNTIMES["openvino"])
