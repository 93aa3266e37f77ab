"""Measure exported artifacts through the runtime that will serve them (DESIGN §6).

Accuracy (top-1, top-5) of the low-rank and the dense model on the run's validation set,
next to PyTorch's on the same images; latency of both on the same runtime in one process;
MACs speedup, wall-clock speedup and their ratio. The result goes to verify.json.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LrexportError, RuntimeMissingError
from ..lowrank.prune import truncated
from ..train.checkpoint import atomic_write_text
from .latency import LatencyStats, measure
from .rundir import newest_run, open_run
from .runtime import OrtRunner, load_meta, run_batched

RUNTIMES = ("ort", "trt", "torch")
MODELS = ("lowrank", "dense")
VERIFY_FILE = "verify.json"


class VerifyError(LrexportError):
    """Accuracy through the runtime differs from PyTorch's beyond the tolerance."""


class TorchRunner:
    """The rewritten (plain) PyTorch module behind the same ``run(np) -> np`` interface."""

    name = "torch"

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()

    @torch.no_grad()
    def run(self, x: np.ndarray) -> np.ndarray:
        return self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def load_exported_models(run, meta: dict):
    """(low-rank, dense) PyTorch models as exported: the run's, truncated where export --tune went below a trained rank."""
    lowrank, dense = run.load_models()
    below = (meta.get("export") or {}).get("truncated")
    return (truncated(lowrank, below) if below else lowrank), dense


def open_runners(runtime: str, artifacts_dir: Path, meta: dict, threads: int, models=None) -> dict:
    """One runner per model ("lowrank", "dense") on ``runtime``; ``models`` (from load_exported_models) for torch."""
    if runtime == "ort":
        return {m: OrtRunner(artifacts_dir / meta["models"][m]["file"], threads) for m in MODELS}
    if runtime == "trt":
        from .trt import TrtRunner, import_tensorrt, require_gpu

        import_tensorrt()  # what is missing on this machine comes before what the artifacts lack
        require_gpu()
        engines = meta.get("engines")
        if not engines:
            raise RuntimeMissingError(f"{artifacts_dir} holds no TensorRT engines; export with `lrexport export --format trt`")
        return {m: TrtRunner(artifacts_dir / engines[m]) for m in MODELS}
    if runtime == "torch":
        from ..lowrank.rewrite import to_plain

        lowrank, dense = models
        size = tuple(meta["input"]["shape"][1:])
        return {
            "lowrank": TorchRunner(to_plain(lowrank, size, meta["export"]["multiple_of"], meta["export"].get("plan"))[0]),
            "dense": TorchRunner(to_plain(dense, size, 1)[0]),
        }
    raise LrexportError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> tuple[int, int]:
    order = np.argsort(-logits, axis=1)
    return int((order[:, 0] == labels).sum()), int((order[:, :k] == labels[:, None]).any(axis=1).sum())


@dataclass
class VerifyResult:
    artifacts_dir: Path
    report: dict
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self) -> None:
        """Raise VerifyError naming every accuracy beyond tolerance."""
        if self.failures:
            raise VerifyError("; ".join(self.failures))


@torch.no_grad()
def _accuracy(runners: dict, references: dict, val, meta: dict, eval_batch: int) -> dict:
    from torch.utils.data import DataLoader

    batch = meta.get("batch")
    k = min(5, len(meta["class_names"]))
    counts = {m: dict(top1=0, top5=0, torch_top1=0, torch_top5=0, top1_disagree=0) for m in MODELS}
    n = 0
    for x, y in DataLoader(val, batch_size=batch or eval_batch, shuffle=False):
        labels, x_np = y.numpy(), x.numpy()
        n += len(labels)
        for m in MODELS:
            out = run_batched(runners[m].run, x_np, batch)
            ref = references[m](x).numpy()
            c = counts[m]
            t1, t5 = _topk_hits(out, labels, k)
            r1, r5 = _topk_hits(ref, labels, k)
            c["top1"] += t1
            c["top5"] += t5
            c["torch_top1"] += r1
            c["torch_top5"] += r5
            c["top1_disagree"] += int((out.argmax(1) != ref.argmax(1)).sum())
    if n == 0:
        raise LrexportError("the validation set is empty; nothing to verify on")
    acc = {}
    for m, c in counts.items():
        acc[m] = {key: (100.0 * v / n if key != "top1_disagree" else v) for key, v in c.items()}
    acc["images"], acc["top5_k"] = n, k
    return acc


def _time_models(runners: dict, x: np.ndarray, warmup: int, repeats: int) -> tuple[dict[str, LatencyStats], str]:
    """Per-model latency at ``len(x)``; GPU runners time themselves with CUDA events."""
    if all(hasattr(r, "time") for r in runners.values()):
        # input already on the device, no host copies in the timed region
        return {m: LatencyStats.from_ms(len(x), r.time(len(x), repeats, warmup).times_ms) for m, r in runners.items()}, "cuda-events"
    return measure({m: r.run for m, r in runners.items()}, x, warmup, repeats), "wall"


def _latency_inputs(val, batch: int) -> np.ndarray:
    n = min(batch, len(val))
    x = np.stack([val[i][0].numpy() for i in range(n)])
    return np.resize(x, (batch, *x.shape[1:])) if n < batch else x


def slower_than_dense(latency: list[dict], runtime: str, tuned: bool) -> list[str]:
    """A note where the low-rank model measured slower than the dense one: fewer MACs did not pay here."""
    slow = [row for row in latency if row["wall_speedup"] < 1.0]
    if not slow:
        return []
    at = ", ".join(f"{row['wall_speedup']:.2f}x at batch {row['batch']}" for row in slow)
    hint = ("even as tuned: deploy the dense model on this runtime" if tuned else
            "`lrexport export --tune` deploys each layer dense or factored by measured latency")
    return [f"the low-rank model ran slower than the dense one on {runtime} ({at}): the saved MACs did not pay off "
            f"on this runtime (small layers are bound by memory and per-call overhead); {hint}"]


def predicted_latency(meta: dict, latency: list[dict]) -> dict | None:
    """The tuned export's predicted latency (sum of per-layer times) beside the measured one.

    None when the artifacts were not tuned. ``measured_*`` are filled where verify timed
    the batch the layers were tuned at; the prediction covers the decomposed convs only.
    """
    tune = meta.get("tune")
    if not tune:
        return None
    pred = dict(tune["predicted"])
    pred["target"] = tune["target"]
    row = next((r for r in latency if r["batch"] == pred["batch"]), None)
    if row is not None:
        pred["measured_lowrank_ms"] = row["lowrank"]["median_ms"]
        pred["measured_dense_ms"] = row["dense"]["median_ms"]
        pred["lowrank_ratio"] = pred["lowrank_ms"] / pred["measured_lowrank_ms"]
        pred["dense_ratio"] = pred["dense_ms"] / pred["measured_dense_ms"]
    return pred


def verify_artifacts(
    artifacts_dir: str | Path | None = None,
    runtime: str = "ort",
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    warmup: int = 10,
    repeats: int = 50,
    limit: int | None = None,
    tolerance: float = 0.1,
    eval_batch: int = 64,
    run_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
) -> VerifyResult:
    """Accuracy and latency of both artifacts through ``runtime``; writes verify.json.

    ``artifacts_dir`` defaults to the newest run's artifacts. ``tolerance`` is in accuracy
    points (%): a runtime top-1/top-5 further than that from PyTorch's is a failure,
    reported in ``failures`` (``check()`` raises). ``limit`` evaluates the first N images.
    The PyTorch reference and the validation set come from the source run named in
    meta.json (``run_dir`` overrides it, e.g. when the artifacts were copied elsewhere).
    """
    if runtime not in RUNTIMES:
        raise LrexportError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else newest_run(runs_root) / "artifacts"
    meta = load_meta(artifacts_dir)
    source = Path(run_dir) if run_dir is not None else Path(meta["source"]["run_dir"])
    if not source.is_dir():
        raise LrexportError(f"source run {source} (from meta.json) is gone; pass the run directory with --run")
    run = open_run(source)
    threads = threads or os.cpu_count() or 1
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the torch runtime and the reference use the same count
    try:
        lowrank, dense = load_exported_models(run, meta)
        runners = open_runners(runtime, artifacts_dir, meta, threads, (lowrank, dense))
        val = run.validation_set()
        if limit:
            val = torch.utils.data.Subset(val, range(min(limit, len(val))))
        accuracy = _accuracy(runners, {"lowrank": lowrank, "dense": dense}, val, meta, eval_batch)
        sizes = [meta["batch"]] if meta.get("batch") else list(batch_sizes)
        tuned_at = (meta.get("tune") or {}).get("target", {}).get("batch")
        if tuned_at and tuned_at not in sizes and not meta.get("batch"):
            sizes.append(tuned_at)  # the predicted latency is compared at the batch it was tuned for
        latency = []
        for b in sizes:
            stats, clock = _time_models(runners, _latency_inputs(val, b), warmup, repeats)
            wall = stats["dense"].median_ms / stats["lowrank"].median_ms
            latency.append({
                "batch": b, "lowrank": stats["lowrank"].to_dict(), "dense": stats["dense"].to_dict(),
                "wall_speedup": wall, "ratio": wall / meta["macs_speedup"], "clock": clock,
            })
    finally:
        torch.set_num_threads(torch_threads)

    failures = []
    for m in MODELS:
        for key in ("top1", "top5"):
            got, ref = accuracy[m][key], accuracy[m][f"torch_{key}"]
            if abs(got - ref) > tolerance:
                failures.append(f"{m} {key} through {runtime} is {got:.2f}%, PyTorch's {ref:.2f}% (tolerance {tolerance:g} points)")
    lr, dn = meta["models"]["lowrank"], meta["models"]["dense"]
    predicted = predicted_latency(meta, latency)
    notes = slower_than_dense(latency, runtime, tuned="tune" in meta)
    report = {
        "runtime": runtime,
        "threads": threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "accuracy": accuracy,
        "latency": latency,
        "timing": {"warmup": warmup, "repeats": repeats, "interleaved": True},
        "macs": {
            "dense": dn["macs"], "lowrank": lr["macs"], "lowrank_deployed": lr["deployed_macs"], "speedup": meta["macs_speedup"],
            "deployed_speedup": dn["macs"] / lr["deployed_macs"],
        },
        "predicted": predicted,
        "tolerance": tolerance,
        "failures": failures,
        "passed": not failures,
        "notes": notes,
    }
    if runtime == "ort":
        import onnxruntime

        report["runtime_version"] = onnxruntime.__version__
        report["ort_spinning"] = OrtRunner.spinning
    elif runtime == "torch":
        report["runtime_version"] = torch.__version__
    atomic_write_text(artifacts_dir / VERIFY_FILE, json.dumps(report, indent=2))
    return VerifyResult(artifacts_dir, report, failures)
