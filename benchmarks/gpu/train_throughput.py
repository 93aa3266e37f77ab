"""`lrexport train` itself on the GPU: images/s of the dense and the SVD phase, against a plain loop.

Each model (default ResNet-18 and ResNet-50, 1000 classes) is trained through ``run_recipe``
(bf16, channels_last, batch 256, 224×224, train.cuda_graph as given) on a synthetic set that
already lives on the GPU: the pipeline's loader is replaced by views into device tensors, so
no data loading or copying is measured. Channel-wise: the dense phase, then SVD training of
the decomposed model; spatial-wise: SVD training only (the dense phase does not depend on the
mode). A plain hand-written dense loop (autocast, cross-entropy, backward, SGD step; no
graphs, no host reads) runs in the same process as the reference.

A phase's rate is its steady state: the images between the first and the last host read of
its last epoch over the time between them (each read waits for the GPU). The epoch's own
images/s from metrics.jsonl, which includes warm-up, capture and torch.compile, is reported
beside it. Host syncs in that window are counted with torch.cuda's sync debug mode (those
the autograd engine's thread makes are not seen); about one per read is expected.

    python benchmarks/gpu/train_throughput.py [--models resnet18,resnet50] [--json out.json]
    python benchmarks/gpu/train_throughput.py --dry-run     # CPU, tiny sizes: checks the plumbing

Targets (issue 16, one H100/H200): SVD phase ≥ 0.85× the dense phase; dense phase ≥ 0.95×
the plain loop. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import lrexport
import lrexport.train.pipeline as pipeline
from lrexport.progress import EpochEnd, PhaseStart, Step
from lrexport.recipe import recipe_from_dict
from lrexport.train import run_recipe

SVD_TARGET, DENSE_TARGET = 0.85, 0.95


@dataclass
class Settings:
    device: str
    models: tuple[str, ...]
    modes: tuple[str, ...]
    batch: int
    image_size: int
    num_classes: int
    steps: int  # per epoch
    epochs: int  # per phase; the last one is timed
    log_every: int
    amp: str
    cuda_graph: bool | str
    plain_steps: int
    distinct: int  # distinct batches on the device, cycled


def log(msg: str) -> None:
    print(f"[train_throughput] {msg}", file=sys.stderr, flush=True)


class DeviceBatches:
    """Stands in for the pipeline's DataLoader: ``steps`` batches cycled from tensors on the device.

    It is its own sampler: the pipeline calls ``loader.sampler.set_epoch(epoch, start=images)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int):
        n = max(1, x.shape[0] // batch)
        self.batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(n)]
        self.batch_size, self.steps, self.start = batch, steps, 0
        self.sampler = self

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.start = start // self.batch_size

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for i in range(self.start, self.steps):
            yield self.batches[i % len(self.batches)]


def device_loaders(s: Settings):
    """A stand-in for pipeline.make_loader: the data set's tensors moved to the device once."""

    def make_loader(ds, batch_size, *, shuffle, **_):
        x, y = ds.tensors
        fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
        x, y = x.to(s.device).contiguous(memory_format=fmt), y.to(s.device)
        return DeviceBatches(x, y, batch_size, s.steps if shuffle else max(1, x.shape[0] // batch_size))

    return make_loader


def recipe(s: Settings, model: str, mode: str, dense_epochs: int):
    return recipe_from_dict({
        "name": f"{model}-{mode}", "device": s.device, "amp": s.amp, "channels_last": True, "seed": 0,
        "model": {"name": model},
        "data": {"dataset": "synthetic", "image_size": s.image_size, "batch_size": s.batch, "num_classes": s.num_classes,
                 "train_size": s.batch * s.distinct, "val_size": s.batch, "workers": 0},
        "decompose": {"mode": mode},
        "reg": {"ortho": 5.0, "type": "hoyer", "decay": 0.002},  # the ImageNet ResNet-18 recipe's λ
        # small lr: random labels, random weights; the speed does not depend on it
        "phases": {"dense": {"epochs": dense_epochs, "lr": 0.01, "weight_decay": 1e-4, "schedule": "constant"},
                   "svd": {"epochs": s.epochs, "lr": 0.01, "weight_decay": 1e-4, "schedule": "constant"}},
        "train": {"log_every": s.log_every, "cuda_graph": s.cuda_graph},
        "eval": {"every": 10_000},
    })


class PhaseClock:
    """The progress callback: times the reads of each phase's last epoch, and counts host syncs between them."""

    def __init__(self, cuda: bool, caught: list):
        self.cuda, self.caught = cuda, caught
        self.epochs: dict[str, int] = {}
        self.reads: dict[str, list[tuple[int, float]]] = {}
        self.window: dict[str, list[int]] = {}  # phase → [index in caught at the first read, at the last]
        self.epoch_rates: dict[str, float] = {}

    def __call__(self, event) -> None:
        if isinstance(event, PhaseStart):
            self.epochs[event.phase] = event.epochs
        elif isinstance(event, Step) and event.epoch == self.epochs.get(event.phase):
            phase, now = event.phase, time.perf_counter()  # the read before this event waited for the GPU
            self.reads.setdefault(phase, []).append((event.step, now))
            self.window.setdefault(phase, []).append(len(self.caught))
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn" if event.step < event.steps else "default")
        elif isinstance(event, EpochEnd) and event.epoch == self.epochs.get(event.phase):
            self.epoch_rates[event.phase] = event.record["images_per_s"]

    def result(self, phase: str, batch: int) -> dict:
        reads = self.reads.get(phase, [])
        if len(reads) < 2:
            return {"images_per_s": None, "epoch_images_per_s": self.epoch_rates.get(phase)}
        (s0, t0), (s1, t1) = reads[0], reads[-1]
        first, last = self.window[phase][0], self.window[phase][-1]
        syncs = sum("synchroniz" in str(w.message) for w in self.caught[first:last])
        return {"images_per_s": (s1 - s0) * batch / (t1 - t0), "timed_steps": s1 - s0, "host_syncs": syncs if self.cuda else None,
                "reads": len(reads) - 1, "epoch_images_per_s": self.epoch_rates.get(phase)}


def run_phases(s: Settings, model: str, mode: str, dense: bool, workdir: Path) -> dict:
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(pipeline, "make_loader", device_loaders(s)):
        warnings.simplefilter("always")
        clock = PhaseClock(s.device == "cuda", caught)
        started = time.perf_counter()
        try:
            run_recipe(recipe(s, model, mode, s.epochs if dense else 0), workdir / f"{model}-{mode}", clock, stop_after="svd")
        finally:
            if s.device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    out = {"seconds": round(time.perf_counter() - started, 1), "svd": clock.result("svd", s.batch)}
    if dense:
        out["dense"] = clock.result("dense", s.batch)
    # what the run said about itself: a failed capture, a failed compile (sync warnings are counted above)
    out["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" not in str(w.message)})
    return out


def plain_loop(s: Settings, model_name: str) -> dict:
    """The reference: a dense training loop as one writes it by hand, on the same device-resident batches."""
    device = torch.device(s.device)
    torch.manual_seed(0)
    model = lrexport.create_model(model_name, num_classes=s.num_classes).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(s.batch * s.distinct, 3, s.image_size, s.image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(s.num_classes, (s.batch * s.distinct,), device=device)
    batches = DeviceBatches(x, y, s.batch, s.plain_steps).batches

    def step(i: int) -> None:
        xb, yb = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.amp == "bf16"):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(3):  # cudnn.benchmark, lazy optimizer state
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(s.plain_steps):
        step(i)
    sync()
    return {"images_per_s": s.plain_steps * s.batch / (time.perf_counter() - start), "timed_steps": s.plain_steps}


def measure(s: Settings, workdir: Path) -> dict:
    if s.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline sets it
    report = {"settings": dict(vars(s)), "environment": environment(s), "models": {}}
    for model in s.models:
        row: dict = {}
        log(f"{model}: plain loop")
        row["plain"] = plain_loop(s, model)
        for i, mode in enumerate(s.modes):
            log(f"{model}: lrexport train, {'dense phase, ' if i == 0 else ''}{mode}-wise SVD phase")
            try:
                row[mode] = run_phases(s, model, mode, dense=i == 0, workdir=workdir)
            except Exception as e:  # noqa: BLE001 (report it and go on to the next measurement)
                row[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                log(row[mode]["error"])
            if s.device == "cuda":
                torch.cuda.empty_cache()
        report["models"][model] = row
    return report


def environment(s: Settings) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "lrexport": lrexport.__version__, "device": s.device}
    if s.device == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return env


def _rate(r: dict | None) -> float | None:
    return (r or {}).get("images_per_s")


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    env = report["environment"]
    lines = [
        f"## `lrexport train` throughput ({env.get('gpu', env['device'])}, torch {env['torch']})", "",
        f"batch {s['batch']}, {s['image_size']}×{s['image_size']}, {s['amp']}, channels_last, train.cuda_graph = {s['cuda_graph']}, "
        f"{s['steps']} steps × {s['epochs']} epochs per phase, reads every {s['log_every']} steps; images/s between the "
        "last epoch's first and last read (in brackets: the whole last epoch).", "",
        "| model | plain loop | dense phase | dense ÷ plain | mode | SVD phase | SVD ÷ dense | host syncs / timed steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for model, row in report["models"].items():
        plain = _rate(row.get("plain"))
        first = row.get(s["modes"][0], {})
        dense = _rate(first.get("dense"))
        for mode in s["modes"]:
            r = row.get(mode, {})
            if "error" in r:
                lines.append(f"| {model} | {_fmt(plain)} | | | {mode} | error: {r['error']} | | |")
                continue
            svd = r.get("svd", {})
            ratio_svd = _rate(svd) / dense if _rate(svd) and dense else None
            ratio_dense = dense / plain if dense and plain else None
            syncs = f"{svd.get('host_syncs')} / {svd.get('timed_steps')}" if svd.get("host_syncs") is not None else "–"
            dense_cell = f"{_fmt(dense)} ({_fmt(first.get('dense', {}).get('epoch_images_per_s'))})" if mode == s["modes"][0] else ""
            lines.append(f"| {model} | {_fmt(plain)} | {dense_cell} | {_fmt(ratio_dense, '.2f') if mode == s['modes'][0] else ''} | "
                         f"{mode} | {_fmt(_rate(svd))} ({_fmt(svd.get('epoch_images_per_s'))}) | {_fmt(ratio_svd, '.2f')} | {syncs} |")
            if ratio_svd is not None:
                verdicts.append(f"- {model} {mode}: SVD ÷ dense {ratio_svd:.2f} (target ≥ {SVD_TARGET}): "
                                f"{'met' if ratio_svd >= SVD_TARGET else 'NOT met'}")
            if mode == s["modes"][0] and ratio_dense is not None:
                verdicts.append(f"- {model}: dense ÷ plain {ratio_dense:.2f} (target ≥ {DENSE_TARGET}): "
                                f"{'met' if ratio_dense >= DENSE_TARGET else 'NOT met'}")
            for w in r.get("warnings", []):
                verdicts.append(f"- {model} {mode}: warning: {w}")
    return "\n".join(lines + [""] + verdicts)


def parse(argv=None) -> tuple[Settings, Path, str | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the plumbing, measures nothing")
    p.add_argument("--models", help="comma-separated (default resnet18,resnet50; dry run cifar_resnet20)")
    p.add_argument("--modes", default="channel,spatial")
    p.add_argument("--batch", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--steps", type=int, help="steps per epoch (default 40)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per phase; the last is timed")
    p.add_argument("--log-every", type=int, help="train.log_every (default 10): the timed window's reads")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--plain-steps", type=int)
    p.add_argument("--workdir", help="run directories go here (default: a temporary folder)")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        p.exit(2, "train_throughput: no CUDA GPU visible; --dry-run checks the plumbing on the CPU\n")
    dry = a.dry_run
    pick = lambda v, gpu, cpu: v if v is not None else (cpu if dry else gpu)  # noqa: E731
    s = Settings(
        device="cpu" if dry else "cuda", models=tuple(pick(a.models, "resnet18,resnet50", "cifar_resnet20").split(",")),
        modes=tuple(a.modes.split(",")), batch=pick(a.batch, 256, 4), image_size=pick(a.image_size, 224, 16),
        num_classes=10 if dry else 1000, steps=pick(a.steps, 40, 4), epochs=a.epochs, log_every=pick(a.log_every, 10, 2),
        amp="none" if dry else "bf16", cuda_graph={"true": True, "false": False}.get(a.cuda_graph, a.cuda_graph),
        plain_steps=pick(a.plain_steps, 30, 2), distinct=2 if dry else 4,
    )
    if s.steps < 2 * s.log_every:
        p.error("--steps must be at least twice --log-every: a phase is timed between two reads of its last epoch")
    return s, Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="lrexport-train-throughput-")), a.json


def main(argv=None) -> dict:
    s, workdir, json_path = parse(argv)
    report = measure(s, workdir)
    print(markdown(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
