"""Run directory → artifact directory, in stages: plan → build → check → backend → write.

- plan (lrexport.deploy.planning.plan): each layer's deployed rank, measured on the target runtime.
- build: both models rewritten to plain convs (BN folded, low-rank layers as thin pairs or
  dense, as planned), exported to ONNX, checked against our graph rules.
- check: the rewritten modules and the ONNX graphs must reproduce PyTorch on real validation
  images; any output beyond tolerance fails the export before a file is written.
- backend (``Backend.build``, lrexport.deploy.backends): what the target runtime adds: its int8
  (ranges calibrated on the run's images, per-layer float fallback; the fp32 dense model stays
  beside the int8 ones as the reference verify times them against), its own files (programs,
  checked against PyTorch like the ONNX graphs) and its keys of meta.json.
- write: model.onnx, dense.onnx, the same plain models as PyTorch programs (model.pt2,
  dense.pt2), the backend's files, plan.json, PyTorch's predictions on the validation set
  (reference.npz, what verify compares the runtime with) and meta.json; then the backend's
  files built from those (``Backend.finish``). Verify reads only these files and the
  validation data named in meta.json.
"""

from __future__ import annotations

import io
import json
import platform
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import LrexportError
from ..lowrank import count_macs
from ..lowrank.rewrite import RewriteReport, to_plain
from ..io import atomic_write_bytes, atomic_write_text
from ..progress import Progress, quiet
from ..rundir import Run, artifacts_dir, newest_run, open_run
from .artifacts import FILES, META_FILE, META_VERSION, MODELS, PLAN_FILE, PROGRAMS, REFERENCE_FILE
from .backends import DEFAULT_RUNTIME, RuntimeOptions, backend_of, entry, reference_versions, run_onnx
from .backends.base import BuildContext, Check, QuantConfig, QuantizationError, compare, fail_beyond
from .backends.base import ExportCheckError  # noqa: F401 (what the check raises: callers catch it from here)
from .onnx_graph import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, check_graph, to_onnx
from .planning.latency_ranks import allocated_plan
from .planning.plan import Plan, TuneConfig, plan_export


@dataclass(frozen=True)
class ExportConfig:
    """What ``export_run`` makes. ``runtime=None``: DEFAULT_RUNTIME (the registry's first)."""

    runtime: str | None = None
    batch: int | None = None  # None: a dynamic batch dimension
    multiple_of: int = 8  # the MACs rule aligns ranks upward to this (1: exact)
    opset: int = DEFAULT_OPSET
    check_images: int = 64
    tolerance: float = 1e-4  # parity: largest relative error of the logits against PyTorch
    options: RuntimeOptions = RuntimeOptions()  # device and precision None: the runtime's defaults
    tune: TuneConfig = TuneConfig()
    quant: QuantConfig = QuantConfig()  # with options.precision "int8"

    @property
    def target(self) -> str:
        return self.runtime or DEFAULT_RUNTIME

    def validate(self) -> "ExportConfig":
        """This config with the runtime's defaults filled in; one line on what does not fit."""
        options = entry(self.target).resolve(self.options)
        if self.batch is not None and self.batch < 1:
            raise LrexportError(f"batch must be ≥ 1 (or dynamic); got {self.batch}")
        if self.multiple_of < 1:
            raise LrexportError(f"multiple_of must be ≥ 1; got {self.multiple_of}")
        if self.quant.split not in ("train", "val") or self.quant.images < 1:
            raise LrexportError(f"calibration takes ≥ 1 images of split train or val; got {self.quant.images} of {self.quant.split!r}")
        if self.batch is not None and self.tune.batches and set(self.tune.batches) != {self.batch}:
            raise LrexportError(f"tune batches {list(self.tune.batches)} differ from the fixed export batch {self.batch}")
        return replace(self, runtime=self.target, options=options)


@dataclass
class Built:
    """Both models as deployed: originals (the PyTorch reference), plain rewrites, ONNX graphs."""

    originals: dict[str, torch.nn.Module]
    plain: dict[str, torch.nn.Module]
    reports: dict[str, RewriteReport]
    protos: dict[str, onnx.ModelProto]
    ops: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class ExportResult:
    out_dir: Path
    meta: dict
    plan: Plan
    checks: list[Check] = field(default_factory=list)


def tool_versions() -> dict:
    return {"lrexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__, **reference_versions(),
            "python": platform.python_version()}


# -- the stages ----------------------------------------------------------------------------------
def _below_checker(run: Run, trained, config: TuneConfig, progress: Progress):
    """The validation-accuracy check for ranks below the energy rule's, or None where the run does not allow them."""
    prune_cfg = run.summary.get("prune") or {}
    allowed = bool(prune_cfg.get("tune_below", False)) if config.below is None else config.below
    if not allowed:
        return None

    def check(proposed: dict[str, int]):
        from .planning.below import confirm_below

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
    """The rewritten modules and the ONNX graphs against the original PyTorch models on ``x``."""
    checks = []
    for m in MODELS:
        ref = built.originals[m](x).numpy()
        checks.append(compare(f"{m}: rewritten PyTorch vs original", built.plain[m](x).numpy(), ref))
        what, out = run_onnx(built.protos[m], x.numpy(), config.batch)
        checks.append(compare(f"{m}: {what} vs original", out, ref))
    fail_beyond(checks, config.tolerance, "the export does")
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


def write(out_dir: Path, built: Built, ctx: BuildContext, plan: Plan, reference: dict[str, np.ndarray], meta: dict,
          input_size) -> dict:
    """Every artifact file, each written atomically; meta.json last, so a complete meta means complete artifacts."""
    for m, proto in ctx.protos.items():
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
    for name, blob in ctx.files.items():
        atomic_write_bytes(out_dir / name, blob)
    meta |= ctx.meta
    meta["versions"] |= ctx.versions
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


def describe(run: Run, built: Built, ctx: BuildContext, plan: Plan, config: ExportConfig, checks: list[Check], reference: dict) -> dict:
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
        "channels_pruned": bool(run.summary.get("channels")),  # the low-rank model is narrower than the dense one
        "runtime": plan.runtime,
        "precision": ctx.precision,
        "quantization": None if plan.quantization is None else {
            "calibration": plan.quantization["calibration"], "format": plan.quantization["format"],
            "float_layers": {m: plan.quantization[m]["float_layers"] for m in MODELS},
            # int8 stored by a backend in files of its own: the ONNX graphs stay float, dense.onnx the fp32 reference
            "runtime": plan.quantization.get("runtime", "onnx"),
            "reference": {"dense_fp32": FILES["dense_fp32" if "dense_fp32" in ctx.protos else "dense"]}},
        "plan": {"file": PLAN_FILE, "deployed": plan.deployed, "note": plan.note},
        "reference": {"file": REFERENCE_FILE, "by": "PyTorch, the models as trained (and truncated as planned)",
                      "accuracy": _accuracy(reference), "topk": int(reference["lowrank_top"].shape[1])},
        "data_config": run.summary["data_config"],
        "checks": {"images": config.check_images, "tolerance": config.tolerance, "results": [c.to_dict() for c in checks]},
        "source": {"run_dir": str(run.path.resolve()), "name": run.name, "recipe_hash": run.summary.get("recipe_hash")},
        "export": {"format": "onnx", "opset": config.opset, "multiple_of": config.multiple_of,
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
    config = (config or ExportConfig()).validate()
    backend = backend_of(config.target)
    if backend.required_before_export:
        backend.require()  # a runtime that is not installed: one line before any work
    run = open_run(run_dir if run_dir is not None else newest_run(runs_root))
    out_dir = Path(out_dir) if out_dir is not None else artifacts_dir(run.path)
    int8 = config.options.precision == "int8"
    calibration = calibration_batches(run, config.quant) if int8 else None  # before any work: the data may be gone
    trained, dense = run.load_models(model)
    # first: a model the rewrite or ONNX cannot carry fails here, naming the layer, before any tuning
    dense_rewrite = rewrite(dense, run.input_size, config)
    allocated = allocated_plan(run.summary, config.target)
    original = dense if run.summary.get("channels") else None  # a narrower network: the guard times the model before pruning
    plan = plan_export(trained, run.input_size, config.target, config.options, config.tune, config.batch,
                       config.multiple_of, _below_checker(run, trained, config.tune, progress) if allocated is None else None,
                       progress, allocated, original)
    built = build(plan.model(trained, dense), dense, dense_rewrite, plan, run.input_size, config)
    x = validation_sample(run, config.check_images)
    checks = check(built, x, config)  # the fp32 graphs reproduce PyTorch; int8 is judged by verify's accuracy
    val = run.validation_set()
    ctx = BuildContext(built.originals, built.plain, dict(built.protos), run.input_size, config.batch,
                       config.tune.deployment_batches(config.batch), config.options, config.quant, calibration, x,
                       config.tolerance)
    backend.build(ctx)
    plan.quantization = ctx.quantization
    checks += ctx.checks
    reference = reference_predictions(built.originals, val, min(5, len(run.data_info["class_names"])))
    meta = write(out_dir, built, ctx, plan, reference, describe(run, built, ctx, plan, config, checks, reference), run.input_size)
    meta = backend.finish(out_dir, meta, ctx)
    return ExportResult(out_dir, meta, plan, checks)
