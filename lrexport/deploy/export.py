"""Run directory → artifact directory: model.onnx, dense.onnx, meta.json (optionally TRT engines).

Both models are rewritten to plain convs (BN folded, low-rank layers as aligned thin pairs
or dense below break-even), exported, checked with onnx.checker and run through
onnxruntime on real validation images; any output beyond tolerance fails the export
before a file is written.
"""

from __future__ import annotations

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
from ..lowrank import count_macs, layer_ranks, truncated
from ..lowrank.rewrite import relative_error, to_plain
from ..train.checkpoint import atomic_write_bytes, atomic_write_text
from .onnx_graph import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, check_graph, to_onnx
from .rundir import Run, newest_run, open_run
from .runtime import META_FILE, OrtRunner, run_batched

FORMATS = ("onnx", "trt")
LOWRANK_FILE, DENSE_FILE = "model.onnx", "dense.onnx"
META_VERSION = 1


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


@dataclass
class ExportResult:
    out_dir: Path
    meta: dict
    checks: list[Check] = field(default_factory=list)


def compare(what: str, out: np.ndarray, ref: np.ndarray) -> Check:
    out_t, ref_t = torch.as_tensor(out), torch.as_tensor(ref)
    return Check(
        what, relative_error(out_t, ref_t), float((out_t - ref_t).abs().max()),
        float((out_t.argmax(1) == ref_t.argmax(1)).double().mean()),
    )


def validation_sample(run: Run, count: int) -> torch.Tensor:
    """The first ``count`` validation images of the run (its real data, val transform)."""
    val = run.validation_set()
    n = min(count, len(val))
    if n == 0:
        raise LrexportError(f"the validation set of {run.path} is empty; nothing to check the export on")
    return torch.stack([val[i][0] for i in range(n)])


def tool_versions() -> dict:
    import onnxruntime

    return {
        "lrexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
    }


def _macs(model, input_size) -> int:
    return count_macs(model, tuple(input_size)).deployed


def _below_energy_rank(trained, deployed) -> dict[str, int]:
    """name → rank of the layers ``deployed`` holds at a lower rank than ``trained`` (verify truncates the same)."""
    ranks = layer_ranks(trained)
    return {name: r for name, r in layer_ranks(deployed).items() if r < ranks[name]}


@torch.no_grad()
def export_run(
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    format: str = "onnx",
    batch: int | None = None,
    multiple_of: int = 8,
    opset: int = DEFAULT_OPSET,
    check_images: int = 64,
    tolerance: float = 1e-4,
    precision: str = "fp16",
    trt_batch_sizes: tuple[int, ...] = (1, 8, 32),
    runs_root: str | Path = "runs",
    tune: bool = False,
    tune_batch: int | None = None,
    tune_threads: int | None = None,
    tune_cache: str | Path | None = None,
    tune_margin: float = 0.02,
    tune_guard: bool = True,
    tune_below: bool | None = None,
    tune_images: int = 2000,
    progress=None,
    log=None,
) -> ExportResult:
    """Export a run's finetuned low-rank model and its dense baseline; returns meta and checks.

    ``run_dir`` defaults to the newest run under ``runs_root``, ``out_dir`` to RUN/artifacts.
    ``batch=None`` exports a dynamic batch dimension. ``multiple_of`` aligns deployed ranks
    upward (1: exact ranks). ``tolerance`` bounds the relative error of the logits.

    ``tune`` times every decomposed conv on onnxruntime (dense and pairs at aligned ranks
    ≥ the energy rank, lrexport.deploy.tune) at ``tune_batch`` (default: ``batch``, else 1)
    and ``tune_threads`` (default: all CPUs, as verify) and deploys the fastest per layer;
    times are cached in ``tune_cache`` (default: OUT/tune_cache.json) for the next export.
    ``tune_guard`` then times the whole tuned and untuned models and keeps the untuned one
    if the tuned one is slower (meta.json's tune.deployed says which went out).
    ``tune_below`` (default: the run's ``prune.tune_below``) also lets a layer go below its
    energy rank where that is faster, kept only where the first ``tune_images`` validation
    images confirm the model stays within the run's ``prune.tolerance`` top-1 points
    (lrexport.deploy.below); meta.json's export.truncated lists the ranks that went below.
    ``progress(name, choice)`` is called per tuned layer, ``log(text)`` on each step of that
    accuracy check (each is a pass over the validation images).
    """
    if format not in FORMATS:
        raise LrexportError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    if batch is not None and batch < 1:
        raise LrexportError(f"batch must be ≥ 1 (or dynamic); got {batch}")
    if tune_below and not tune:
        raise LrexportError("--tune-below chooses among the ranks --tune times; add --tune")
    if tune and format == "trt":
        raise RuntimeMissingError("--tune times layers on onnxruntime only; tuning for TensorRT engines is not implemented")
    if multiple_of < 1:
        raise LrexportError(f"multiple_of must be ≥ 1; got {multiple_of}")
    run = open_run(run_dir if run_dir is not None else newest_run(runs_root))
    out_dir = Path(out_dir) if out_dir is not None else run.path / "artifacts"
    input_size = run.input_size
    trained, dense = run.load_models()
    lowrank = trained  # the model deployed: the trained one, or it with ranks below the energy rule's

    tuned = None
    if tune:
        from .tune import CACHE_FILE, tune_model

        tune_cache = Path(tune_cache) if tune_cache is not None else out_dir / CACHE_FILE
        tb = tune_batch or batch or 1
        if batch is not None and tb != batch:
            raise LrexportError(f"--tune-batch {tb} differs from the fixed export batch {batch}")
        prune_cfg = run.summary.get("prune") or {}
        below = bool(prune_cfg.get("tune_below", False)) if tune_below is None else tune_below
        tuned = tune_model(
            trained, input_size, batch=tb, threads=tune_threads, multiple_of=multiple_of, margin=tune_margin,
            cache_path=tune_cache, progress=progress, below=below,
        )
        if tuned.below_ranks():
            from .below import confirm_below

            val = run.validation_set()
            val = torch.utils.data.Subset(val, range(min(tune_images, len(val))))
            check = confirm_below(trained, tuned.below_ranks(), val, float(prune_cfg.get("tolerance", 1.0)), log)
            tuned.revert(check.reverted)
            tuned.below_check = check.to_dict()
            lowrank = truncated(trained, check.kept)
    plan = tuned.plan if tuned is not None else None
    plain_lr, report = to_plain(lowrank, input_size, multiple_of, plan)
    plain_dense, dense_report = to_plain(dense, input_size, 1)
    protos = {
        "lowrank": to_onnx(plain_lr, input_size, batch, opset),
        "dense": to_onnx(plain_dense, input_size, batch, opset),
    }
    if tuned is not None and tune_guard and plan != tuned.default_plan:
        # one-layer times miss what happens between layers: the tuned model must also win whole
        from .tune import end_to_end

        plain_default, default_report = to_plain(trained, input_size, multiple_of)
        default_proto = to_onnx(plain_default, input_size, batch, opset)
        tuned.end_to_end = end_to_end(protos["lowrank"].SerializeToString(), default_proto.SerializeToString(),
                                      input_size, tuned.target)
        if tuned.deployed == "untuned":
            plan, plain_lr, report, protos["lowrank"] = None, plain_default, default_report, default_proto
            lowrank = trained
    ops = {name: check_graph(proto) for name, proto in protos.items()}

    x = validation_sample(run, check_images)
    checks = []
    for name, original, plain in (("lowrank", lowrank, plain_lr), ("dense", dense, plain_dense)):
        ref = original(x).numpy()
        checks.append(compare(f"{name}: rewritten PyTorch vs original", plain(x).numpy(), ref))
        ort_out = run_batched(OrtRunner(protos[name].SerializeToString()).run, x.numpy(), batch)
        checks.append(compare(f"{name}: onnxruntime vs original", ort_out, ref))
    bad = [c for c in checks if not c.rel_err < tolerance]
    if bad:
        lines = "; ".join(f"{c.what}: relative error {c.rel_err:.3g}, max |diff| {c.max_abs:.3g}" for c in bad)
        raise ExportCheckError(f"export of {run.path} does not reproduce PyTorch (tolerance {tolerance:g}): {lines}")

    lr_macs, dense_macs = _macs(lowrank, input_size), _macs(dense, input_size)
    meta = {
        "format_version": META_VERSION,
        "created": datetime.now().isoformat(timespec="seconds"),
        "input": {
            "name": INPUT_NAME, "shape": [batch, *input_size], "dtype": "float32", "layout": "NCHW",
            "color": "RGB", "scale": 1 / 255, "mean": list(run.data_info["mean"]), "std": list(run.data_info["std"]),
            "resize": int(run.data_info.get("resize") or 0),
        },
        "output": {"name": OUTPUT_NAME, "kind": "logits"},
        "batch": batch,
        "class_names": list(run.data_info["class_names"]),
        "models": {
            "lowrank": {
                "file": LOWRANK_FILE, "macs": lr_macs, "deployed_macs": _macs(plain_lr, input_size), "ops": ops["lowrank"],
                **report.to_dict(),
            },
            "dense": {"file": DENSE_FILE, "macs": dense_macs, "deployed_macs": _macs(plain_dense, input_size), "ops": ops["dense"],
                      "bn_folded": dense_report.bn_folded, "bn_left": dense_report.bn_left},
        },
        "macs_speedup": dense_macs / lr_macs,
        "checks": {"images": len(x), "tolerance": tolerance, "results": [c.to_dict() for c in checks]},
        "source": {
            "run_dir": str(run.path.resolve()), "name": run.name, "recipe_hash": run.summary.get("recipe_hash"),
            "checkpoints": {"lowrank": str(run.checkpoint("lowrank").resolve()), "dense": str(run.checkpoint("dense").resolve())},
        },
        "export": {"format": format, "opset": opset, "multiple_of": multiple_of, "dynamic_batch": batch is None,
                   "plan": plan, "truncated": _below_energy_rank(trained, lowrank)},
        "versions": tool_versions(),
    }
    if tuned is not None:
        meta["tune"] = tuned.to_dict() | {"cache": str(tune_cache)}
    meta = json.loads(json.dumps(meta))  # the dict returned is exactly what meta.json holds
    atomic_write_bytes(out_dir / LOWRANK_FILE, protos["lowrank"].SerializeToString())
    atomic_write_bytes(out_dir / DENSE_FILE, protos["dense"].SerializeToString())
    # meta first: a failed engine build still leaves a complete ONNX artifact directory
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
    if format == "trt":
        try:
            meta["engines"] = build_trt_engines(out_dir, precision, (batch,) if batch else tuple(trt_batch_sizes), run.validation_set())
        except RuntimeMissingError as e:
            raise RuntimeMissingError(f"{e} (the ONNX artifacts are written: {out_dir})") from None
        meta["versions"]["tensorrt"] = meta["engines"].pop("tensorrt_version", None)
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
    return ExportResult(out_dir, meta, checks)


def build_trt_engines(out_dir: Path, precision: str, batch_sizes: tuple[int, ...], calibration_set) -> dict:
    """Build a TensorRT engine from each exported ONNX file (lrexport.deploy.trt does the work).

    int8 calibrates on the run's validation images, with one calibration cache per model.
    """
    from . import trt
    from .calibration import CalibrationReader

    engines = {}
    for name, file in (("lowrank", LOWRANK_FILE), ("dense", DENSE_FILE)):
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
