"""The runtimes lrexport deploys on: one module per runtime, one line per runtime in ``RUNTIMES``.

Each entry says what the runtime can do (devices, precisions per device, options it reads,
where one layer can be timed alone, whether it runs the exported ONNX graphs, how its int8
artifacts are stored) and names the module that implements it; that module is imported on
first use, so this registry stays importable without torch. The CLI, export, verify, the
planning code and the recipe's ``prune.latency`` check ask the entry (``check``, ``tunable``)
and the backend (``get_runtime(name)``); none of them names a runtime.

Adding a runtime: a module here with a ``Backend`` subclass named ``BACKEND`` (see
``base.Backend``), and its line in ``RUNTIMES``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import import_module

from ...errors import LrexportError, RuntimeMissingError
from ...progress import Progress, quiet
from .base import Backend, ModelSource, Runner, RuntimeOptions, run_batched

__all__ = ["RUNTIMES", "DEFAULT_RUNTIME", "BackendEntry", "Backend", "ModelSource", "Runner", "RuntimeOptions", "UnknownRuntimeError",
           "UnsupportedOptionError", "all_devices", "all_precisions", "backend_of", "entry", "get_runtime", "open_runner", "open_runners", "reference_runner", "reference_versions", "run_onnx",
           "tunable_runtimes"]

DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}
OPTIONS = ("threads", "channels_last", "cuda_graph")  # RuntimeOptions' settings a runtime may or may not read
DEFAULT_OPTIONS = RuntimeOptions()


class UnknownRuntimeError(LrexportError):
    exit_code = 2


class UnsupportedOptionError(LrexportError):
    """A setting the chosen runtime does not read: refused, not ignored."""

    exit_code = 2


@dataclass(frozen=True)
class BackendEntry:
    """What one runtime can do (static: read without importing it) and the module that does it."""

    name: str
    module: str  # under lrexport.deploy.backends, imported on first use
    title: str  # as users know it
    precisions: dict[str, tuple[str, ...]]  # device → the precisions it runs there; the first of each is the default
    options: tuple[str, ...] = ("threads",)  # the OPTIONS it reads
    tunes_on: tuple[str, ...] = ("cpu",)  # devices where one layer can be timed alone (tuning, prune.latency)
    reads_onnx: bool = True  # it runs the exported ONNX graphs (the others: the module, or files of their own)
    int8_format: str | None = None  # int8 artifacts it writes: "onnx" (QDQ graphs every ONNX runtime runs) or its own name
    int8_fallback: bool = True  # its int8 keeps a conv beyond export's max_layer_error in float
    serves: bool = False  # ``lrexport infer`` runs its own files through ``Backend.serve`` (torch-free); others: the ONNX graph

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.precisions)

    @property
    def int8(self) -> bool:
        return any("int8" in p for p in self.precisions.values())

    def tunable(self, device: str | None = None) -> bool:
        return (device or self.devices[0]) in self.tunes_on

    def describe(self, devices=None) -> str:
        """e.g. "fp32 or int8 on the CPU; fp32, fp16 or bf16 on CUDA" (of ``devices`` only, if given)."""
        def listing(items) -> str:
            return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"

        return "; ".join(f"{listing(p)} on {DEVICE_NAMES.get(d, d)}" for d, p in self.precisions.items()
                         if devices is None or d in devices)

    def measures(self, device: str, precision: str) -> bool:
        """Whether it times one layer alone on ``device`` at ``precision`` (tuning, prune.latency)."""
        return self.tunable(device) and precision in self.precisions.get(device, ())

    def resolve(self, options: RuntimeOptions) -> RuntimeOptions:
        """``options`` with its default device and precision filled in, checked (``check``); a setting it does not
        read (``OPTIONS``) that differs from its default is refused."""
        for name in OPTIONS:
            if name not in self.options and getattr(options, name) != getattr(DEFAULT_OPTIONS, name):
                readers = ", ".join(n for n, e in RUNTIMES.items() if name in e.options)
                raise UnsupportedOptionError(f"{self.name} does not take --{name.replace('_', '-')} (it applies to {readers})")
        device = options.device or self.devices[0]
        precision = options.precision or self.precisions.get(device, ("fp32",))[0]
        self.check(device, precision)
        return replace(options, device=device, precision=precision)

    def check(self, device: str, precision: str) -> None:
        """The one copy of which devices and precisions this runtime takes: one line where it does not."""
        if precision not in self.precisions.get(device, ()):
            raise RuntimeMissingError(f"lrexport runs {self.title} ({self.name}) in {self.describe()}; not {precision} on "
                                      f"{DEVICE_NAMES.get(device, device)}")


# the first entry is export's default target
RUNTIMES: dict[str, BackendEntry] = {
    # onnxruntime's CPU provider; CUDA with onnxruntime-gpu (timed through host copies: no layer timing there)
    "ort": BackendEntry("ort", ".ort", "onnxruntime", {"cpu": ("fp32", "int8"), "cuda": ("fp32", "int8")}, int8_format="onnx"),
    "openvino": BackendEntry("openvino", ".openvino", "OpenVINO", {"cpu": ("fp32", "fp16", "int8")}, int8_format="onnx"),
    "torch": BackendEntry("torch", ".pytorch", "PyTorch", {"cpu": ("fp32",), "cuda": ("fp32", "fp16", "bf16")},
                          options=("threads", "channels_last", "cuda_graph"), tunes_on=("cpu", "cuda"), reads_onnx=False),
    "executorch": BackendEntry("executorch", ".executorch", "ExecuTorch", {"cpu": ("fp32", "int8")}, reads_onnx=False,
                               int8_format="executorch"),
    "litert": BackendEntry("litert", ".litert", "LiteRT", {"cpu": ("fp32", "int8")}, reads_onnx=False, int8_format="litert", serves=True),
    # TensorRT chooses each layer's precision itself
    "trt": BackendEntry("trt", ".trt", "TensorRT", {"cuda": ("fp16", "fp32", "int8")}, options=(), tunes_on=(), int8_fallback=False),
}


DEFAULT_RUNTIME = next(iter(RUNTIMES))
ONNX_REFERENCE = "ort"  # the exported graphs are checked on it, whatever the target


def entry(name: str) -> BackendEntry:
    if name not in RUNTIMES:
        raise UnknownRuntimeError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def tunable_runtimes() -> list[str]:
    return [name for name, e in RUNTIMES.items() if e.tunes_on]


def all_devices() -> list[str]:
    return list(dict.fromkeys(d for e in RUNTIMES.values() for d in e.devices))


def all_precisions() -> list[str]:
    return list(dict.fromkeys(p for e in RUNTIMES.values() for ps in e.precisions.values() for p in ps))


_loaded: dict[str, Backend] = {}


def backend_of(name: str) -> Backend:
    """The backend ``name`` (its module imported on first use), not yet checked to be installed."""
    e = entry(name)
    if name not in _loaded:
        _loaded[name] = import_module(e.module, __name__).BACKEND
    return _loaded[name]


def get_runtime(name: str) -> Backend:
    """The backend ``name``, checked to be installed here (a RuntimeMissingError, one line, where it is not)."""
    backend = backend_of(name)
    backend.require()
    return backend


def open_runner(runtime: str, source: ModelSource, options: RuntimeOptions | None = None) -> Runner:
    backend = get_runtime(runtime)
    return backend.open(source, backend.entry.resolve(options or RuntimeOptions()))


def open_runners(runtime: str, sources: dict, options: RuntimeOptions | None = None, progress: Progress = quiet) -> dict:
    """Runners of ``sources`` (key → ModelSource) by the same keys, prepared together where the runtime can."""
    backend = get_runtime(runtime)
    return backend.open_many(sources, backend.entry.resolve(options or RuntimeOptions()), progress)


def reference_runner(onnx: bytes, precision: str = "fp32") -> Runner:
    """A runner of ONNX_REFERENCE, the runtime every exported ONNX graph is checked on whatever the target."""
    return open_runner(ONNX_REFERENCE, ModelSource(onnx=onnx), RuntimeOptions(precision=precision))


def run_onnx(proto, x, batch: int | None = None) -> tuple[str, object]:
    """``proto``'s outputs on ``x`` (in chunks of a fixed ``batch``) through the reference runtime: (its name, outputs)."""
    return RUNTIMES[ONNX_REFERENCE].title, run_batched(reference_runner(proto.SerializeToString()).run, x, batch)


def reference_versions() -> dict:
    """The reference ONNX runtime's version, as meta.json records it."""
    return {RUNTIMES[ONNX_REFERENCE].title: backend_of(ONNX_REFERENCE).require()}
