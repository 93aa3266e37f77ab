"""PyTorch itself: the plain (rewritten) module, on the CPU or on CUDA."""

from __future__ import annotations

import numpy as np

from ...errors import LrexportError, RuntimeMissingError
from ..timing import CUDA_EVENTS, WALL, cpu_name
from . import RUNTIMES
from .base import Backend, ModelSource, RuntimeOptions


class TorchRunner:
    """The plain (rewritten) PyTorch module: CPU, or CUDA in fp32/fp16/bf16, channels_last, CUDA-graph replay."""

    def __init__(self, module, options: RuntimeOptions):
        import torch

        options = RUNTIMES["torch"].resolve(options)
        self.torch, self.options = torch, options
        self.device = torch.device(options.device)
        if options.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeMissingError("no CUDA GPU visible (torch.cuda.is_available() is False); use --device cpu")
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




class TorchBackend(Backend):
    def require(self) -> str:
        import torch

        return torch.__version__

    def open(self, source: ModelSource, options: RuntimeOptions) -> TorchRunner:
        if source.torch is None:
            raise LrexportError(f"{source.label} has no PyTorch program; re-export it with this lrexport")
        return TorchRunner(source.torch(), options)


BACKEND = TorchBackend(RUNTIMES["torch"])
