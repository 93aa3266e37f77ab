"""onnxruntime: its CPU provider, or CUDA with onnxruntime-gpu. Torch-free: ``lrexport infer`` runs on it.

onnxruntime-gpu lists CUDAExecutionProvider as available even on a machine without a
usable GPU or CUDA libraries; a session then silently falls back to the CPU. So the
provider asked for and the provider that ran are reported separately.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import LrexportError, RuntimeMissingError
from . import RUNTIMES
from .base import ModelSource, RuntimeOptions
from .qdq import OnnxBackend

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def ort_providers(prefer_gpu: bool = True) -> list[str]:
    """Providers for ``ort.InferenceSession(..., providers=...)``: CUDA first when present, CPU always."""
    import onnxruntime as ort

    if prefer_gpu and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


def session_provider(session) -> str:
    """The provider that runs ``session``'s graph: the first one it really registered."""
    return session.get_providers()[0]


class OrtRunner:
    """One onnxruntime session (CPU provider unless told otherwise); ``run(x) -> logits`` for a float32 NCHW batch."""

    clock = "wall"
    spinning = "during runs only"  # as recorded in verify.json and the benchmarks

    def __init__(self, model: str | Path | bytes, threads: int | None = None, precision: str = "fp32",
                 providers: tuple[str, ...] = (CPU,)):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = threads or os.cpu_count() or 1
        self.precision = precision  # of the model it runs: an int8 model is a QDQ graph
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # Worker threads busy-wait between the ops of a run (onnxruntime's default, and what a
        # deployed session does: a model of many small convs loses 5-10 % without it) but stop
        # when the run returns, so that sessions timed in turn do not steal each other's cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own non-exported exception types
            raise LrexportError(f"onnxruntime cannot load {'the model' if isinstance(model, bytes) else model}: {e}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # a fixed batch dimension is an int; a dynamic one is a name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def bind(self, x: np.ndarray):
        """The call that runs ``x``, for timing (the Runner protocol of lrexport.deploy.backends)."""
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return lambda: self.session.run(None, feed)

    def settings(self) -> dict:
        import onnxruntime

        from ..timing import cpu_name

        return {"runtime": "ort", "version": onnxruntime.__version__, "device": cpu_name(),
                "provider": self.session.get_providers()[0], "threads": self.threads, "precision": self.precision,
                "spinning": self.spinning}


class OrtBackend(OnnxBackend):
    def require(self) -> str:
        try:
            import onnxruntime
        except ImportError:
            raise RuntimeMissingError("onnxruntime is not installed: pip install onnxruntime") from None
        return onnxruntime.__version__

    def open(self, source: ModelSource, options: RuntimeOptions) -> OrtRunner:
        providers = ort_providers(prefer_gpu=options.device == "cuda")
        if options.device == "cuda" and CUDA not in providers:
            raise RuntimeMissingError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu on a machine with an NVIDIA GPU")
        # wall-clock timing through host copies on CUDA: what a caller of session.run gets
        return OrtRunner(source.onnx, options.cpu_threads, options.precision, tuple(providers) if options.device == "cuda" else (CPU,))

    def serve(self, path: Path, meta: dict, model: str, threads: int | None) -> OrtRunner:
        return OrtRunner(path / meta["models"][model]["file"], threads)


BACKEND = OrtBackend(RUNTIMES["ort"])
