"""Wall-clock speedup of exported low-rank ResNet-18s over the dense one, on onnxruntime CPU.

torchvision ResNet-18 at 224×224, every conv decomposed channel-wise and spatial-wise.
Each layer gets a synthetic, exponentially decaying spectrum with its own decay rate,
so energy pruning leaves uneven ranks as it does after SVD training; the energy
threshold e is found by bisection so that the pruned model has ~``--target``× fewer MACs.
Variants per mode: the exact energy ranks exported as they are ("exact"), zero-padded
upward to multiples of 8 or 16 at export ("aligned8", "aligned16": same model, more MACs
deployed), and ranks rounded to the nearest multiple of 16 at pruning time, as the
recipe's prune step would do before finetuning ("pruned16": nothing to pad). With
``--tune``, "tuned@B" per mode and batch B: the energy-rule model deployed per layer as
timed fastest on onnxruntime at batch B, as ``lrexport export --tune --tune-batch B`` does
(lrexport.deploy.tune, whole-model guard included), timed at batch B only; and, where
"pruned16" is among the variants, "tuned16@B": the pruned16 model tuned the same way (the
advice for AVX-512 CPUs: round ranks to ×16 before finetuning, then export --tune). The dense
model is exported the same way (BN folded in all). All ONNX models are
timed in one process on the same onnxruntime settings, calls interleaved in alternating
order; per round we take dense time / low-rank time, and report the median and p10–p90
of those ratios beside the medians of the latencies themselves.

    python benchmarks/deploy_efficiency.py [--threads 2] [--repeats 80] [--variants exact,aligned8] [--tune] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics

import numpy as np
import onnxruntime
import torch

import lrexport
from lrexport.deploy.gpu_timing import quantile
from lrexport.deploy.latency import time_rounds
from lrexport.deploy.onnx_graph import check_graph, to_onnx
from lrexport.deploy.runtime import OrtRunner
from lrexport.deploy.tune import end_to_end, tune_model
from lrexport.lowrank import count_macs, decompose, energy_rank, prune, round_rank, svd_layers
from lrexport.lowrank.rewrite import plan_layers, relative_error, to_plain

INPUT = (3, 224, 224)
MODES = ("channel", "spatial")


def cpu_name() -> str:
    """CPU model and its widest vector unit (onnxruntime's conv kernels block channels by it)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({vector})"


@torch.no_grad()
def synthesize_spectra(model: torch.nn.Module, seed: int) -> None:
    """s_i = s_0·exp(−i / (τ·r)) per layer, τ drawn log-uniformly in [0.04, 0.4]; the Frobenius norm is kept."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in svd_layers(model):
        r = layer.rank
        tau = math.exp(math.log(0.04) + (math.log(0.4) - math.log(0.04)) * torch.rand((), generator=gen).item())
        s = torch.exp(-torch.arange(r, dtype=torch.float64) / (tau * r))
        layer.s.copy_((s * layer.s.double().norm() / s.norm()).to(layer.s.dtype))


def macs_at(model, plans, energy: float, other_macs: int, multiple_of: int) -> int:
    """MACs the model would have after pruning at ``energy``, without pruning it."""
    total = other_macs
    for plan, (_, layer) in zip(plans, svd_layers(model)):
        rank = min(layer.rank, round_rank(energy_rank(layer.s, energy), multiple_of, layer.full_rank))
        dense, factored = layer.macs(plan.in_hw, rank=rank)
        total += min(dense, factored)
    return total


def prune_to_target(model, target: float, multiple_of: int = 1) -> tuple[float, dict]:
    """Bisection on e so that dense MACs / pruned MACs ≈ ``target``; prunes ``model`` in place.

    ``multiple_of`` > 1 rounds each rank to the nearest multiple at pruning time, as the
    recipe's prune step does before finetuning.
    """
    report = count_macs(model, INPUT)
    other = sum(layer.deployed for layer in report.layers if not layer.kind.startswith("svd"))
    plans = plan_layers(model, INPUT, multiple_of=1)
    goal = report.dense / target
    lo, hi = 0.0, 0.999
    for _ in range(40):
        mid = (lo + hi) / 2
        if macs_at(model, plans, mid, other, multiple_of) > goal:
            lo = mid
        else:
            hi = mid
    prune(model, hi, multiple_of=multiple_of)
    return hi, {name: layer.rank for name, layer in svd_layers(model)}


# (name, rank multiple at pruning, rank multiple at export): exact ranks exported as they are
# or zero-padded upward, and ranks rounded at pruning time so that export pads nothing
VARIANTS = (("exact", 1, 1), ("aligned8", 1, 8), ("aligned16", 1, 16), ("pruned16", 16, 1))
# tuned models: name -> (rank multiple at pruning, the untuned variant it starts from and is guarded against)
TUNED = {"tuned": (1, "aligned8"), "tuned16": (16, "pruned16")}


def build_models(seed: int, target: float, variants=VARIANTS, exclude=(), tune_batches=(), threads: int = 2, tune_cache=None):
    """name -> (ONNX proto, MACs as trained, MACs as deployed), plus per-variant details.

    ``tune_batches``: also a "tuned@B" model per mode and batch B, the energy-rule model
    (as "exact"/"aligned8") deployed per layer as timed fastest on onnxruntime at batch B
    (``lrexport export --tune --tune-batch B``), ``threads`` threads, times cached in ``tune_cache``;
    likewise "tuned16@B" from the pruned16 model where that variant is built.
    """
    torch.manual_seed(seed)
    dense = lrexport.create_model("resnet18", num_classes=1000).eval()
    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        ref_dense = dense(x)
    plain_dense, _ = to_plain(dense, INPUT, 1)
    assert relative_error(plain_dense(x), ref_dense) < 1e-4
    dense_macs = count_macs(dense, INPUT).deployed
    models = {"dense": (to_onnx(plain_dense, INPUT), dense_macs, dense_macs)}
    details = {}
    for mode in MODES:
        decomposed = decompose(copy.deepcopy(dense), mode, exclude=exclude)
        synthesize_spectra(decomposed, seed)
        pruned = {}

        def pruned_at(multiple: int):
            """(model, e, ranks) pruned to the target with ranks rounded to ``multiple``; built once."""
            if multiple not in pruned:
                lowrank = copy.deepcopy(decomposed)
                energy, ranks = prune_to_target(lowrank, target, multiple)
                pruned[multiple] = (lowrank.eval(), energy, ranks)
            return pruned[multiple]

        def add(name: str, lowrank, plain, report, energy, ranks, proto=None, **extra) -> None:
            """Check ``plain`` against ``lowrank``, export it (unless ``proto`` is given) and record it."""
            with torch.no_grad():
                err = relative_error(plain(x), lowrank(x))
            assert err < 1e-4, (name, err)
            if proto is None:
                proto = to_onnx(plain, INPUT)
                check_graph(proto)
            macs, deployed = count_macs(lowrank, INPUT).deployed, count_macs(plain, INPUT).deployed
            models[name] = (proto, macs, deployed)
            details[name] = {
                "energy": energy, "ranks": ranks, "macs": macs, "deployed_macs": deployed,
                "dense_layers": [p.name for p in report.layers if p.dense], **extra,
            }

        for name, prune_multiple, align in variants:
            lowrank, energy, ranks = pruned_at(prune_multiple)
            add(f"{mode}/{name}", lowrank, *to_plain(lowrank, INPUT, align), energy, ranks)
        for tuned_name, (prune_multiple, untuned_name) in TUNED.items():
            if untuned_name not in {v[0] for v in variants}:
                continue
            for batch in tune_batches:
                lowrank, energy, ranks = pruned_at(prune_multiple)
                tuned = tune_model(lowrank, INPUT, batch=batch, threads=threads, cache_path=tune_cache)
                plain, report = to_plain(lowrank, INPUT, 8, tuned.plan)
                proto = None
                if tuned.plan != tuned.default_plan:
                    # as export --tune does: the whole tuned model must beat the untuned one, or the untuned one goes out
                    proto = to_onnx(plain, INPUT)
                    check_graph(proto)
                    untuned = models[f"{mode}/{untuned_name}"][0]
                    tuned.end_to_end = end_to_end(proto.SerializeToString(), untuned.SerializeToString(), INPUT, tuned.target)
                    if tuned.deployed == "untuned":
                        (plain, report), proto = to_plain(lowrank, INPUT, 8), untuned
                choices = tuned.choices
                add(f"{mode}/{tuned_name}@{batch}", lowrank, plain, report, energy, ranks, proto, untuned=untuned_name,
                    tune=tuned.to_dict(), summary={
                        "dense": sum(c.dense for c in choices), "default_kept": sum(c.choice == c.default for c in choices),
                        "padded_beyond_default": sum(not c.dense and c.default != "dense" and c.choice > c.default for c in choices),
                        "exact_energy_rank": sum(not c.dense and c.choice == ranks[c.name] for c in choices),
                    })
    return models, details, dense_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=60, help="timed rounds at batch 1 (fewer at larger batches)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--target", type=float, default=3.0, help="MACs speedup to prune to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="subset of " + ", ".join(v[0] for v in VARIANTS))
    ap.add_argument("--exclude", default="", help="comma-separated layer patterns kept dense, e.g. conv1 (the stem)")
    ap.add_argument("--tune", action="store_true",
                    help="add tuned@B per mode and batch: per-layer deployment timed fastest at batch B (export --tune)")
    ap.add_argument("--tune-cache", default=None, help="layer timing cache (JSON) reused across runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # torch only builds and checks the models; one thread avoids OpenMP contention on a shared machine
    torch.set_num_threads(1)

    exclude = tuple(p for p in args.exclude.split(",") if p)
    chosen = set(args.variants.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    if args.tune:
        chosen.add("aligned8")  # the untuned default export, the tuned model's baseline
    models, details, dense_macs = build_models(
        args.seed, args.target, [v for v in VARIANTS if v[0] in chosen], exclude,
        tune_batches=batches if args.tune else (), threads=args.threads, tune_cache=args.tune_cache,
    )
    for name, d in details.items():
        ranks = list(d["ranks"].values())
        print(f"{name:18s} e = {d['energy']:.4g}, MACs {d['macs'] / 1e9:.3f} G ({dense_macs / d['macs']:.2f}x), "
              f"deployed {d['deployed_macs'] / 1e9:.3f} G, ranks min/median/max {min(ranks)}/{int(statistics.median(ranks))}/{max(ranks)}, "
              f"dense layers {len(d['dense_layers'])}")
        if "tune" in d:
            t, p = d["tune"], d["tune"]["predicted"]
            print(f"{'':18s} tuned in {t['seconds']:.1f} s ({t['cache_hits']} cached, {t['cache_misses']} timed): {d['summary']}; "
                  f"sum of layer times tuned {p['tuned_ms']:.2f} ms, untuned {p['untuned_ms']:.2f} ms, dense {p['dense_ms']:.2f} ms")
            e = t["end_to_end"]
            if e:
                print(f"{'':18s} whole model: tuned {e['tuned_ms']:.2f} ms, untuned {e['untuned_ms']:.2f} ms, "
                      f"speedup {e['speedup']:.3f} over {e['repeats']} rounds → deployed {e['deployed']}")
    runners = {name: OrtRunner(proto.SerializeToString(), args.threads).run for name, (proto, *_) in models.items()}
    load_before = os.getloadavg()
    rows = []
    rng = np.random.default_rng(args.seed)
    for batch in batches:
        x = rng.standard_normal((batch, *INPUT)).astype(np.float32)
        repeats = max(15, args.repeats // max(1, batch // 2))
        # a model tuned at batch B is deployed (and timed) at batch B only
        active = {name: run for name, run in runners.items() if "@" not in name or name.endswith(f"@{batch}")}
        times = time_rounds(active, x, args.warmup, repeats)
        dense_med = statistics.median(times["dense"])
        for name in active:
            if name == "dense":
                continue
            per_round = [d / t for d, t in zip(times["dense"], times[name])]
            wall = statistics.median(per_round)
            macs_speedup = dense_macs / models[name][1]
            deployed_speedup = dense_macs / models[name][2]
            rows.append({
                "model": name, "batch": batch, "repeats": repeats,
                "dense_ms": dense_med, "dense_p10_ms": quantile(times["dense"], 0.1), "dense_p90_ms": quantile(times["dense"], 0.9),
                "lowrank_ms": statistics.median(times[name]), "lowrank_p10_ms": quantile(times[name], 0.1),
                "lowrank_p90_ms": quantile(times[name], 0.9),
                "wall_speedup": wall, "wall_p10": quantile(per_round, 0.1), "wall_p90": quantile(per_round, 0.9),
                # the least disturbed call of each: a load-robust second estimate on a shared machine
                "wall_speedup_min": min(times["dense"]) / min(times[name]),
                "macs_speedup": macs_speedup, "deployed_macs_speedup": deployed_speedup, "ratio": wall / macs_speedup,
                "ratio_min": min(times["dense"]) / min(times[name]) / macs_speedup,
            })
            base = details.get(name, {}).get("untuned")
            untuned = f"{name.split('/')[0]}/{base}" if base else None
            if untuned in times:
                vs = [u / t for u, t in zip(times[untuned], times[name])]
                rows[-1] |= {"vs_untuned": statistics.median(vs), "vs_untuned_p10": quantile(vs, 0.1),
                             "vs_untuned_p90": quantile(vs, 0.9), "vs_untuned_min": min(times[untuned]) / min(times[name])}
    load_after = os.getloadavg()

    machine = {
        "platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
        "threads": args.threads, "ort_spinning": OrtRunner.spinning, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "loadavg_before": load_before, "loadavg_after": load_after,
    }
    print(f"\nonnxruntime {onnxruntime.__version__} CPU, {args.threads} threads (spinning {OrtRunner.spinning}), "
          f"{machine['processor']}, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.1f} → {load_after[0]:.1f}; warm-up {args.warmup}, interleaved rounds")
    header = (f"{'model':<18}{'batch':>6}{'rounds':>7}{'dense ms':>18}{'low-rank ms':>18}{'wall x (p10–p90)':>22}"
              f"{'min x':>7}{'MACs x':>8}{'deployed':>9}{'ratio':>7}{'(min)':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18}{r['batch']:>6}{r['repeats']:>7}"
              f"{r['dense_ms']:>9.2f} ({r['dense_p90_ms']:>6.2f})"
              f"{r['lowrank_ms']:>9.2f} ({r['lowrank_p90_ms']:>6.2f})"
              f"{r['wall_speedup']:>8.2f} ({r['wall_p10']:.2f}–{r['wall_p90']:.2f})"
              f"{r['wall_speedup_min']:>7.2f}"
              f"{r['macs_speedup']:>8.2f}{r['deployed_macs_speedup']:>9.2f}{r['ratio']:>7.2f}{r['ratio_min']:>7.2f}")
    print("dense/low-rank ms: median (p90); wall x: median over rounds of dense time / low-rank time;\n"
          "min x: fastest dense call / fastest low-rank call;\n"
          "MACs x: dense MACs / MACs at the trained ranks; deployed: counting the zero-padded ranks;\n"
          "ratio = wall x / MACs x; (min) = min x / MACs x")
    tuned_rows = [r for r in rows if "vs_untuned" in r]
    if tuned_rows:
        print("\ntuned vs untuned (tuned: aligned8, the default export; tuned16: pruned16): "
              "median over rounds of untuned time / tuned time (p10–p90), min-based")
        for r in tuned_rows:
            print(f"{r['model']:<18}{r['batch']:>6}{r['vs_untuned']:>8.2f} ({r['vs_untuned_p10']:.2f}–{r['vs_untuned_p90']:.2f})"
                  f"{r['vs_untuned_min']:>7.2f}")
        print("tuned MACs x is that of the model it tunes (the same trained ranks); tuning may deploy more MACs\n"
              "(\"deployed\") where they run faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "details": details, "dense_macs": dense_macs, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
