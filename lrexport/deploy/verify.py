"""Measure exported artifacts through the runtime that will serve them (DESIGN §6).

Works from the artifact directory alone: meta.json, plan.json, the model files, PyTorch's
predictions that export recorded (reference.npz) and the validation data named in
meta.json. Accuracy (top-1, top-k) of the low-rank and the dense model through the runtime,
next to PyTorch's on the same images; latency of both on the same runtime in one process,
interleaved; MACs speedup, wall-clock speedup and their ratio. The result goes to verify.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import rundir
from ..errors import LrexportError
from ..io import atomic_write_text
from .artifacts import MODELS, PLAN_FILE, REFERENCE_FILE
from .backends import DEFAULT_RUNTIME, RUNTIMES, Backend, RuntimeOptions, get_runtime
from .runtime import load_meta, run_batched
from .timing import CUDA_EVENTS, interleave, machine


class VerifyError(LrexportError):
    """Accuracy through the runtime differs from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class VerifyConfig:
    batch_sizes: tuple[int, ...] = (1, 8)  # timed where the artifacts have a dynamic batch
    warmup: int = 10
    repeats: int = 50
    limit: int | None = None  # evaluate the first N validation images
    tolerance: float | None = None  # accuracy points the runtime may differ from PyTorch; None: 0.1 (fp32), 0.5 (int8, fp16)
    eval_batch: int = 64


@dataclass
class Artifacts:
    path: Path
    meta: dict
    plan: dict
    reference: dict[str, np.ndarray]

    @property
    def precision(self) -> str:
        return self.meta.get("precision", "fp32")

    def check_runtime(self, backend: Backend) -> None:
        """int8 artifacts run where they were quantized for: QDQ graphs on the runtimes that read ONNX, a backend's
        own int8 files on it."""
        if self.precision != "int8":
            return
        stored_as = self.meta["quantization"].get("runtime", "onnx")
        if not backend.runs_int8(stored_as):
            runs = [name for name, e in RUNTIMES.items() if e.int8 and (e.int8_format == stored_as or stored_as == "onnx" and e.reads_onnx)]
            where = "QDQ ONNX graphs" if stored_as == "onnx" else f"{RUNTIMES[stored_as].title} programs"
            raise LrexportError(f"{self.path} holds int8 models as {where} ({', '.join(runs)}); {backend.name} cannot run them: "
                                f"verify with {'that runtime' if len(runs) == 1 else 'one of them'}, or export again with "
                                f"--runtime {backend.name}")

    def validation_set(self):
        """The validation set named in meta.json, rebuilt with its validation transform."""
        from ..data import recorded_validation_set

        return recorded_validation_set(self.meta["data_config"], f"{self.path}/meta.json")


def load_artifacts(path: str | Path) -> Artifacts:
    """An artifact directory that ``lrexport export`` wrote; what is missing is one clear line."""
    path = Path(path)
    meta = load_meta(path)
    missing = [f for f in (PLAN_FILE, REFERENCE_FILE) if not (path / f).is_file()]
    if missing or "data_config" not in meta:
        what = ", ".join(missing) or "meta.json's data_config"
        raise LrexportError(f"{path} lacks {what}: it was exported by an older lrexport; export the run again")
    try:
        plan = json.loads((path / PLAN_FILE).read_text())
        with np.load(path / REFERENCE_FILE) as ref:
            reference = {k: ref[k] for k in ref.files}
    except (ValueError, OSError) as e:
        raise LrexportError(f"{path}: plan.json or reference.npz is damaged ({e}); export the run again") from None
    return Artifacts(path, meta, plan, reference)


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


def _hits(top: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(axis=1).sum())


def measure_accuracy(runners: dict, art: Artifacts, val, config: VerifyConfig) -> dict:
    """Top-1/top-k through the runtime beside PyTorch's recorded predictions on the same images."""
    from torch.utils.data import DataLoader, Subset

    ref, batch = art.reference, art.meta.get("batch")
    n = min(len(val), len(ref["labels"]), config.limit or len(val))
    if n == 0:
        raise LrexportError("the validation set is empty; nothing to verify on")
    k = ref["lowrank_top"].shape[1]
    counts = {m: dict(top1=0, top5=0, torch_top1=0, torch_top5=0, top1_disagree=0) for m in MODELS}
    seen = 0
    for x, y in DataLoader(Subset(val, range(n)), batch_size=batch or config.eval_batch, shuffle=False):
        labels = y.numpy()
        if not np.array_equal(labels, ref["labels"][seen:seen + len(labels)]):
            raise LrexportError(f"the validation data named in {art.path}/meta.json changed since export (labels differ); "
                                "export the run again")
        for m in MODELS:
            out = run_batched(runners[m].run, x.numpy(), batch)
            top = np.argsort(-out, axis=1)[:, :k]
            torch_top = ref[f"{m}_top"][seen:seen + len(labels)]
            c = counts[m]
            for prefix, t in (("", top), ("torch_", torch_top)):
                t1, t5 = _hits(t, labels)
                c[f"{prefix}top1"] += t1
                c[f"{prefix}top5"] += t5
            c["top1_disagree"] += int((top[:, 0] != torch_top[:, 0]).sum())
        seen += len(labels)
    acc = {m: {key: (100.0 * v / n if key != "top1_disagree" else v) for key, v in c.items()} for m, c in counts.items()}
    return acc | {"images": n, "top5_k": k}


def _latency_inputs(val, batch: int) -> np.ndarray:
    n = min(batch, len(val))
    x = np.stack([val[i][0].numpy() for i in range(n)])
    return np.resize(x, (batch, *x.shape[1:])) if n < batch else x


def measure_latency(runners: dict, val, sizes, macs_speedup: float, config: VerifyConfig) -> list[dict]:
    """Both models timed interleaved at each batch; the speedup is the median of per-round ratios."""
    cuda = next(iter(runners.values())).clock == CUDA_EVENTS
    rows = []
    for b in sizes:
        x = _latency_inputs(val, b)
        timed = interleave({m: r.bind(x) for m, r in runners.items()}, config.warmup, config.repeats, cuda)
        wall = timed.ratio("dense", "lowrank")
        rows.append({"batch": b, "lowrank": timed.stats("lowrank", b).to_dict(), "dense": timed.stats("dense", b).to_dict(),
                     "wall_speedup": wall, "ratio": wall / macs_speedup, "clock": timed.clock})
        if "dense_fp32" in runners:  # quantized artifacts: both beside the fp32 dense model, in the same rounds
            rows[-1] |= {"dense_fp32": timed.stats("dense_fp32", b).to_dict(), "speedup_over_fp32": timed.ratio("dense_fp32", "lowrank"),
                         "dense_speedup_over_fp32": timed.ratio("dense_fp32", "dense")}
    return rows


NOISE = 0.97  # a speedup this close to 1 is equal within the noise of interleaved timing on a shared machine


def slower_than_dense(latency: list[dict], runtime: str, deployed: str, narrower: bool = False) -> list[str]:
    """A note where the low-rank model measured slower than the dense one beyond noise: fewer MACs did not pay here.
    ``narrower``: channels were pruned, so even with every layer dense the deployed model is not the dense one."""
    slow = [row for row in latency if row["wall_speedup"] < NOISE]
    if not slow:
        return []
    at = ", ".join(f"{row['wall_speedup']:.2f}x at batch {row['batch']}" for row in slow)
    alike = "the models are alike: the machine was busy"
    hint = {"untuned": "export without --no-tune to deploy each layer dense or factored by measured latency",
            "dense": "export measured it faster than the model before channel pruning; the machine may have been busy: "
                     "verify again" if narrower else f"every layer is already deployed dense, so {alike}",
            "original": f"the model before channel pruning is what was deployed, so {alike}"}.get(
        deployed, f"export for this runtime and batch (lrexport export --runtime {runtime} --batch B) to tune for it")
    return [f"the low-rank model ran slower than the dense one on {runtime} ({at}); {hint}"]


# which of the tuning's predicted sums is the deployed model's: a plan the guard deployed dense runs every layer dense
PREDICTED_FOR = {"tuned": "tuned_ms", "untuned": "untuned_ms", "dense": "dense_ms"}


def predicted_latency(plan: dict, latency: list[dict]) -> list[dict]:
    """The deployed plan's predicted per-batch times (sums of one-layer times) beside the measured ones."""
    rows = []
    measured = {row["batch"]: row for row in latency}
    for p in (plan.get("tune") or {}).get("predicted", []):
        if plan["deployed"] not in PREDICTED_FOR or not p["dense_ms"]:  # the tuning timed none of the deployed model's layers
            break
        row = {"batch": p["batch"], "lowrank_ms": p[PREDICTED_FOR[plan["deployed"]]], "dense_ms": p["dense_ms"]}
        if p["batch"] in measured:
            row["measured_lowrank_ms"] = measured[p["batch"]]["lowrank"]["median_ms"]
            row["measured_dense_ms"] = measured[p["batch"]]["dense"]["median_ms"]
        rows.append(row)
    return rows


def verify_artifacts(artifacts_dir: str | Path | None = None, runtime: str | None = None, options: RuntimeOptions | None = None,
                     config: VerifyConfig | None = None, runs_root: str | Path = "runs") -> VerifyResult:
    """Accuracy and latency of both artifacts through ``runtime`` (default: the one exported for); writes verify.json.

    ``artifacts_dir`` defaults to the newest run's artifacts. An accuracy further than
    ``config.tolerance`` points from PyTorch's is a failure, reported in ``failures``
    (``check()`` raises).
    """
    config, options = config or VerifyConfig(), options or RuntimeOptions()
    art = load_artifacts(artifacts_dir if artifacts_dir is not None else rundir.artifacts_dir(rundir.newest_run(runs_root)))
    runtime = runtime or art.meta.get("runtime", DEFAULT_RUNTIME)
    backend = get_runtime(runtime)  # an unknown or missing runtime: one line
    art.check_runtime(backend)
    if options.precision in (None, "fp32") and art.precision != "fp32":
        options = replace(options, precision=art.precision)  # quantized graphs run as what they are

    def runner(m: str, options: RuntimeOptions):
        return backend.open(backend.artifact_source(art.path, art.meta, m), backend.entry.resolve(options))

    runners = {m: runner(m, options) for m in MODELS}
    if art.precision == "int8":
        runners["dense_fp32"] = runner("dense_fp32", replace(options, precision="fp32"))
    tolerance = config.tolerance if config.tolerance is not None else (0.1 if art.precision == "fp32" else 0.5)
    val = art.validation_set()
    accuracy = measure_accuracy(runners, art, val, config)
    sizes = [art.meta["batch"]] if art.meta.get("batch") else list(config.batch_sizes)
    latency = measure_latency(runners, val, sizes, art.meta["macs_speedup"], config)
    failures = [
        f"{m} {key} through {runtime} ({art.precision}) is {accuracy[m][key]:.2f}%, PyTorch's (fp32) {accuracy[m][f'torch_{key}']:.2f}% "
        f"(tolerance {tolerance:g} points)"
        for m in MODELS for key in ("top1", "top5") if abs(accuracy[m][key] - accuracy[m][f"torch_{key}"]) > tolerance
    ]
    lr, dn = art.meta["models"]["lowrank"], art.meta["models"]["dense"]
    report = {
        "runtime": runtime, "settings": runners["lowrank"].settings(), "threads": runners["lowrank"].settings().get("threads"),
        "machine": machine(), "accuracy": accuracy, "latency": latency,
        "timing": {"warmup": config.warmup, "repeats": config.repeats, "interleaved": True, "speedup": "median of per-round ratios"},
        "macs": {"dense": dn["macs"], "lowrank": lr["macs"], "lowrank_deployed": lr["deployed_macs"],
                 "speedup": art.meta["macs_speedup"], "deployed_speedup": dn["macs"] / lr["deployed_macs"]},
        "plan": {"runtime": art.plan["runtime"], "deployed": art.plan["deployed"], "target": art.plan.get("target")},
        "predicted": predicted_latency(art.plan, latency) if runtime == art.plan["runtime"] else [],
        "precision": art.precision, "tolerance": tolerance, "failures": failures, "passed": not failures,
        "notes": slower_than_dense(latency, runtime, art.plan["deployed"], narrower=art.meta.get("channels_pruned", False)),
    }
    if runtime != art.plan["runtime"] and art.plan["deployed"] != "untuned":
        report["notes"].append(f"the plan was measured on {art.plan['runtime']}, not {runtime}: "
                               f"export with --runtime {runtime} to deploy for it")
    atomic_write_text(art.path / rundir.VERIFY, json.dumps(report, indent=2))
    return VerifyResult(art.path, report, failures)
