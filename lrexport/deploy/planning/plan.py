"""The export's first stage: which rank each layer is deployed at, measured on the target runtime.

1. Tune: every decomposed conv is timed on the runtime at the deployment's batches, dense
   and as thin pairs at the candidate ranks (lrexport.deploy.planning.tune); where the recipe allows,
   ranks below the energy rule's are kept only where validation accuracy confirms them
   (lrexport.deploy.planning.below). A run whose prune step allocated its ranks by latency on this
   runtime (``prune.latency``, lrexport.deploy.planning.latency_ranks) is deployed at exactly those
   ranks: nothing is tuned, the guard only confirms them ("allocated").
2. Guard: one-layer times miss what happens between layers, so the whole models are timed
   too, interleaved, at each batch: the tuned plan, the untuned (MACs-only) plan and every
   layer dense. The plan with the best worst-batch speedup over all-dense is deployed, if
   that speedup is at least 1; otherwise every layer goes out dense, so the artifact is
   never slower than the dense model on the runtime it was exported for. Where channels
   were pruned, every layer dense is still the narrower network: the model before pruning
   is timed too ("original"), it is what the others must beat, and it is deployed where
   none does.

The plan is data (``Plan.to_dict`` is plan.json): verify and a user read it without the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...lowrank import truncated
from ...progress import Progress, quiet
from ...lowrank.rewrite import plan_layers, to_plain
from ..onnx_graph import to_onnx
from ..backends import RuntimeOptions, entry, get_runtime, open_runner
from ..timing import CUDA_EVENTS, interleave_within
from .tune import CACHE_FILE, DENSE, make_target, tune_model

PLAN_FILE = "plan.json"
ORIGINAL = "original"  # the guard's name for the model before channel pruning (export's dense baseline)
DEFAULT_BATCHES = (1, 8)  # what verify times by default


@dataclass(frozen=True)
class TuneConfig:
    """How the plan is measured. ``enabled=False``: the MACs-only plan, nothing timed."""

    enabled: bool = True
    batches: tuple[int, ...] | None = None  # None: the export's fixed batch, else DEFAULT_BATCHES
    cache: Path | None = None  # None: this machine's cache (default_cache)
    margin: float = 0.02
    guard: bool = True
    below: bool | None = None  # None: the run's prune.tune_below
    below_images: int = 2000
    guard_budget_ms: float = 6000.0

    def deployment_batches(self, batch: int | None) -> tuple[int, ...]:
        """The batches the deployment is planned and built for (a backend's own files too): the fixed export batch, else these."""
        return (batch,) if batch else tuple(self.batches or DEFAULT_BATCHES)


@dataclass
class Plan:
    """What export deploys: per-layer ranks ("dense" or a rank) and why."""

    runtime: str
    deployed: str  # "tuned", "untuned" (MACs rule), or "dense" (every layer dense: nothing faster)
    layers: dict[str, str | int] | None  # for to_plain; None: the MACs rule
    truncated: dict[str, int] = field(default_factory=dict)  # layers deployed below their energy rank
    target: dict | None = None  # the runtime's settings the plan was measured at
    tune: dict | None = None  # per-layer times and choices (TuneResult.to_dict)
    guard: list[dict] = field(default_factory=list)  # per batch: whole-model times of each plan
    note: str = ""
    quantization: dict | None = None  # int8: per-layer errors on calibration images and the layers left in float

    def model(self, trained: torch.nn.Module, original: torch.nn.Module | None = None) -> torch.nn.Module:
        """The model this plan deploys: the trained one, truncated where it went below; ``original`` where the
        guard deployed the model before channel pruning."""
        if self.deployed == ORIGINAL:
            return original
        return truncated(trained, self.truncated) if self.truncated else trained

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "deployed": self.deployed, "layers": self.layers, "truncated": self.truncated,
                "target": self.target, "note": self.note, "guard": self.guard, "tune": self.tune,
                "quantization": self.quantization}


def default_cache() -> Path:
    """The machine's timing cache: layer times outlive one export, keyed by runtime, version, device and settings."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lrexport" / CACHE_FILE


def plan_export(trained, input_size, runtime: str, options: RuntimeOptions, config: TuneConfig, batch: int | None,
                multiple_of: int, below_check=None, progress: Progress = quiet, allocated: dict | None = None,
                original: torch.nn.Module | None = None) -> Plan:
    """The deployment plan of ``trained`` on ``runtime`` (see the module docstring).

    ``below_check(proposed) -> (kept, check dict)`` confirms ranks below the energy rule's
    on validation images; without it they are not candidates. ``allocated`` (name → DENSE
    or rank): the ranks the run's prune step allocated by latency on this runtime; they are
    deployed as they are, and nothing is tuned: the guard only confirms them. ``original``: the
    model before channel pruning, where the trained model is narrower; the guard times it too and
    deploys it (``deployed = "original"``) where no plan of the trained model beats it.
    """
    if not config.enabled:
        return Plan(runtime, "untuned", None, note="not tuned (--no-tune): ranks by the MACs rule")
    if not entry(runtime).tunable(options.device):
        return Plan(runtime, "untuned", None, note=f"per-layer tuning on {runtime} is not implemented: ranks by the MACs rule")
    target = make_target(runtime, options, config.deployment_batches(batch))
    if allocated is not None:
        plan = Plan(runtime, "allocated", dict(allocated), target=target.to_dict(),
                    note=f"ranks allocated by measured latency on {runtime} before finetuning (summary.json latency_ranks)")
        if config.guard:
            guard(plan, trained, input_size, target.options, batch, multiple_of, config.guard_budget_ms, original)
        return plan
    tuned = tune_model(trained, input_size, target, config.cache or default_cache(), multiple_of, config.margin,
                       progress, below=below_check is not None)
    kept = {}
    if tuned.below_ranks():
        kept, tuned.below_check = below_check(tuned.below_ranks())
        tuned.revert(set(tuned.below_ranks()) - set(kept))
    plan = Plan(runtime, "tuned", tuned.plan, kept, target.to_dict(), tuned.to_dict())
    if config.guard:
        guard(plan, trained, input_size, target.options, batch, multiple_of, config.guard_budget_ms, original)
    return plan


def _variants(plan: Plan, trained, input_size, multiple_of: int) -> dict[str, tuple[torch.nn.Module, dict | None]]:
    """The distinct whole models the guard times: name → (low-rank model, per-layer plan); "dense" always."""
    def deployed(model, layers) -> dict:
        return {p.name: DENSE if p.dense else p.deployed_rank for p in plan_layers(model, input_size, multiple_of, layers)}

    all_dense = {name: DENSE for name in deployed(trained, None)}
    variants = {"dense": (trained, all_dense)}
    seen = [all_dense]
    order = [("untuned", trained, None), (plan.deployed, plan.model(trained), plan.layers)]
    if plan.deployed == "allocated":  # the run's own ranks: where the MACs rule deploys the same model, it goes by their name
        order.reverse()
    for name, model, layers in order:
        effective = deployed(model, layers)
        if plan.truncated and name == plan.deployed or effective not in seen:  # the same model twice is timed once
            variants[name] = (model, layers)
            seen.append(effective)
    return variants


def guard(plan: Plan, trained, input_size, options: RuntimeOptions, batch: int | None, multiple_of: int,
          budget_ms: float, original: torch.nn.Module | None = None) -> None:
    """Time the whole variants on the plan's runtime and deploy the fastest that beats the baseline (in place):
    all-dense, or ``original`` (the model before channel pruning) where given."""
    planned = plan.deployed  # "tuned", or "allocated" by the run's prune step
    variants = _variants(plan, trained, input_size, multiple_of)
    if original is not None:
        variants[ORIGINAL] = (original, None)
    baseline = ORIGINAL if original is not None else "dense"
    if len(variants) == 1:
        plan.deployed, plan.layers = "dense", variants["dense"][1]
        why = ("the latency allocation allocated every layer dense, as the MACs rule does" if planned == "allocated"
               else f"every decomposed layer measured fastest dense on {plan.runtime}")
        plan.note = f"{why}: every layer is deployed dense"
        return
    runners, backend = {}, get_runtime(plan.runtime)
    for name, (model, layers) in variants.items():
        plain, _ = to_plain(model, input_size, multiple_of, layers)
        source = backend.timing_source(options.precision, lambda p=plain: to_onnx(p, input_size, batch), lambda p=plain: p,
                                       (batch or 2, *input_size), f"the {name} plan")
        runners[name] = open_runner(plan.runtime, source, options)
    worst = {name: float("inf") for name in runners}
    gen = torch.Generator().manual_seed(2)
    for b in plan.target["batches"]:
        x = torch.randn(b, *input_size, generator=gen).numpy()
        calls = {name: r.bind(x) for name, r in runners.items()}
        cuda = next(iter(runners.values())).clock == CUDA_EVENTS
        timed = interleave_within(calls, budget_ms, min_repeats=21, max_repeats=80, warmup=5, cuda=cuda)
        row = {"batch": b, "rounds": len(timed.times_ms["dense"])}  # speedups over the baseline: "original" where timed
        for name in runners:
            row[name] = {"median_ms": timed.stats(name, b).median_ms, "speedup_over_dense": timed.ratio(baseline, name)}
            worst[name] = min(worst[name], row[name]["speedup_over_dense"])
        plan.guard.append(row)
    best = max((n for n in runners if n != baseline), key=lambda n: worst[n])
    if worst[best] >= 1.0:
        deployed = best
    elif original is not None:
        deployed = ORIGINAL
        plan.note = (f"no plan of the channel-pruned model ran faster than the model before pruning at every batch (best: {best}, "
                     f"{worst[best]:.2f}x at its worst batch): the model before pruning is deployed")
    else:
        deployed = "dense"
        plan.note = (f"no low-rank plan ran faster than every layer dense at every batch (best: {best}, "
                     f"{worst[best]:.2f}x at its worst batch): every layer is deployed dense")
    plan.deployed = deployed
    if deployed != planned:
        plan.layers = variants[deployed][1]
        plan.truncated = {}
