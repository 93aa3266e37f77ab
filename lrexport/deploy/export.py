"""Run directory → artifact directory, in four stages: plan → build → check → write.

- plan (lrexport.deploy.plan): each layer's deployed rank, measured on the target runtime.
- build: both models rewritten to plain convs (BN folded, low-rank layers as thin pairs or
  dense, as planned), exported to ONNX, checked against our graph rules.
- check: the rewritten modules and onnxruntime must reproduce PyTorch on real validation
  images; any output beyond tolerance fails the export before a file is written.
- quantize (``--precision int8``): both graphs quantized statically, ranges calibrated on the
  run's images (lrexport.deploy.quantize); the fp32 dense graph stays beside them as the
  reference verify times them against.
- lower (``--runtime executorch``): ExecuTorch programs of both models per deployment batch
  (model_b1.pte, ...), in int8 quantized by XNNPACK's quantizer on the same calibration images
  (lrexport.deploy.executorch), checked against PyTorch like the ONNX graphs.
- write: model.onnx, dense.onnx, the same plain models as PyTorch programs (model.pt2,
  dense.pt2, for the torch runtime), plan.json, PyTorch's predictions on the validation set
  (reference.npz, what verify compares the runtime with) and meta.json. Verify reads only
  these files and the validation data named in meta.json.
"""

from __future__ import annotations

import io
import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import LrexportError, RuntimeMissingError
from ..lowrank import count_macs
from ..lowrank.rewrite import RewriteReport, relative_error, to_plain
from ..io import atomic_write_bytes, atomic_write_text
from ..progress import Progress, quiet
from .onnx_graph import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, check_graph, to_onnx
from .latency_ranks import allocated_plan
from .plan import PLAN_FILE, Plan, TuneConfig, plan_export
from .quantize import QuantConfig, QuantizationError, quantize_checked
from ..rundir import Run, artifacts_dir, newest_run, open_run
from .runners import RUNTIMES, RuntimeOptions, UnknownRuntimeError, get_runtime
from .runtime import META_FILE, OrtRunner, run_batched

FORMATS = ("onnx", "trt")
MODELS = ("lowrank", "dense")
FILES = {"lowrank": "model.onnx", "dense": "dense.onnx", "dense_fp32": "dense_fp32.onnx"}  # the last with int8 only
PROGRAMS = {"lowrank": "model.pt2", "dense": "dense.pt2"}
EXECUTORCH = "executorch"
REFERENCE_FILE = "reference.npz"
META_VERSION = 2  # 2: plan.json, reference.npz, PyTorch programs; verify needs no run directory


class ExportCheckError(LrexportError):
    """An exported model whose outputs differ from PyTorch's beyond tolerance."""


@dataclass(frozen=True)
class TrtConfig:
    precision: str = "fp16"
    batch_sizes: tuple[int, ...] = (1, 8, 32)


@dataclass(frozen=True)
class ExportConfig:
    """What ``export_run`` makes. ``runtime=None``: "trt" for format "trt", else "ort"."""

    format: str = "onnx"
    runtime: str | None = None
    batch: int | None = None  # None: a dynamic batch dimension
    multiple_of: int = 8  # the MACs rule aligns ranks upward to this (1: exact)
    opset: int = DEFAULT_OPSET
    check_images: int = 64
    tolerance: float = 1e-4  # largest relative error of the logits
    options: RuntimeOptions = RuntimeOptions()
    tune: TuneConfig = TuneConfig()
    quant: QuantConfig = QuantConfig()  # with options.precision "int8"
    trt: TrtConfig = TrtConfig()

    @property
    def target(self) -> str:
        return self.runtime or ("trt" if self.format == "trt" else "ort")

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise LrexportError(f"export format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.target not in RUNTIMES:
            raise UnknownRuntimeError(f"unknown runtime {self.target!r}; choose one of {', '.join(RUNTIMES)}")
        if self.target == "trt" and self.format != "trt":
            raise LrexportError("runtime trt runs TensorRT engines: export with --format trt")
        if self.batch is not None and self.batch < 1:
            raise LrexportError(f"batch must be ≥ 1 (or dynamic); got {self.batch}")
        if self.multiple_of < 1:
            raise LrexportError(f"multiple_of must be ≥ 1; got {self.multiple_of}")
        precision = self.options.precision
        if precision == "int8" and not RUNTIMES[self.target].int8:
            int8 = ", ".join(name for name, r in RUNTIMES.items() if r.int8)
            raise RuntimeMissingError(f"--precision int8 exports for {int8}; {self.target} has no int8 path here")
        if precision in ("fp16", "bf16") and not (self.target == "torch" or (precision == "fp16" and self.target == "openvino")):
            raise RuntimeMissingError(f"--precision {precision} runs on {'openvino or ' if precision == 'fp16' else ''}torch (CUDA); "
                                      f"not on {self.target}")
        if self.quant.split not in ("train", "val") or self.quant.images < 1:
            raise LrexportError(f"calibration takes ≥ 1 images of split train or val; got {self.quant.images} of {self.quant.split!r}")
        if self.batch is not None and self.tune.batches and set(self.tune.batches) != {self.batch}:
            raise LrexportError(f"tune batches {list(self.tune.batches)} differ from the fixed export batch {self.batch}")


@dataclass
class Check:
    """One output comparison on the validation images."""

    what: str
    rel_err: float
    max_abs: float
    top1_agree: float  # fraction of images with the same top-1 class

    def to_dict(self) -> dict:
        return vars(self).copy()


@dataclass
class Built:
    """Both models as deployed: originals (the PyTorch reference), plain rewrites, ONNX graphs."""

    originals: dict[str, torch.nn.Module]
    plain: dict[str, torch.nn.Module]
    reports: dict[str, RewriteReport]
    protos: dict[str, onnx.ModelProto]
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    pte: dict[str, dict[int, bytes]] = field(default_factory=dict)  # ExecuTorch programs by model and batch


@dataclass
class ExportResult:
    out_dir: Path
    meta: dict
    plan: Plan
    checks: list[Check] = field(default_factory=list)


def compare(what: str, out: np.ndarray, ref: np.ndarray) -> Check:
    out_t, ref_t = torch.as_tensor(out), torch.as_tensor(ref)
    return Check(
        what, relative_error(out_t, ref_t), float((out_t - ref_t).abs().max()),
        float((out_t.argmax(1) == ref_t.argmax(1)).double().mean()),
    )


def tool_versions() -> dict:
    import onnxruntime

    return {
        "lrexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
    }


# -- the stages ----------------------------------------------------------------------------------
def _below_checker(run: Run, trained, config: TuneConfig, progress: Progress):
    """The validation-accuracy check for ranks below the energy rule's, or None where the run does not allow them."""
    prune_cfg = run.summary.get("prune") or {}
    allowed = bool(prune_cfg.get("tune_below", False)) if config.below is None else config.below
    if not allowed:
        return None

    def check(proposed: dict[str, int]):
        from .below import confirm_below

        val = run.validation_set()
        val = torch.utils.data.Subset(val, range(min(config.below_images, len(val))))
        result = confirm_below(trained, proposed, val, float(prune_cfg.get("tolerance", 1.0)), progress)
        return result.kept, result.to_dict()

    return check


def rewrite(model, input_size, config: ExportConfig, multiple_of: int = 1, layers: dict | None = None) -> tuple:
    """``model`` as plain convs (its layers as ``layers`` plans, else by the MACs rule), its rewrite report and ONNX graph."""
    plain, report = to_plain(model, input_size, multiple_of, layers)
    return plain, report, to_onnx(plain, input_size, config.batch, config.opset)


def build(lowrank, dense, dense_rewrite: tuple, plan: Plan, input_size, config: ExportConfig) -> Built:
    """Plain rewrites and checked ONNX graphs of both models (the dense one's ``rewrite`` done before planning)."""
    (plain_lr, report_lr, proto_lr), (plain_dense, report_dense, proto_dense) = (
        rewrite(lowrank, input_size, config, config.multiple_of, plan.layers), dense_rewrite)
    built = Built({"lowrank": lowrank, "dense": dense}, {"lowrank": plain_lr, "dense": plain_dense},
                  {"lowrank": report_lr, "dense": report_dense}, {"lowrank": proto_lr, "dense": proto_dense})
    for m in MODELS:
        built.ops[m] = check_graph(built.protos[m])
    return built


@torch.no_grad()
def check(built: Built, x: torch.Tensor, config: ExportConfig) -> list[Check]:
    """The rewritten modules and onnxruntime against the original PyTorch models on ``x``."""
    checks = []
    for m in MODELS:
        ref = built.originals[m](x).numpy()
        checks.append(compare(f"{m}: rewritten PyTorch vs original", built.plain[m](x).numpy(), ref))
        ort_out = run_batched(OrtRunner(built.protos[m].SerializeToString()).run, x.numpy(), config.batch)
        checks.append(compare(f"{m}: onnxruntime vs original", ort_out, ref))
    bad = [c for c in checks if not c.rel_err < config.tolerance]
    if bad:
        lines = "; ".join(f"{c.what}: relative error {c.rel_err:.3g}, max |diff| {c.max_abs:.3g}" for c in bad)
        raise ExportCheckError(f"the export does not reproduce PyTorch (tolerance {config.tolerance:g}): {lines}")
    return checks


def calibration_batches(run: Run, quant: QuantConfig) -> list[np.ndarray]:
    """The run's images int8 ranges are calibrated on; a run whose data is gone is one line (exit 2)."""
    from ..errors import DataError
    from .calibration import CalibrationError, CalibrationReader

    try:
        data = run.calibration_set(quant.split)
        n = min(quant.images, len(data))
        batch = max(1, min(quant.batch, n))
        return CalibrationReader((data[i] for i in range(n)), batch_size=batch, max_batches=max(1, n // batch)).materialize()
    except (DataError, CalibrationError) as e:
        raise QuantizationError(f"--precision int8 calibrates on the run's {quant.split} images, which cannot be read: {e}") from None


@torch.no_grad()
def quantize_built(built: Built, calibration: list[np.ndarray], quant: QuantConfig, x: torch.Tensor, batch: int | None) -> dict:
    """Both graphs in int8 (the fp32 dense one kept as "dense_fp32"); their agreement with PyTorch and per-layer evidence."""
    built.protos["dense_fp32"] = built.protos["dense"]
    evidence = {"calibration": {"split": quant.split, "images": sum(len(b) for b in calibration)},
                "format": "QDQ, weights int8 per channel, activations uint8 per tensor, percentile ranges"}
    for m in MODELS:
        built.protos[m], evidence[m] = quantize_checked(built.protos[m], calibration, quant.max_layer_error)
        out = run_batched(OrtRunner(built.protos[m].SerializeToString(), precision="int8").run, x.numpy(), batch)
        evidence[m]["check"] = compare(f"{m}: onnxruntime int8 vs original fp32", out, built.originals[m](x).numpy()).to_dict()
    return evidence


def pte_file(model: str, batch: int) -> str:
    return f"{Path(FILES[model]).stem}_b{batch}.pte"


@torch.no_grad()
def lower_built(built: Built, input_size, batches, calibration: list[np.ndarray] | None, config: ExportConfig,
                x: torch.Tensor) -> tuple[dict | None, list[Check]]:
    """ExecuTorch programs of both models at each batch into ``built.pte``; with ``calibration`` in int8 (XNNPACK's
    quantizer, per-layer error fallback), the fp32 dense model's beside them. Returns the int8 evidence (as
    ``quantize_built``'s) and the fp32 programs' checks against PyTorch on ``x`` (failing the export beyond tolerance)."""
    from . import executorch as et

    modules = dict(built.plain)
    evidence = None
    if calibration is not None:
        evidence = {"calibration": {"split": config.quant.split, "images": sum(len(b) for b in calibration)},
                    "format": "XNNPACK int8 (PT2E): activations int8 per tensor, weights int8 per channel, symmetric",
                    "runtime": EXECUTORCH}
        for m in MODELS:
            modules[m], evidence[m] = et.quantize_checked(built.plain[m], input_size, calibration, config.quant.max_layer_error)
        modules["dense_fp32"] = built.plain["dense"]
    checks = []
    for m, module in modules.items():
        built.pte[m] = {b: et.lower(module, torch.zeros(b, *input_size), f"the {m} model") for b in batches}
        out = et.ExecutorchRunner(config.options, programs=built.pte[m], label=f"the {m} model").run(x.numpy())
        quantized = evidence is not None and m in MODELS
        result = compare(f"{m}: executorch{' int8' if quantized else ''} vs original{' fp32' if quantized else ''}", out,
                         built.originals[m if m in MODELS else "dense"](x).numpy())
        if quantized:
            evidence[m]["check"] = result.to_dict()
        else:
            checks.append(result)
    bad = [c for c in checks if not c.rel_err < config.tolerance]
    if bad:
        raise ExportCheckError(f"the ExecuTorch programs do not reproduce PyTorch (tolerance {config.tolerance:g}): "
                               + "; ".join(f"{c.what}: relative error {c.rel_err:.3g}" for c in bad))
    return evidence, checks


@torch.no_grad()
def reference_predictions(models: dict[str, torch.nn.Module], val, k: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """PyTorch's top-k classes per validation image for each model, and the labels: what verify compares with."""
    from torch.utils.data import DataLoader

    tops = {m: [] for m in models}
    labels = []
    for x, y in DataLoader(val, batch_size=batch_size, shuffle=False):
        labels.append(y.numpy().astype(np.int64))
        for m, model in models.items():
            tops[m].append(model(x).topk(k, dim=1).indices.numpy().astype(np.int32))
    if not labels:
        raise LrexportError("the validation set is empty; nothing to check the export on")
    return {"labels": np.concatenate(labels)} | {f"{m}_top": np.concatenate(t) for m, t in tops.items()}


def torch_program(plain: torch.nn.Module, input_size, batch: int | None) -> bytes:
    """The plain module as a saved ``torch.export`` program (loads without lrexport's model code)."""
    example = (torch.zeros(batch or 2, *input_size),)
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1, max=65536)},)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(plain, example, dynamic_shapes=dynamic), buf)
    return buf.getvalue()


def write(out_dir: Path, built: Built, plan: Plan, reference: dict[str, np.ndarray], meta: dict, input_size) -> dict:
    """Every artifact file, each written atomically; meta.json last, so a complete meta means complete artifacts."""
    for m, proto in built.protos.items():
        atomic_write_bytes(out_dir / FILES[m], proto.SerializeToString())
    programs, note = {}, ""
    try:
        blobs = {m: torch_program(built.plain[m], input_size, meta["batch"]) for m in MODELS}
    except Exception as e:  # torch.export cannot trace every model; the ONNX runtimes still serve it
        note = f"torch.export failed ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})"
    else:
        for m in MODELS:
            atomic_write_bytes(out_dir / PROGRAMS[m], blobs[m])
            programs[m] = PROGRAMS[m]
    for m, by_batch in built.pte.items():
        for b, blob in by_batch.items():
            atomic_write_bytes(out_dir / pte_file(m, b), blob)
    if built.pte:
        from .executorch import require

        meta["pte"] = {m: {str(b): pte_file(m, b) for b in by_batch} for m, by_batch in built.pte.items()}
        meta["versions"]["executorch"] = require().version
    buf = io.BytesIO()
    np.savez_compressed(buf, **reference)
    atomic_write_bytes(out_dir / REFERENCE_FILE, buf.getvalue())
    atomic_write_text(out_dir / PLAN_FILE, json.dumps(plan.to_dict(), indent=2))
    meta["programs"] = programs or {"note": note}
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
    return meta


def _accuracy(reference: dict[str, np.ndarray]) -> dict:
    labels = reference["labels"]
    acc = {"images": len(labels)}
    for m in MODELS:
        top = reference[f"{m}_top"]
        acc[m] = {"top1": 100.0 * float((top[:, 0] == labels).mean()), "topk": 100.0 * float((top == labels[:, None]).any(1).mean())}
    return acc


def describe(run: Run, built: Built, plan: Plan, config: ExportConfig, checks: list[Check], reference: dict) -> dict:
    """meta.json: input contract, models, MACs, checks, where the data lives, versions."""
    size = run.input_size
    macs = {m: count_macs(built.originals[m], size).deployed for m in MODELS}
    models = {}
    for m in MODELS:
        report = built.reports[m].to_dict() if m == "lowrank" else {k: getattr(built.reports[m], k) for k in ("bn_folded", "bn_left")}
        models[m] = {"file": FILES[m], "macs": macs[m], "deployed_macs": count_macs(built.plain[m], size).deployed,
                     "ops": built.ops[m], **report}
    return json.loads(json.dumps({
        "format_version": META_VERSION,
        "created": datetime.now().isoformat(timespec="seconds"),
        "input": {
            "name": INPUT_NAME, "shape": [config.batch, *size], "dtype": "float32", "layout": "NCHW",
            "color": "RGB" if size[0] == 3 else "L", "scale": 1 / 255, "mean": list(run.data_info["mean"]), "std": list(run.data_info["std"]),
            "resize": int(run.data_info.get("resize") or 0),
        },
        "output": {"name": OUTPUT_NAME, "kind": "logits"},
        "batch": config.batch,
        "class_names": list(run.data_info["class_names"]),
        "models": models,
        "macs_speedup": macs["dense"] / macs["lowrank"],
        "runtime": plan.runtime,
        "precision": config.options.precision,
        "quantization": None if plan.quantization is None else {
            "calibration": plan.quantization["calibration"], "format": plan.quantization["format"],
            "float_layers": {m: plan.quantization[m]["float_layers"] for m in MODELS},
            # ExecuTorch's int8 lives in its programs; the ONNX graphs stay float, dense.onnx the fp32 reference
            "runtime": plan.quantization.get("runtime", "onnx"),
            "reference": {"dense_fp32": FILES["dense" if plan.quantization.get("runtime") == EXECUTORCH else "dense_fp32"]}},
        "plan": {"file": PLAN_FILE, "deployed": plan.deployed, "note": plan.note},
        "reference": {"file": REFERENCE_FILE, "by": "PyTorch, the models as trained (and truncated as planned)",
                      "accuracy": _accuracy(reference), "topk": int(reference["lowrank_top"].shape[1])},
        "data_config": run.summary["data_config"],
        "checks": {"images": config.check_images, "tolerance": config.tolerance, "results": [c.to_dict() for c in checks]},
        "source": {"run_dir": str(run.path.resolve()), "name": run.name, "recipe_hash": run.summary.get("recipe_hash")},
        "export": {"format": config.format, "opset": config.opset, "multiple_of": config.multiple_of,
                   "dynamic_batch": config.batch is None, "plan": plan.layers,
                   "truncated": plan.truncated},
        "versions": tool_versions(),
    }))


def validation_sample(run: Run, count: int) -> torch.Tensor:
    """The first ``count`` validation images of the run (its real data, val transform)."""
    val = run.validation_set()
    n = min(count, len(val))
    if n == 0:
        raise LrexportError(f"the validation set of {run.path} is empty; nothing to check the export on")
    return torch.stack([val[i][0] for i in range(n)])


@torch.no_grad()
def export_run(run_dir: str | Path | None = None, out_dir: str | Path | None = None, config: ExportConfig | None = None,
               runs_root: str | Path = "runs", progress: Progress = quiet, model: torch.nn.Module | None = None) -> ExportResult:
    """Export a run's finetuned low-rank model and its dense baseline for ``config.target``.

    ``run_dir`` defaults to the newest run under ``runs_root``, ``out_dir`` to RUN/artifacts.
    ``progress`` hears a LayerTuned event for each tuned layer and a Message for each pass
    of the accuracy check of ranks below the energy rule's. ``model``: for a run whose model
    was passed to ``run_recipe`` from Python, the same module (the run has no name to rebuild it by).
    """
    config = config or ExportConfig()
    config.validate()
    if config.format != "trt":  # TensorRT builds its engines last, the ONNX artifacts written (_write_engines)
        get_runtime(config.target)  # a runtime that is not installed: one line before any work
    run = open_run(run_dir if run_dir is not None else newest_run(runs_root))
    out_dir = Path(out_dir) if out_dir is not None else artifacts_dir(run.path)
    int8 = config.options.precision == "int8"
    calibration = calibration_batches(run, config.quant) if int8 else None  # before any work: the data may be gone
    trained, dense = run.load_models(model)
    # first: a model the rewrite or ONNX cannot carry fails here, naming the layer, before any tuning
    dense_rewrite = rewrite(dense, run.input_size, config)
    allocated = allocated_plan(run.summary, config.target)
    plan = plan_export(trained, run.input_size, config.target, config.options, config.tune, config.batch,
                       config.multiple_of, _below_checker(run, trained, config.tune, progress) if allocated is None else None,
                       progress, allocated)
    built = build(plan.model(trained), dense, dense_rewrite, plan, run.input_size, config)
    x = validation_sample(run, config.check_images)
    checks = check(built, x, config)  # the fp32 graphs reproduce PyTorch; int8 is judged by verify's accuracy
    if config.target == EXECUTORCH:
        plan.quantization, et_checks = lower_built(built, run.input_size, config.tune.deployment_batches(config.batch), calibration,
                                                   config, x)
        checks += et_checks
    elif int8:
        plan.quantization = quantize_built(built, calibration, config.quant, x, config.batch)
    val = run.validation_set()
    reference = reference_predictions(built.originals, val, min(5, len(run.data_info["class_names"])))
    meta = write(out_dir, built, plan, reference, describe(run, built, plan, config, checks, reference), run.input_size)
    if config.format == "trt":
        meta = _write_engines(out_dir, meta, config.trt, config.batch, val)
    return ExportResult(out_dir, meta, plan, checks)


def _write_engines(out_dir: Path, meta: dict, trt: TrtConfig, batch: int | None, val) -> dict:
    try:
        meta["engines"] = build_trt_engines(out_dir, trt.precision, (batch,) if batch else tuple(trt.batch_sizes), val)
    except RuntimeMissingError as e:
        raise RuntimeMissingError(f"{e} (the ONNX artifacts are written: {out_dir})") from None
    meta["versions"]["tensorrt"] = meta["engines"].pop("tensorrt_version", None)
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
    return meta


def build_trt_engines(out_dir: Path, precision: str, batch_sizes: tuple[int, ...], calibration_set) -> dict:
    """Build a TensorRT engine from each exported ONNX file (lrexport.deploy.trt does the work).

    int8 calibrates on the run's validation images, with one calibration cache per model.
    """
    from . import trt
    from .calibration import CalibrationReader

    engines = {}
    for name in MODELS:
        file = FILES[name]
        calibration = None
        if precision == "int8":
            calibration = CalibrationReader.from_dataset(
                calibration_set, batch_size=batch_sizes[0] if len(batch_sizes) == 1 else 32,
                cache_path=out_dir / f"{Path(file).stem}.calibration.cache",
            )
        path = trt.build_engine(
            out_dir / file, out_dir, precision=precision, batch_sizes=batch_sizes, calibration=calibration,
            engine_name=f"{Path(file).stem}.engine",
        )
        engines[name] = Path(path).name
    engines["precision"] = precision
    engines["batch_sizes"] = list(batch_sizes)
    engines["tensorrt_version"] = getattr(sys.modules.get("tensorrt"), "__version__", None)
    return engines
