"""Wall-clock speedup of exported low-rank ResNet-18s over the dense one, on CPU runtimes
(onnxruntime, OpenVINO, PyTorch, ExecuTorch and LiteRT with XNNPACK).

torchvision ResNet-18 at 224×224, every conv decomposed channel-wise and spatial-wise (``--modes``).
Each layer gets a synthetic, exponentially decaying spectrum with its own decay rate,
so energy pruning leaves uneven ranks as it does after SVD training; the energy
threshold e is found by bisection so that the pruned model has ~``--target``× fewer MACs.
Variants per mode: the exact energy ranks exported as they are ("exact"), zero-padded
upward to multiples of 8 or 16 at export ("aligned8", "aligned16": same model, more MACs
deployed), and ranks rounded to the nearest multiple of 16 or 32 at pruning time, as the
recipe's prune step would do before finetuning ("pruned16", "pruned32": nothing to pad). With
``--precision int8``, every model is quantized (onnxruntime's static QDQ quantization,
int8 weights per channel, uint8 activations, for the ONNX runtimes; the runtime's own PT2E
quantizer for ExecuTorch and LiteRT; random calibration, as ranges do not change speed) and the
fp32 dense model is timed beside them in the same rounds. With
``--tune``, "tuned@B" per runtime, mode and batch B: the energy-rule model deployed as
``lrexport export --runtime R --batch B`` plans it on that runtime (per-layer times, then
the whole-model guard against the untuned and the all-dense plans); and, where "pruned16"
("pruned32") is among the variants, "tuned16@B" ("tuned32@B"): that model planned the same
way. "latency" (per runtime and mode): the ranks ``prune.latency = R`` allocates on that
runtime, at the same energy budget as the energy-rule model (the mean over layers of the
discarded energy fraction at the bisected e, no layer discarding more than 10·e), each
decomposed conv timed dense and as thin pairs on the rank grid at batches 1 and 8,
deployed exactly at those ranks (lrexport.deploy.planning.latency_ranks); the script also prints
the fewest MACs any allocation within that budget reaches (its MACs ceiling). "fewest"
(per mode): the ranks on the same grid with the fewest MACs within that budget, i.e. what
the allocation would choose if time followed MACs. "channel/quarter": every 3×3 conv a thin pair at
rank out/4, the stem, the 1×1 convs and the classifier dense (2.98× fewer MACs): the most regular
ranks, no energy rule. The dense model is exported the same
way (BN folded in all). Each runtime (``--runtime ort,openvino,torch``) times all models
in this one process, on its own settings, calls interleaved, each round in its own order
(lrexport.deploy.timing); per round we take dense time / low-rank time, and report the
median and p10–p90 of those ratios beside the medians of the latencies;
"vs rule" is that wall-clock speedup over the energy-rule model's MACs speedup.
"channels" (no mode): filter pruning instead of low rank, through Torch-Pruning as
``method = "channels"`` does (lrexport.channels: L2 filter norm, every prunable group by one
fraction, widths multiples of 8), to ``--target``× fewer MACs. "combined" (per mode): filter
pruning to √target first, then the narrower network decomposed, given synthetic spectra and
pruned to the rest of the target with ranks rounded to 16, as ``method = "channels+lowrank"``
does. Random weights, so the channels pruned are arbitrary; their count, which sets the speed,
is what a trained model with the same target would get.

    python benchmarks/deploy_efficiency.py [--runtime ort,openvino,executorch,litert] [--modes channel] [--precision int8] [--threads 2] [--repeats 60] [--variants exact,pruned16,latency,fewest] [--tune] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics

import numpy as np
import torch

import lrexport
from lrexport.channels import prune_channels
from lrexport.deploy.planning.latency_ranks import LatencyConfig, allocated_plan, cap_of, latency_prune, layer_tables, on_grid, prune_to
from lrexport.deploy.onnx_graph import check_graph, to_onnx
from lrexport.deploy.planning.plan import TuneConfig, default_cache, plan_export
from lrexport.deploy.backends import RUNTIMES, RuntimeOptions, get_runtime, open_runner
from lrexport.deploy.timing import CUDA_EVENTS, interleave, machine, quantile
from lrexport.deploy.planning.tune import tune_layers_of
from lrexport.lowrank import count_macs, decompose, energy_rank, prune, round_rank, svd_layers
from lrexport.lowrank.allocate import DENSE, allocate, energy_budget
from lrexport.lowrank.prune import rule_rank
from lrexport.lowrank.rewrite import plan_layers, relative_error, to_plain

INPUT = (3, 224, 224)
MODES = ("channel", "spatial")


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
VARIANTS = (("exact", 1, 1), ("aligned8", 1, 8), ("aligned16", 1, 16), ("pruned16", 16, 1), ("pruned32", 32, 1))
# tuned models: name -> (rank multiple at pruning, the untuned variant it starts from and is guarded against)
TUNED = {"tuned": (1, "aligned8"), "tuned16": (16, "pruned16"), "tuned32": (32, "pruned32")}


@torch.no_grad()
def build_models(seed: int, target: float, variants=VARIANTS, exclude=(), modes=MODES):
    """name -> (plain module, ONNX proto, MACs as trained, MACs as deployed); per-variant details; the pruned models
    ((mode, multiple) -> (model, energy, ranks); (mode, "full"): decomposed, not pruned)."""
    torch.manual_seed(seed)
    dense = lrexport.create_model("resnet18", num_classes=1000).eval()
    x = torch.randn(2, *INPUT)
    plain_dense, _ = to_plain(dense, INPUT, 1)
    assert relative_error(plain_dense(x), dense(x)) < 1e-4
    dense_macs = count_macs(dense, INPUT).deployed
    models = {"dense": (plain_dense, to_onnx(plain_dense, INPUT), dense_macs, dense_macs)}
    details, pruned = {}, {"dense": dense}
    for mode in modes:
        decomposed = decompose(copy.deepcopy(dense), mode, exclude=exclude)
        synthesize_spectra(decomposed, seed)
        pruned[mode, "full"] = (decomposed.eval(), None, None)  # what the latency variant allocates from
        for multiple in sorted({m for _, m, _ in variants} | {m for m, _ in TUNED.values()}):
            lowrank = copy.deepcopy(decomposed)
            energy, ranks = prune_to_target(lowrank, target, multiple)
            pruned[mode, multiple] = (lowrank.eval(), energy, ranks)
        for name, prune_multiple, align in variants:
            lowrank, energy, ranks = pruned[mode, prune_multiple]
            add_model(models, details, f"{mode}/{name}", lowrank, *to_plain(lowrank, INPUT, align), energy, ranks, x)
    return models, details, dense_macs, pruned


CHANNEL_STEP = 8  # filter widths stay multiples of this (at 16 the 3x target overshoots to 3.30x)


@torch.no_grad()
def add_channels(models, details, pruned, target: float, names, x) -> None:
    """"channels": filters pruned to ``target``× fewer MACs; "<mode>/combined": filters to √target, then low rank to the rest."""
    dense = pruned["dense"]
    dense_macs = count_macs(dense, INPUT).dense
    if "channels" in names:
        narrow = copy.deepcopy(dense)
        res = prune_channels(narrow, INPUT, speedup=target, round_to=CHANNEL_STEP)
        add_model(models, details, "channels", narrow, *to_plain(narrow, INPUT, 1), None, {}, x, channel_ratio=res.ratio)
    if "combined" in names:
        for mode in modes_of(pruned):
            narrow = copy.deepcopy(dense)
            res = prune_channels(narrow, INPUT, speedup=math.sqrt(target), round_to=CHANNEL_STEP)
            lowrank = decompose(narrow, mode)
            synthesize_spectra(lowrank, 0)
            energy, ranks = prune_to_target(lowrank, target * res.macs / dense_macs, 16)
            add_model(models, details, f"{mode}/combined", lowrank.eval(), *to_plain(lowrank, INPUT, 1), energy, ranks, x,
                      channel_ratio=res.ratio, channel_speedup=res.speedup)


def modes_of(pruned) -> list[str]:
    return list(dict.fromkeys(key[0] for key in pruned if key != "dense"))


def fewest_macs(model, energy: float, cap: float, grid: int = 1):
    """The per-layer ranks (on ``grid``; 1: every rank) with the fewest MACs within the latency
    variant's budget, and their MACs speedup: lrexport.lowrank.allocate with each option's MACs
    in place of its time. With ``grid`` 1 it is the MACs ceiling of any allocation.
    """
    modules = dict(model.named_modules())
    layers = tune_layers_of(model, INPUT)
    macs = {t.name: {DENSE: t.macs(DENSE)} | {r: t.macs(r) for r in range(1, min(t.break_even, t.full_rank + 1)) if on_grid(r, grid)}
            for t in layers}
    tables = layer_tables(model, layers, macs, {t.name: rule_rank(modules[t.name], energy) for t in layers})
    best = allocate(tables, energy_budget(tables), cap)
    dense = count_macs(model, INPUT).dense
    return best, dense / (dense - sum(t.macs(DENSE) for t in layers) + best.total_ms)


@torch.no_grad()
def add_fewest(models, details, pruned) -> None:
    """"mode/fewest": the fewest-MACs ranks on the latency variant's grid (8) within its budget."""
    x = torch.randn(2, *INPUT)
    for mode in modes_of(pruned):
        _, energy, _ = pruned[mode, 1]
        lowrank = copy.deepcopy(pruned[mode, "full"][0])
        alloc, _ = fewest_macs(lowrank, energy, cap_of("auto", energy), grid=8)
        prune_to(lowrank, alloc, energy)
        ranks = {name: layer.rank for name, layer in svd_layers(lowrank)}
        add_model(models, details, f"{mode}/fewest", lowrank.eval(), *to_plain(lowrank, INPUT, 8, alloc.ranks), energy, ranks, x)


@torch.no_grad()
def add_quarter(models, details, pruned) -> None:
    """"channel/quarter": every 3×3 conv a thin pair at rank out/4, the stem, the 1×1 convs and the
    classifier dense (2.98× fewer MACs): the most regular ranks, no energy rule."""
    if ("channel", "full") not in pruned:
        return
    lowrank = copy.deepcopy(pruned["channel", "full"][0])
    ranks = {name: layer.out_channels // 4 if getattr(layer, "kernel_size", None) == (3, 3) else layer.rank
             for name, layer in svd_layers(lowrank)}
    prune(lowrank, 0.0, ranks=ranks)
    add_model(models, details, "channel/quarter", lowrank.eval(), *to_plain(lowrank, INPUT, 1), None, ranks, torch.randn(2, *INPUT))


@torch.no_grad()
def add_latency(models, details, pruned, runtime: str, options: RuntimeOptions, batches, cache) -> None:
    """"R:mode/latency": ranks allocated by measured latency on ``runtime`` at the energy-rule model's budget."""
    x = torch.randn(2, *INPUT)
    for mode in modes_of(pruned):
        _, energy, _ = pruned[mode, 1]
        lowrank = copy.deepcopy(pruned[mode, "full"][0])
        config = LatencyConfig(runtime, tuple(batches), options, 8, cache or default_cache())
        result = latency_prune(lowrank, INPUT, energy, cap_of("auto", energy), config)
        plan = allocated_plan({"latency_ranks": result.record}, runtime)
        ranks = {name: layer.rank for name, layer in svd_layers(lowrank)}
        record = {k: v for k, v in result.record.items() if k != "layers"} | {"plan": plan}
        add_model(models, details, f"{runtime}:{mode}/latency", lowrank.eval(), *to_plain(lowrank, INPUT, 8, plan), energy, ranks, x,
                  allocation=record)


def add_model(models, details, name: str, lowrank, plain, report, energy, ranks, x, **extra) -> None:
    """Check ``plain`` against ``lowrank``, export it and record it."""
    err = relative_error(plain(x), lowrank(x))
    assert err < 1e-4, (name, err)
    proto = to_onnx(plain, INPUT)
    check_graph(proto)
    macs, deployed = count_macs(lowrank, INPUT).deployed, count_macs(plain, INPUT).deployed
    models[name] = (plain, proto, macs, deployed)
    details[name] = {"energy": energy, "ranks": ranks, "macs": macs, "deployed_macs": deployed,
                     "dense_layers": [p.name for p in report.layers if p.dense], **extra}


@torch.no_grad()
def add_tuned(models, details, pruned, variants, runtime: str, options: RuntimeOptions, batches, cache) -> None:
    """"R:mode/tuned@B" (and tuned16@B, tuned32@B): each model as ``lrexport export --runtime R --batch B`` plans it."""
    x = torch.randn(2, *INPUT)
    for mode in modes_of(pruned):
        for tuned_name, (multiple, untuned_name) in TUNED.items():
            if untuned_name not in {v[0] for v in variants}:
                continue
            lowrank, energy, ranks = pruned[mode, multiple]
            for batch in batches:
                plan = plan_export(lowrank, INPUT, runtime, options, TuneConfig(cache=cache), batch, 8)
                deployed = plan.model(lowrank)
                add_model(models, details, f"{runtime}:{mode}/{tuned_name}@{batch}", deployed,
                          *to_plain(deployed, INPUT, 8, plan.layers), energy, ranks, x, untuned=f"{mode}/{untuned_name}",
                          plan=plan.to_dict())


def open_models(runtime: str, options: RuntimeOptions, models) -> dict:
    """A runner per model of ``runtime``; in int8 every model quantized (QDQ for the ONNX runtimes, XNNPACK's
    quantizer for ExecuTorch), plus the fp32 dense one as "dense_fp32"."""
    own = {name: m for name, m in models.items() if ":" not in name or name.startswith(f"{runtime}:")}
    if options.precision == "int8":
        own["dense_fp32"] = models["dense"]
    runners = {}
    for name, (plain, proto, *_) in own.items():
        run_as = RuntimeOptions(threads=options.threads) if name == "dense_fp32" else options
        source = get_runtime(runtime).timing_source(run_as.precision, lambda p=proto: p, lambda p=plain: p, (2, *INPUT), name)
        runners[name] = open_runner(runtime, source, run_as)
    return runners


def time_runtime(runtime: str, options: RuntimeOptions, models, dense_macs: int, rule_macs: dict, batches, warmup: int,
                 repeats: int, seed: int):
    """Rows of speedups over dense (and in int8 over the fp32 dense model): every model on ``runtime``, interleaved, per batch."""
    runners = open_models(runtime, options, models)
    settings = runners["dense"].settings()
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, *INPUT)).astype(np.float32)
        rounds = max(15, repeats // max(1, batch // 2))
        # a model tuned at batch B is deployed (and timed) at batch B only
        active = {name: r.bind(x) for name, r in runners.items() if "@" not in name or name.endswith(f"@{batch}")}
        times = interleave(active, warmup, rounds, cuda=runners["dense"].clock == CUDA_EVENTS).times_ms
        for name in active:
            if name not in ("dense", "dense_fp32"):
                rule = dense_macs / rule_macs.get(name.split(":")[-1].split("/")[0], models[name][2])  # "channels": its own
                rows.append(speedup_row(runtime, name, batch, times, dense_macs / models[name][2], dense_macs / models[name][3], rule))
        if "dense_fp32" in times:
            rows.append(speedup_row(runtime, "dense", batch, times, 1.0, 1.0, 1.0))
    return settings, rows


def speedup_row(runtime: str, name: str, batch: int, times: dict, macs_speedup: float, deployed_speedup: float,
                rule_speedup: float) -> dict:
    base = "dense_fp32" if name == "dense" else "dense"  # in int8, the dense int8 model's row is over fp32
    per_round = [d / t for d, t in zip(times[base], times[name])]
    wall = statistics.median(per_round)
    return {
        "runtime": runtime, "model": name.split(":")[-1], "batch": batch, "repeats": len(per_round),
        "dense_ms": statistics.median(times[base]), "dense_p90_ms": quantile(times[base], 0.9),
        "lowrank_ms": statistics.median(times[name]), "lowrank_p90_ms": quantile(times[name], 0.9),
        "wall_speedup": wall, "wall_p10": quantile(per_round, 0.1), "wall_p90": quantile(per_round, 0.9),
        # the least disturbed call of each: a load-robust second estimate on a shared machine
        "wall_speedup_min": min(times[base]) / min(times[name]),
        "macs_speedup": macs_speedup, "deployed_macs_speedup": deployed_speedup, "ratio": wall / macs_speedup,
        # against the energy-rule model's MACs speedup: the latency variant's target is ≥ 1
        "rule_macs_speedup": rule_speedup, "vs_rule": wall / rule_speedup,
    } | ({"vs_fp32": statistics.median(f / t for f, t in zip(times["dense_fp32"], times[name]))} if "dense_fp32" in times else {})


def print_table(runtime: str, settings: dict, rows: list[dict]) -> None:
    int8 = any("vs_fp32" in r for r in rows)
    print(f"\n{runtime} {settings['version']}, {settings['threads']} threads, {settings['precision']}; interleaved rounds after warm-up"
          + (f"; every model int8 ({'QDQ' if RUNTIMES[runtime].reads_onnx else 'XNNPACK quantizer'}) but dense fp32: wall x over dense int8, "
             "vs fp32 over dense fp32" if int8 else ""))
    header = (f"{'model':<18}{'batch':>6}{'rounds':>7}{'dense ms':>18}{'low-rank ms':>18}{'wall x (p10–p90)':>22}"
              f"{'min x':>7}{'MACs x':>8}{'deployed':>9}{'ratio':>7}{'vs rule':>8}" + (f"{'vs fp32':>9}" if int8 else ""))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18}{r['batch']:>6}{r['repeats']:>7}"
              f"{r['dense_ms']:>9.2f} ({r['dense_p90_ms']:>6.2f})"
              f"{r['lowrank_ms']:>9.2f} ({r['lowrank_p90_ms']:>6.2f})"
              f"{r['wall_speedup']:>8.2f} ({r['wall_p10']:.2f}–{r['wall_p90']:.2f})"
              f"{r['wall_speedup_min']:>7.2f}{r['macs_speedup']:>8.2f}{r['deployed_macs_speedup']:>9.2f}{r['ratio']:>7.2f}"
              f"{r['vs_rule']:>8.2f}" + (f"{r['vs_fp32']:>9.2f}" if int8 else ""))


def allocation_line(a: dict) -> str:
    return (f"; allocated by latency: mean discarded {a['mean_discarded']:.4f} (budget {a['budget']:.4f}, cap {a['cap']:.3f}), "
            f"predicted {a['predicted_ms']:.3f} ms/image vs {a['energy_rule_ms']:.3f} for the energy rule's ranks "
            f"and {a['dense_ms']:.3f} all dense ({a['dense_ms'] / a['predicted_ms']:.2f}x for the decomposed convs), "
            f"{a['target']['timed']} timed / {a['target']['cached']} cached, {a['seconds']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="ort", help="comma-separated runtimes, e.g. ort,openvino,executorch,litert,torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                    help="int8: every model quantized (QDQ, per-channel), timed beside the fp32 dense model")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=60, help="timed rounds at batch 1 (fewer at larger batches)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--target", type=float, default=3.0, help="MACs speedup to prune to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help="subset of " + ", ".join(v[0] for v in VARIANTS) + ", latency (ranks allocated by latency on each runtime), "
                         "fewest (the fewest-MACs ranks within latency's budget), quarter (every 3x3 conv at rank out/4), "
                         "channels (filter pruning), "
                         "combined (filter pruning, then low rank)")
    ap.add_argument("--modes", default=",".join(MODES), help="decomposition modes, e.g. channel")
    ap.add_argument("--exclude", default="", help="comma-separated layer patterns kept dense, e.g. conv1 (the stem)")
    ap.add_argument("--tune", action="store_true", help="add tuned@B per runtime, mode and batch: export's measured plan at batch B")
    ap.add_argument("--tune-cache", default=None, help="layer timing cache (JSON) reused across runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runtimes = [r for r in args.runtime.split(",") if r]
    options = RuntimeOptions(threads=args.threads, precision=args.precision)
    if "torch" not in runtimes:
        torch.set_num_threads(1)  # torch only builds and checks the models: no OpenMP contention with the runtime
    exclude = tuple(p for p in args.exclude.split(",") if p)
    batches = [int(b) for b in args.batches.split(",")]
    names = set(args.variants.split(","))
    variants = [v for v in VARIANTS if v[0] in names]
    models, details, dense_macs, pruned = build_models(args.seed, args.target, variants, exclude, args.modes.split(","))
    rule_macs = {mode: count_macs(pruned[mode, 1][0], INPUT).deployed for mode in modes_of(pruned)}
    # what any allocation within the energy rule's budget can reach at best: the ceiling of "latency" and "fewest"
    ceilings = {mode: fewest_macs(pruned[mode, "full"][0], pruned[mode, 1][1], cap_of("auto", pruned[mode, 1][1]))[1]
                for mode in modes_of(pruned)} if names & {"latency", "fewest"} else {}
    if "fewest" in names:
        add_fewest(models, details, pruned)
    if "quarter" in names:
        add_quarter(models, details, pruned)
    if names & {"channels", "combined"}:
        add_channels(models, details, pruned, args.target, names, torch.randn(2, *INPUT))
    for runtime in runtimes:
        if "latency" in names:
            add_latency(models, details, pruned, runtime, options, batches, args.tune_cache)
        if args.tune:
            add_tuned(models, details, pruned, variants, runtime, options, batches, args.tune_cache)
    for name, d in details.items():
        ranks = list(d["ranks"].values())
        print(f"{name:26s} " + (f"e = {d['energy']:.4g}, " if d["energy"] is not None else "")
              + (f"channels pruned {d['channel_ratio']:.1%} per group, " if "channel_ratio" in d else "")
              + f"MACs {d['macs'] / 1e9:.3f} G ({dense_macs / d['macs']:.2f}x), deployed {d['deployed_macs'] / 1e9:.3f} G, "
              + (f"ranks min/median/max {min(ranks)}/{int(statistics.median(ranks))}/{max(ranks)}, " if ranks else "")
              + f"dense layers {len(d['dense_layers'])}" + (f", plan: {d['plan']['deployed']}" if "plan" in d else "")
              + (allocation_line(d["allocation"]) if "allocation" in d else ""))
    if ceilings:
        print("the fewest MACs any choice of ranks within the energy rule's budget reaches: "
              + ", ".join(f"{mode} {c:.2f}x" for mode, c in ceilings.items()))
    load_before = os.getloadavg()
    results = {runtime: time_runtime(runtime, options, models, dense_macs, rule_macs, batches, args.warmup, args.repeats, args.seed)
               for runtime in runtimes}
    load_after = os.getloadavg()
    print(f"\n{machine()['cpu']}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} → {load_after[0]:.1f}")
    for runtime, (settings, rows) in results.items():
        print_table(runtime, settings, rows)
    print("\ndense/low-rank ms: median (p90); wall x: median over rounds of dense time / low-rank time;\n"
          "min x: fastest dense call / fastest low-rank call;\n"
          "MACs x: dense MACs / MACs at the trained ranks; deployed: counting zero-padded ranks and layers deployed dense;\n"
          "ratio = wall x / MACs x; vs rule = wall x / the energy-rule model's MACs x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine() | {"loadavg_before": load_before, "loadavg_after": load_after},
                       "runtimes": {r: {"settings": st, "rows": rows} for r, (st, rows) in results.items()},
                       "details": details, "dense_macs": dense_macs, "fewest_macs_speedup": ceilings}, f, indent=2)


if __name__ == "__main__":
    main()
