"""What every backend is: the ``Runner`` protocol, the forms a model reaches a runtime in, and ``Backend``.

A runner runs a float32 NCHW batch (``run``), prepares a batch for timing (``bind``:
input copied once, to the device where there is one, returning the call to time) and says
what it is (``settings``: runtime, version, device, threads, precision). Tuning, the
export's whole-model guard, verify and the benchmarks all open models through
``open_runner`` (lrexport.deploy.backends) and time them with ``lrexport.deploy.timing``.

A model reaches a runtime as a ``ModelSource``: the ONNX graph, the plain PyTorch module,
or files of the runtime's own (programs, engines). A ``Backend`` owns everything one runtime
adds to the shared export: whether it is installed, opening runners, its int8, its own files
and their section of meta.json. Torch-free at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ...errors import LrexportError
from ...progress import Progress, quiet


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime runs a model: the settings a measurement is only valid for."""

    threads: int | None = None  # None: all CPUs
    device: str | None = None  # "cpu" or "cuda"; None: the runtime's first (RUNTIMES[name].precisions)
    precision: str | None = None  # "fp32", "fp16", "bf16", "int8"; None: the runtime's default (RUNTIMES[name])
    channels_last: bool = False  # runtimes that read "channels_last" (RUNTIMES[name].options)
    cuda_graph: bool = True  # on CUDA: replay the call as one CUDA graph

    @property
    def cpu_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class ModelSource:
    """One model in the forms runtimes take; each runtime reads the one it needs."""

    onnx: bytes | Path | None = None
    torch: Callable[[], object] | None = None  # builds the plain nn.Module
    files: Any = None  # a runtime's own files (by batch, or one path): what its artifact_source found
    label: str = "the model"
    input_shape: tuple[int, ...] | None = None  # the one input shape (batch first) it runs at, where fixed (tuning's layers)


class Runner(Protocol):
    clock: str  # timing.WALL or timing.CUDA_EVENTS

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def bind(self, x: np.ndarray) -> Callable[[], object]: ...

    def settings(self) -> dict: ...


@dataclass(frozen=True)
class QuantConfig:
    """How export quantizes: calibration images (count, split) and the per-layer error bound."""

    images: int = 1024  # 256 left a trained digits model 0.56 top-1 points short in int8 on ort, 1024 none
    split: str = "train"  # "train" (with the validation transform) or "val"
    batch: int = 32
    max_layer_error: float | None = 0.1  # relative output error of one layer in int8; None: quantize every layer


def run_batched(run, x: np.ndarray, batch: int | None, chunk: int = 64) -> np.ndarray:
    """Run ``x`` through ``run`` in chunks; a fixed-batch model gets its last chunk zero-padded."""
    size = batch or chunk
    outs = []
    for start in range(0, len(x), size):
        part = x[start:start + size]
        n = len(part)
        if batch and n < batch:
            part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
        outs.append(run(part)[:n])
    return np.concatenate(outs)


def random_batches(input_shape, count: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Random inputs: calibration where only speed is measured (ranges do not change an int8 kernel's speed)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(input_shape), dtype=np.float32) for _ in range(count)]


class QuantizationError(LrexportError):
    """A model a quantizer cannot quantize, or calibration images that are missing."""

    exit_code = 2


class ExportCheckError(LrexportError):
    """An exported model whose outputs differ from PyTorch's beyond tolerance."""


@dataclass
class Check:
    """One output comparison on the validation images."""

    what: str
    rel_err: float
    max_abs: float
    top1_agree: float  # fraction of images with the same top-1 class

    def to_dict(self) -> dict:
        return vars(self).copy()


def compare(what: str, out: np.ndarray, ref: np.ndarray) -> Check:
    import torch

    from ...lowrank.rewrite import relative_error

    out_t, ref_t = torch.as_tensor(out), torch.as_tensor(ref)
    return Check(
        what, relative_error(out_t, ref_t), float((out_t - ref_t).abs().max()),
        float((out_t.argmax(1) == ref_t.argmax(1)).double().mean()),
    )


def fail_beyond(checks: list[Check], tolerance: float, what: str) -> None:
    """An ExportCheckError naming every check whose relative error is not below ``tolerance``; ``what``: its
    subject and verb ("the export does")."""
    bad = [c for c in checks if not c.rel_err < tolerance]
    if bad:
        lines = "; ".join(f"{c.what}: relative error {c.rel_err:.3g}, max |diff| {c.max_abs:.3g}" for c in bad)
        raise ExportCheckError(f"{what} not reproduce PyTorch (tolerance {tolerance:g}): {lines}")


@dataclass
class BuildContext:
    """What a backend's ``build`` gets from the shared export, and what it hands back.

    In: the models (originals: the PyTorch reference; plain rewrites; checked fp32 ONNX graphs),
    the deployment, the calibration batches (int8), a validation sample ``x`` and the parity
    tolerance. Out: the ONNX graphs to write (int8 may replace them and add "dense_fp32"), its
    own files (name → bytes), its keys of meta.json, its tool versions, its checks against
    PyTorch, its int8 evidence, and the precision the written artifacts hold.
    """

    originals: dict
    plain: dict
    protos: dict
    input_size: tuple
    batch: int | None
    batches: tuple[int, ...]
    options: RuntimeOptions
    quant: QuantConfig
    calibration: list[np.ndarray] | None
    x: Any  # torch.Tensor of validation images
    tolerance: float
    files: dict[str, bytes] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    quantization: dict | None = None
    precision: str = "fp32"


class Backend:
    """One runtime. Subclasses override what their runtime does differently; ``entry`` is its line in RUNTIMES."""

    # False: its files are built from the shared artifacts once written (the runtime is checked then, so a
    # machine without it still gets them)
    required_before_export = True

    def __init__(self, entry):
        self.entry = entry

    @property
    def name(self) -> str:
        return self.entry.name

    def require(self) -> str:
        """Its version; a RuntimeMissingError (one line, exit 2) where it is not installed."""
        raise NotImplementedError

    def open(self, source: ModelSource, options: RuntimeOptions) -> Runner:
        """A runner of ``source`` (``options`` resolved: device and precision set, checked)."""
        raise NotImplementedError

    def open_many(self, sources: dict, options: RuntimeOptions, progress: Progress = quiet) -> dict:
        """Runners of many ``sources`` (key → ModelSource) at once, by the same keys (``options`` resolved).

        The default opens them one by one (each prepared as it is first run); a runtime whose per-model
        preparation has a large fixed cost (one lowering or conversion each) overrides it to prepare them
        together (tuning opens hundreds), saying how far it is on ``progress``."""
        return {key: self.open(source, options) for key, source in sources.items()}

    def serve(self, path: Path, meta: dict, model: str, threads: int | None) -> Runner:
        """The torch-free runner ``lrexport infer`` classifies with (its ``batch``: the one its model takes, None: any):
        for a runtime whose entry ``serves`` its own files, and for ONNX_REFERENCE, which serves the others' ONNX graphs."""
        raise NotImplementedError

    def artifact_source(self, path: Path, meta: dict, model: str) -> ModelSource:
        """Model ``model`` ("lowrank", "dense", or int8 artifacts' "dense_fp32") of an artifact directory, in the
        shared forms (ONNX file, PyTorch program) and, where the runtime wrote some, its own files."""
        label = f"the {model} model of {path}"
        if model == "dense_fp32":
            return ModelSource(onnx=path / meta["quantization"]["reference"]["dense_fp32"], files=self.own_files(path, meta, model),
                               label=f"the fp32 dense model of {path}")
        program = (meta.get("programs") or {}).get(model)

        def load_program():
            import torch

            return torch.export.load(str(path / program)).module()

        return ModelSource(onnx=path / meta["models"][model]["file"], torch=load_program if program else None,
                           files=self.own_files(path, meta, model), label=label)

    def own_files(self, path: Path, meta: dict, model: str):
        """The runtime's own files of ``model`` in an artifact directory (None: it runs the shared forms)."""
        return None

    def timing_source(self, precision: str, graph: Callable[[], object], module: Callable[[], object], input_shape,
                      label: str) -> ModelSource:
        """A model as this runtime times it at ``precision`` (tuning, the guard): ``graph()`` builds its fp32 ONNX graph,
        ``module()`` its plain module, each only where read; ``input_shape`` for int8 ranges. The default: the module."""
        return ModelSource(torch=module, label=label)

    def build(self, ctx: BuildContext) -> None:
        """Its own files and int8 into ``ctx``. The default: nothing beyond the shared files."""
        ctx.precision = ctx.options.precision

    def finish(self, out_dir: Path, meta: dict, ctx: BuildContext) -> dict:
        """After the shared files and meta.json are written: files built from them. Returns meta."""
        return meta

    def runs_int8(self, stored_as: str) -> bool:
        """Whether it runs int8 artifacts stored as ``stored_as`` (meta's quantization runtime)."""
        return stored_as == self.entry.int8_format or (stored_as == "onnx" and self.entry.reads_onnx)
