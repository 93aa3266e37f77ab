"""TensorRT 10: build an engine from ONNX; run and time it on the GPU.

Everything that can be checked without TensorRT happens first, in pure functions (the
ONNX input, the optimization-profile shapes, the artifact paths, the calibration
batches); ``tensorrt`` is imported at its first use. Without TensorRT or without a GPU,
every entry point raises ``RuntimeMissingError`` with one line saying what is missing.

CUDA memory, streams, events and graphs come from ``torch.cuda``, not cuda-python: torch
is already a dependency, its PyTorch baselines are timed with the same events and graphs,
and it needs no second CUDA binding whose version must match the driver.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import LrexportError, RuntimeMissingError
from ..artifacts import FILES, MODELS
from ..calibration import CalibrationReader
from . import RUNTIMES
from .base import Backend, BuildContext, ModelSource, RuntimeOptions

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
CALIBRATION_CACHE_FILE = "calibration.cache"
INSTALL_HINT = 'pip install "lrexport[trt]" on a machine with an NVIDIA GPU and driver'


class EngineError(LrexportError):
    """An ONNX file TensorRT cannot build, or an engine it cannot load or run."""


# -- what is missing -----------------------------------------------------------------------
def import_tensorrt():
    """The ``tensorrt`` module (10 or newer), or one line on what is missing."""
    try:
        import tensorrt
    except ImportError as e:
        # a wheel without its libnvinfer also lands here, with the library's name in e
        what = "TensorRT is not installed" if getattr(e, "name", None) == "tensorrt" else f"TensorRT cannot load ({e})"
        raise RuntimeMissingError(f"{what}: {INSTALL_HINT}") from None
    except OSError as e:
        raise RuntimeMissingError(f"TensorRT cannot load its libraries ({e}): {INSTALL_HINT}") from None
    if trt_major(tensorrt) < 10:
        raise RuntimeMissingError(f"TensorRT {tensorrt.__version__} is too old; lrexport needs TensorRT 10 or newer: {INSTALL_HINT}")
    return tensorrt


def trt_major(trt) -> int:
    head = str(getattr(trt, "__version__", "0")).split(".")[0]
    return int(head) if head.isdigit() else 0


def check_precision_supported(trt, precision: str) -> None:
    """TensorRT 11 removed the fp16/int8 builder flags (weak typing); this path needs TensorRT 10 for them."""
    if precision != "fp32" and trt_major(trt) >= 11:
        raise RuntimeMissingError(
            f"TensorRT {trt.__version__} no longer builds {precision} from an fp32 ONNX (its {precision} builder flag is gone); "
            'install TensorRT 10: pip install "tensorrt>=10,<11"'
        )


def require_gpu() -> None:
    """Raise unless torch sees a CUDA GPU (TensorRT builds and runs only on one)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeMissingError(
            "no CUDA GPU visible (torch.cuda.is_available() is False): TensorRT needs an NVIDIA GPU, its driver and a CUDA build of torch"
        )


# -- pure parts: checked before TensorRT is touched ----------------------------------------
def onnx_input(onnx_path: str | Path) -> tuple[str, tuple[int | None, ...]]:
    """(name, shape) of the model's one input; a dynamic dimension is None."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise LrexportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError
        raise LrexportError(f"{path} is not an ONNX model ({e.__class__.__name__})") from None
    weights = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise LrexportError(f"{path} has {len(inputs)} inputs; lrexport builds engines for one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    if len(shape) != 4:
        raise LrexportError(f"{path}: input {inputs[0].name!r} has shape {shape}; expected N×C×H×W")
    return inputs[0].name, shape


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise LrexportError(f"batch sizes must be integers ≥ 1; got {list(sizes)}")
    return tuple(sorted({int(b) for b in sizes}))


def profile_shapes(
    batch_sizes: Sequence[int], input_shape: Sequence[int | None], opt_batch: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes of one optimization profile covering ``batch_sizes``.

    ``input_shape`` is N×C×H×W with N None when the batch axis is dynamic. TensorRT tunes
    its kernels for the opt shape; by default that is the largest batch asked for.
    """
    sizes = check_batch_sizes(batch_sizes)
    n, *chw = input_shape
    if len(chw) != 3 or any(d is None or d < 1 for d in chw):
        raise LrexportError(f"input shape must be N×C×H×W with fixed C, H, W; got {tuple(input_shape)}")
    if n is not None and set(sizes) != {n}:
        raise LrexportError(
            f"the ONNX input has a fixed batch of {n}, but batch sizes {list(sizes)} were asked for; "
            "export with a dynamic batch axis or ask only for that batch"
        )
    opt = max(sizes) if opt_batch is None else opt_batch
    if not sizes[0] <= opt <= sizes[-1]:
        raise LrexportError(f"opt batch {opt} lies outside the batch sizes {list(sizes)}")
    return (sizes[0], *chw), (opt, *chw), (sizes[-1], *chw)


@dataclass
class BuildPlan:
    """Everything ``build_engine`` decided before it touched TensorRT."""

    onnx_path: Path
    out_dir: Path
    engine_path: Path
    timing_cache_path: Path
    info_path: Path
    precision: str
    input_name: str
    input_shape: tuple[int | None, ...]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    workspace_bytes: int
    calibration: CalibrationReader | None = None
    optimization_level: int | None = None


def plan_build(
    onnx_path: str | Path,
    out_dir: str | Path,
    precision: str = "fp16",
    batch_sizes: Sequence[int] = (1, 32),
    calibration: CalibrationReader | None = None,
    workspace_gb: float = 4,
    engine_name: str = ENGINE_FILE,
    opt_batch: int | None = None,
    optimization_level: int | None = None,
) -> BuildPlan:
    """Validate the arguments and the ONNX file, compute shapes and paths; no TensorRT."""
    if precision not in PRECISIONS:
        raise LrexportError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if not (isinstance(workspace_gb, (int, float)) and workspace_gb > 0):
        raise LrexportError(f"workspace must be a positive number of GiB; got {workspace_gb!r}")
    if optimization_level is not None and optimization_level not in range(6):
        raise LrexportError(f"TensorRT builder optimization level must be 0…5; got {optimization_level!r}")
    if Path(engine_name).name != engine_name or not engine_name:
        raise LrexportError(f"engine name must be a plain file name; got {engine_name!r}")
    name, shape = onnx_input(onnx_path)
    profile = profile_shapes(batch_sizes, shape, opt_batch)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LrexportError(f"{out} exists and is not a directory")
    if precision == "int8":
        if calibration is None:
            raise LrexportError("int8 needs calibration images: pass a CalibrationReader (e.g. CalibrationReader.from_folder)")
        calib_shape = (calibration.batch_size, *profile[0][1:])
        if shape[0] is not None and shape[0] != calibration.batch_size:
            raise LrexportError(f"the ONNX input has a fixed batch of {shape[0]}; use that as the calibration batch size")
        calibration.check_input(calib_shape)  # reads the images now, before the long build
        if calibration.cache_path is None:
            calibration.cache_path = out / CALIBRATION_CACHE_FILE
    return BuildPlan(
        onnx_path=Path(onnx_path), out_dir=out, engine_path=out / engine_name,
        timing_cache_path=out / TIMING_CACHE_FILE, info_path=out / f"{engine_name}.json",
        precision=precision, input_name=name, input_shape=shape, profile=profile,
        workspace_bytes=int(workspace_gb * (1 << 30)), calibration=calibration if precision == "int8" else None,
        optimization_level=optimization_level,
    )


# -- the build -------------------------------------------------------------------------------
def build_engine(onnx_path: str | Path, out_dir: str | Path, *args, **kwargs) -> Path:
    """Build a TensorRT engine for ``batch_sizes`` and write it to ``out_dir/engine_name``.

    Beside it: ``timing.cache`` (read before and written after every build, so later builds
    in the same directory skip tactic timing they already did), ``<engine_name>.json``
    (TensorRT version, GPU, precision, profile: an engine is only valid for those), and for
    int8 ``calibration.cache``. "fp32" disables TF32; "int8" also enables fp16 for the
    layers TensorRT keeps out of int8. The other arguments are ``plan_build``'s, checked there
    before TensorRT is imported.
    """
    plan = plan_build(onnx_path, out_dir, *args, **kwargs)
    trt = import_tensorrt()
    check_precision_supported(trt, plan.precision)
    require_gpu()
    return _build(trt, plan)


def _parse_onnx(trt, builder, logger, path: Path):
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {path}: {errors or 'no reason given'}")
    return network, parser


def _config(trt, builder, plan: BuildPlan):
    """(builder config, calibrator or None): the caller keeps the calibrator alive until the build ends."""
    config = builder.create_builder_config()
    calibrator = None
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # true fp32, so verify can compare tightly
    else:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.optimization_level is not None:
        config.builder_optimization_level = plan.optimization_level
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, *plan.profile)
    config.add_optimization_profile(profile)
    if plan.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        # calibration runs at the calibration profile's opt shape: one fixed batch size
        calib_shape = (plan.calibration.batch_size, *plan.profile[0][1:])
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(plan.input_name, calib_shape, calib_shape, calib_shape)
        config.set_calibration_profile(calib_profile)
        calibrator = trt_calibrator(plan.calibration, trt)
        config.int8_calibrator = calibrator
    cached = plan.timing_cache_path.read_bytes() if plan.timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(cached)
    # a cache from another GPU or TensorRT version is refused (not merged); start afresh then
    if cache is None or not config.set_timing_cache(cache, False):
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return config, calibrator


def _build(trt, plan: BuildPlan) -> Path:
    import torch

    from ...io import atomic_write_bytes, atomic_write_text

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(trt, builder, logger, plan.onnx_path)  # the parser must outlive the build
    config, _calibrator = _config(trt, builder, plan)  # the binding may not hold the Python calibrator
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {plan.onnx_path} ({plan.precision}); its log above says why")
    atomic_write_bytes(plan.engine_path, bytes(serialized))
    atomic_write_bytes(plan.timing_cache_path, bytes(config.get_timing_cache().serialize()))
    info = {
        "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "precision": plan.precision,
        "input": plan.input_name, "profile": {"min": plan.profile[0], "opt": plan.profile[1], "max": plan.profile[2]},
        "workspace_bytes": plan.workspace_bytes, "build_seconds": round(seconds, 2), "onnx": str(plan.onnx_path),
    }
    atomic_write_text(plan.info_path, json.dumps(info, indent=2))
    return plan.engine_path


def trt_calibrator(reader: CalibrationReader, trt_module):
    """A ``trt.IInt8EntropyCalibrator2`` that feeds ``reader``'s batches through one device buffer.

    ``trt_module`` is the imported ``tensorrt``; the class is built here because its base
    class exists only when TensorRT is installed. Device memory comes from torch.cuda, as in
    this module.
    """
    import torch

    class _EntropyCalibrator(trt_module.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self._batches = iter(reader.materialize())
            self._device = None  # allocated on the first batch, reused for all

        def get_batch_size(self) -> int:
            return reader.batch_size

        def get_batch(self, names):
            batch = next(self._batches, None)
            if batch is None:
                return None  # tells TensorRT that calibration data is exhausted
            host = torch.from_numpy(batch)
            if self._device is None:
                self._device = torch.empty_like(host, device="cuda")
            self._device.copy_(host)
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self):
            return reader.read_cache()

        def write_calibration_cache(self, cache) -> None:
            reader.write_cache(bytes(cache))

    return _EntropyCalibrator()


# -- running ---------------------------------------------------------------------------------
class TrtRunner:
    """One engine, one execution context, device buffers for its largest batch.

    ``run(x)`` copies a float32 NCHW batch in, runs, copies the output back (for verify).
    ``time(batch)`` runs on device-resident random input with nothing crossing to the host,
    replaying a CUDA graph of the enqueue when the engine can be captured.
    """

    clock = "cuda-events"

    def __init__(self, engine_path: str | Path):
        path = Path(engine_path)
        if not path.is_file():
            raise LrexportError(f"TensorRT engine not found: {path}")
        trt = import_tensorrt()
        require_gpu()
        import torch

        self._torch = torch
        self.path = path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{path} cannot be loaded: engines are specific to one GPU model and TensorRT version; rebuild it here")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; TrtRunner handles one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        lo, _opt, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.max_batch, self.sample_shape = lo[0], hi[0], hi[1:]
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._in = torch.empty(hi, dtype=self._torch_dtype(trt, self.input_name), device="cuda")
        self.context.set_input_shape(self.input_name, hi)
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        self._out = torch.empty(out_shape, dtype=self._torch_dtype(trt, self.output_name), device="cuda")
        # a smaller batch uses the leading rows of the same buffers: the addresses never change
        self.context.set_tensor_address(self.input_name, self._in.data_ptr())
        self.context.set_tensor_address(self.output_name, self._out.data_ptr())
        self._batch = hi[0]

    def _torch_dtype(self, trt, name: str):
        return self._torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def _set_batch(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise LrexportError(f"the engine takes batches of {self.min_batch}…{self.max_batch}; got {batch}")
        if batch != self._batch:
            self.context.set_input_shape(self.input_name, (batch, *self.sample_shape))
            self._batch = batch

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._torch.cuda.current_stream().cuda_stream):
            raise EngineError(f"TensorRT failed to run {self.path}")

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs (float32, on the host) for a float32 N×C×H×W batch."""
        torch = self._torch
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise LrexportError(f"the engine takes N×{'×'.join(map(str, self.sample_shape))} input; got {x.shape}")
        batch = len(x)
        self._set_batch(batch)
        with torch.cuda.stream(self.stream):
            self._in[:batch].copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            self._enqueue()
            out = self._out[:batch].float().cpu()  # waits for this stream only
        return out.numpy()

    def bind(self, x: np.ndarray):
        """Copy ``x`` to the device once; the call to time replays a CUDA graph of the enqueue where it can."""
        torch = self._torch
        batch = len(x)
        self._set_batch(batch)
        with torch.cuda.stream(self.stream):
            self._in[:batch].copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            # one plain enqueue after a shape change lets TensorRT finish its deferred setup,
            # which must not happen during a stream capture
            self._enqueue()
        self.stream.synchronize()
        self.note = ""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._enqueue()
            return graph.replay
        except Exception as e:  # engines with data-dependent shapes or host syncs cannot be captured
            torch.cuda.synchronize()
            self.note = f"CUDA graph capture failed ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); timed plain enqueues"
            return self._enqueue

    def settings(self) -> dict:
        trt = import_tensorrt()
        return {"runtime": "trt", "version": trt.__version__, "device": self._torch.cuda.get_device_name(),
                "provider": "cuda", "threads": None, "precision": str(self.engine.get_tensor_dtype(self.input_name)),
                "engine": str(self.path), "note": getattr(self, "note", "")}


# -- the backend ---------------------------------------------------------------------------------------
class TrtBackend(Backend):
    required_before_export = False  # engines are built from the written ONNX files: without TensorRT those stay

    def require(self) -> str:
        trt = import_tensorrt()
        require_gpu()
        return trt.__version__

    def open(self, source: ModelSource, options: RuntimeOptions) -> "TrtRunner":
        if source.files is None:
            raise RuntimeMissingError(f"{source.label} has no TensorRT engine; export with `lrexport export --runtime trt`")
        return TrtRunner(source.files)

    def own_files(self, path: Path, meta: dict, model: str):
        engine = (meta.get("engines") or {}).get(model)
        return path / engine if engine else None

    def build(self, ctx: BuildContext) -> None:
        ctx.precision = "fp32"  # the ONNX files stay fp32; the engines carry their precision (meta's "engines")

    def finish(self, out_dir: Path, meta: dict, ctx: BuildContext) -> dict:
        from ...io import atomic_write_text
        from ..artifacts import META_FILE

        try:
            meta["engines"] = build_engines(out_dir, ctx.options.precision, ctx.batches, ctx.calibration)
        except RuntimeMissingError as e:
            raise RuntimeMissingError(f"{e} (the ONNX artifacts are written: {out_dir})") from None
        meta["versions"]["tensorrt"] = meta["engines"].pop("tensorrt_version", None)
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
        return meta


def build_engines(out_dir: Path, precision: str, batch_sizes: tuple[int, ...], calibration: list[np.ndarray] | None) -> dict:
    """An engine from each exported ONNX file; int8 calibrates on the ``calibration`` batches (the run's images,
    as export's --calibration-* options chose them), with one calibration cache per model."""
    engines = {}
    for name in MODELS:
        file = FILES[name]
        reader = None
        if precision == "int8":
            reader = CalibrationReader((image for batch in calibration for image in batch),
                                       batch_size=batch_sizes[0] if len(batch_sizes) == 1 else 32,
                                       cache_path=out_dir / f"{Path(file).stem}.calibration.cache")
        path = build_engine(out_dir / file, out_dir, precision=precision, batch_sizes=batch_sizes, calibration=reader,
                            engine_name=f"{Path(file).stem}.engine")
        engines[name] = Path(path).name
    engines["precision"] = precision
    engines["batch_sizes"] = list(batch_sizes)
    engines["tensorrt_version"] = getattr(sys.modules.get("tensorrt"), "__version__", None)
    return engines


BACKEND = TrtBackend(RUNTIMES["trt"])
