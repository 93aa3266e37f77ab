"""One SVD-training step over one dense training step, CIFAR ResNet-20, batch 100, CPU.

A step is: zero grads, forward, cross-entropy (+ λ_o·orthogonality + λ_s·sparsity for the
SVD models), backward, SGD step. The dense model and the full-rank decomposed models
(channel-wise, spatial-wise) run in interleaved rounds, in a rotating order, so that load
from other processes hits all of them alike. Each round gives one ratio per mode
(svd time / dense time of that round); we report the median and the p10–p90 of those ratios.
On a shared machine, ``--threads 1 --clock cpu`` counts this process's CPU time, which
other processes' load barely changes.

    python benchmarks/svd_training_step.py [--repeats 30] [--threads 2] [--clock wall|cpu] [--compiled] [--breakdown] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import lrexport
from lrexport.deploy.timing import cpu_name, quantile
from lrexport.lowrank import regularizers
from lrexport.train.loop import Loss

MODES = ("channel", "spatial")


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss):
    # SGD as the paper's CIFAR schedule (momentum 0.9, weight decay 5e-4); lr is irrelevant to time
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss.total(loss.terms(model, model(x), y)).backward()  # as lrexport's training loop does
        opt.step()

    return step


def breakdown_parts(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, svd: bool, sparsity: str) -> dict:
    """The step's parts, each timed alone: where an SVD step spends its extra time."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    sparse = regularizers.sparsity(sparsity)

    def net() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def reg() -> None:
        (regularizers.orthogonality(model) + 0.01 * sparse(model)).backward()

    parts = {"forward+backward": net, "optimizer step": opt.step}
    if svd:
        parts["regularizers fwd+bwd"] = reg
    net()  # gives every parameter a gradient, so that the optimizer step does real work
    return parts


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(step) -> float:
    t0 = clock()
    step()
    return clock() - t0


def run(repeats: int, warmup: int, batch: int, threads: int, sparsity: str, breakdown: bool = False, clock_name: str = "wall",
        compiled: bool = False) -> dict:
    global clock
    clock = CLOCKS[clock_name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(10, (batch,))
    dense = lrexport.create_model("cifar_resnet20", num_classes=10)
    steps = {"dense": make_step(dense, x, y, Loss())}
    svd_loss = Loss(ortho=1.0, sparsity_type=sparsity, decay=0.01)
    svd_models = {}
    for mode in MODES:
        svd_models[mode] = lrexport.decompose(copy.deepcopy(dense), mode)  # full rank: exact SVD of each conv
        steps[mode] = make_step(svd_models[mode], x, y, svd_loss)
        if compiled:  # reg.compile = true; the warm-up below compiles
            steps[f"{mode} (compiled regularizers)"] = make_step(copy.deepcopy(svd_models[mode]), x, y, svd_loss.compiled())
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(timed(steps[name]))
    ratios = {name: [s / d for s, d in zip(times[name], times["dense"])] for name in names if name != "dense"}
    parts = {}
    if breakdown:
        models = {"dense": (dense, False), **{mode: (svd_models[mode], True) for mode in MODES}}
        fns = {(name, part): fn for name, (m, svd) in models.items() for part, fn in breakdown_parts(m, x, y, svd, sparsity).items()}
        samples: dict = {key: [] for key in fns}
        for fn in fns.values():
            fn()
        for _ in range(max(5, repeats // 3)):
            for key, fn in fns.items():
                samples[key].append(timed(fn))
        for (name, part), t in samples.items():
            parts.setdefault(name, {})[part] = 1e3 * statistics.median(t)
    return {
        "machine": {
            "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg": os.getloadavg(),
        },
        "config": {"model": "cifar_resnet20", "batch": batch, "repeats": repeats, "warmup": warmup, "sparsity": sparsity, "clock": clock_name,
                   "compiled": compiled},
        "step_ms": {
            name: {"median": 1e3 * statistics.median(t), "p10": 1e3 * quantile(t, 0.1), "p90": 1e3 * quantile(t, 0.9)}
            for name, t in times.items()
        },
        "ratio": {
            name: {"median": statistics.median(r), "p10": quantile(r, 0.1), "p90": quantile(r, 0.9)} for name, r in ratios.items()
        },
        "breakdown_ms": parts,
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"CIFAR ResNet-20, batch {res['config']['batch']}, {res['config']['repeats']} interleaved rounds after "
        f"{res['config']['warmup']} warm-up, sparsity={res['config']['sparsity']}, {res['config']['clock']} clock; {m['cpu']}, "
        f"{m['threads']} threads of {m['logical_cpus']}, torch {m['torch']}, load average {m['loadavg'][0]:.2f}",
        "",
        "| step | median ms | p10–p90 ms | ratio to dense (median) | ratio p10–p90 |",
        "|---|---|---|---|---|",
    ]
    for name, t in res["step_ms"].items():
        r = res["ratio"].get(name)
        ratio = f"{r['median']:.3f} | {r['p10']:.3f}–{r['p90']:.3f}" if r else "1 | –"
        lines.append(f"| {name} | {t['median']:.1f} | {t['p10']:.1f}–{t['p90']:.1f} | {ratio} |")
    if res["breakdown_ms"]:
        part_names = list(next(iter(res["breakdown_ms"].values())))
        part_names += [p for p in res["breakdown_ms"]["channel"] if p not in part_names]
        lines += ["", "Parts of the step, each timed alone (median ms):", "",
                  "| step | " + " | ".join(part_names) + " |", "|---" * (len(part_names) + 1) + "|"]
        for name, parts in res["breakdown_ms"].items():
            lines.append(f"| {name} | " + " | ".join(f"{parts[p]:.1f}" if p in parts else "–" for p in part_names) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--sparsity", default="hoyer", choices=sorted(regularizers.SPARSITY))
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other load)")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of each step alone")
    p.add_argument("--compiled", action="store_true", help="also time each mode with torch.compile'd regularizers (reg.compile = true)")
    p.add_argument("--json", help="also write the raw result here")
    a = p.parse_args()
    res = run(a.repeats, a.warmup, a.batch, a.threads, a.sparsity, a.breakdown, a.clock, a.compiled)
    print(markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
