"""What planning costs on a runtime: tuning with the candidates opened together (``Backend.open_many``) against
one by one (the base ``Backend.open_many``), in one process, same code otherwise, each with a fresh cache.

- ``resnet18``: the latency rank allocation (``prune.latency = R``) of deploy_efficiency.py's ResNet-18 at
  224×224 (random weights, synthesized spectra, channel mode, energy at 3× fewer MACs), batches 1 and 8.
- ``resnet20``: export's per-layer tuning of a CIFAR ResNet-20 (channel mode, energy 0.2) at 32×32, export's
  default batches and timing.

Printed per model: seconds each way, their ratio, whether the plans (allocated ranks, tuned choices) agree, and
how far the two runs' candidate times differ (median and p90 of |t_together / t_alone − 1| over all candidates),
and each plan's predicted time in both runs' tables (a plan that differs within timing noise predicts the same).
For ``resnet20`` the two plans' whole models are also timed interleaved on the runtime: where choices flip
between near-equal candidates, the models run equally fast.

    python benchmarks/tune_cost.py [--runtime executorch] [--precision fp32,int8] [--models resnet18,resnet20] [--threads 2] [--ways alone,together] [--same 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lrexport  # noqa: E402
from deploy_efficiency import INPUT, prune_to_target, synthesize_spectra  # noqa: E402
from lrexport.deploy.backends import Backend, RuntimeOptions, get_runtime, open_runners  # noqa: E402
from lrexport.deploy.planning.latency_ranks import LatencyConfig, cap_of, latency_prune  # noqa: E402
from lrexport.deploy.planning.plan import DEFAULT_BATCHES  # noqa: E402
from lrexport.deploy.planning.tune import CONTEXT_OUT, DENSE, TuneCache, contexts, layer_source, make_target, tune, tune_layers_of  # noqa: E402
from lrexport.deploy.timing import interleave_within, machine, quantile  # noqa: E402
from lrexport.lowrank import decompose, prune  # noqa: E402

CIFAR_INPUT = (3, 32, 32)


@contextmanager
def opened(runtime: str, way: str):
    """``way`` "alone": the runtime's runners opened one by one (the base Backend.open_many) while inside."""
    backend = get_runtime(runtime)
    if way == "alone":
        backend.open_many = functools.partial(Backend.open_many, backend)
    try:
        yield
    finally:
        backend.__dict__.pop("open_many", None)


@torch.no_grad()
def resnet18():
    torch.manual_seed(0)
    model = decompose(lrexport.create_model("resnet18", num_classes=1000).eval(), "channel")
    synthesize_spectra(model, 0)
    energy, _ = prune_to_target(copy.deepcopy(model), 3.0, 1)
    return model, energy


def allocate_ranks(runtime: str, options: RuntimeOptions, cache: Path):
    """ResNet-18's latency allocation: (plan name → rank or dense, times name → candidate → ms per image)."""
    model, energy = resnet18()
    record = latency_prune(model, INPUT, energy, cap_of("auto", energy), LatencyConfig(runtime, (1, 8), options, 8, cache)).record
    return ({n: layer["allocated"] for n, layer in record["layers"].items()},
            {n: layer["times_ms"] for n, layer in record["layers"].items()})


def tune_resnet20(runtime: str, options: RuntimeOptions, cache: Path):
    """A CIFAR ResNet-20's export tuning: (plan, times name → candidate → ms summed over the batches)."""
    torch.manual_seed(0)
    model = decompose(lrexport.create_model("cifar_resnet20", num_classes=10).eval(), "channel")
    prune(model, 0.2)
    result = tune(tune_layers_of(model, CIFAR_INPUT), make_target(runtime, options, DEFAULT_BATCHES), TuneCache(cache))
    return {c.name: c.choice for c in result.choices}, {c.name: c.times_ms for c in result.choices}


@torch.no_grad()
def resnet20_plans_timed(runtime: str, options: RuntimeOptions, plans: dict) -> dict:
    """The ResNet-20 of ``tune_resnet20`` deployed by each way's plan (``plans``: way → plan), the whole models timed
    interleaved on ``runtime`` at each default batch: batch → median over rounds of t_alone / t_together (1: the
    plans run equally fast, whatever layers they differ in)."""
    import numpy as np

    from lrexport.lowrank.rewrite import to_plain

    torch.manual_seed(0)
    model = decompose(lrexport.create_model("cifar_resnet20", num_classes=10).eval(), "channel")
    prune(model, 0.2)
    backend = get_runtime(runtime)
    ratios = {}
    for batch in DEFAULT_BATCHES:
        x = np.random.default_rng(0).standard_normal((batch, *CIFAR_INPUT), dtype=np.float32)
        calls = {}
        for way, plan in plans.items():
            plain = to_plain(model, CIFAR_INPUT, 8, plan)[0]
            source = backend.timing_source(options.precision, None, lambda p=plain: p, (batch, *CIFAR_INPUT), f"{way}'s plan")
            calls[way] = backend.open(source, backend.entry.resolve(options)).bind(x)
        ratios[batch] = interleave_within(calls, 2000.0, 30, 200, warmup=10).ratio("alone", "together")
    return ratios


MODELS = {"resnet18": allocate_ranks, "resnet20": tune_resnet20}


def same_programs(runtime: str, options: RuntimeOptions, batch: int, layers: int = 4) -> dict:
    """The runners of the first ``layers`` distinct ResNet-18 layer shapes' candidates opened both ways, timed
    interleaved in one loop (so that other load on the machine hits both alike): per candidate, the median over
    rounds of t_together / t_alone."""
    import numpy as np

    model, _ = resnet18()
    shapes = list({t.shape.key(): t for t in tune_layers_of(model, INPUT)}.values())[:layers]
    sources = {(t.shape.key(), c): layer_source(t.shape, c, batch, runtime, options.precision)
               for t in shapes for c in [DENSE, 16, 32, 64, *contexts(t.shape)]}
    inputs = {(t.shape.key(), c): np.random.default_rng(0).standard_normal(
        (batch, t.shape.n, *t.shape.out_hw) if c == CONTEXT_OUT else (batch, t.shape.c, *t.shape.in_hw), dtype=np.float32)
        for t in shapes for c in [DENSE, 16, 32, 64, *contexts(t.shape)]}
    runners = {"together": open_runners(runtime, sources, options)}
    with opened(runtime, "alone"):
        runners["alone"] = open_runners(runtime, sources, options)
    ratios = []
    for key in sources:
        calls = {way: runners[way][key].bind(inputs[key]) for way in runners}
        ratios.append(interleave_within(calls, 300.0, 15, 40, warmup=3).ratio("together", "alone"))
    return {"candidates": len(ratios), "batch": batch, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def predicted(plan: dict, times: dict) -> float:
    return sum(times[n][str(c)] for n, c in plan.items())


def compare(runs: dict) -> dict:
    """Agreement of the two ways' plans and times."""
    (plan_a, times_a), (plan_b, times_b) = runs["alone"], runs["together"]
    diffs = [abs(times_b[n][c] / times_a[n][c] - 1) for n in times_a for c in times_a[n] if c in times_b[n]]
    differ = sorted(n for n in plan_a if plan_a[n] != plan_b[n])
    return {"layers": len(plan_a), "differ": {n: [plan_a[n], plan_b[n]] for n in differ},
            "time_diff_median": statistics.median(diffs), "time_diff_p90": quantile(diffs, 0.9),
            "alone_plan_ms": {"in_alone": predicted(plan_a, times_a), "in_together": predicted(plan_a, times_b)},
            "together_plan_ms": {"in_alone": predicted(plan_b, times_a), "in_together": predicted(plan_b, times_b)}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", default="executorch")
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--models", default="resnet18,resnet20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ways", default="alone,together", help="alone (one by one), together (open_many); in this order")
    ap.add_argument("--same", type=int, default=0, help="also time N ResNet-18 layer shapes' candidates opened both ways, "
                                                        "interleaved (at batch 8): the same programs run equally fast")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{machine()}; {args.runtime}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results = []
    for precision in args.precision.split(","):
        options = RuntimeOptions(threads=args.threads, precision=precision)
        make_target(args.runtime, options, (1,))  # the runtime imported and warm before either way is timed
        for name in filter(None, args.models.split(",")):
            runs, seconds = {}, {}
            for way in args.ways.split(","):
                with tempfile.TemporaryDirectory() as tmp, opened(args.runtime, way):
                    start = time.perf_counter()
                    runs[way] = MODELS[name](args.runtime, options, Path(tmp) / "cache.json")
                    seconds[way] = time.perf_counter() - start
                print(f"{name} {precision} {way}: {seconds[way]:.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
            row = {"model": name, "precision": precision, "seconds": seconds}
            if len(runs) == 2:
                row |= compare(runs) | {"speedup": seconds["alone"] / seconds["together"]}
                if name == "resnet20":
                    row["whole_model_alone_over_together"] = resnet20_plans_timed(args.runtime, options, {w: r[0] for w, r in runs.items()})
                    print(f"  the two plans' whole models, interleaved: t_alone / t_together "
                          f"{', '.join(f'{r:.3f} at batch {b}' for b, r in row['whole_model_alone_over_together'].items())}", flush=True)
                print(f"  {row['speedup']:.2f}x faster together; plans differ in {len(row['differ'])} of {row['layers']} layers "
                      f"{row['differ'] or ''}; candidate times differ by {100 * row['time_diff_median']:.1f}% median, "
                      f"{100 * row['time_diff_p90']:.1f}% p90; predicted ms in alone's / together's times: alone's plan "
                      f"{row['alone_plan_ms']['in_alone']:.3f} / {row['alone_plan_ms']['in_together']:.3f}, together's "
                      f"{row['together_plan_ms']['in_alone']:.3f} / {row['together_plan_ms']['in_together']:.3f}", flush=True)
            results.append(row)
        if args.same:
            row = same_programs(args.runtime, options, 8, args.same) | {"precision": precision}
            print(f"same programs, {precision}: {row['candidates']} candidates at batch 8, t_together / t_alone interleaved: median "
                  f"{row['ratio_median']:.3f}, range {row['ratio_min']:.3f}–{row['ratio_max']:.3f}", flush=True)
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
