"""The methods' phases, in order: the one registry the pipeline runs and the sweep plans from.

dense → channels → recover → decompose → fullrank → svd → prune → finetune. Each phase is a
function ``(pipeline, resume) -> result`` registered with its name, the recipe key prefixes it
is the first phase to depend on (a key's later phases follow from it: the sweep shares every
phase before the first one a grid key affects) and the recipe methods that run it ("lowrank"
passes over channels and recover, "channels" over the four low-rank phases, without a trace).
``resume`` is the last.pt state when a run stopped inside this phase, else None. The pipeline
records each result, with the model's MACs after the phase, under ``summary.json["phases"][name]``.

Importing this module imports no torch (the sweep plans, and ``lrexport report`` reads
sweeps, without it); the phase bodies import what they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .. import rundir
from ..progress import Progress
from ..recipe import METHODS, PhaseConfig, Recipe

if TYPE_CHECKING:
    from torch import nn


class Pipeline(Protocol):
    """What a phase reads and calls of the run it is part of (lrexport.train.pipeline.Pipeline is the one)."""

    recipe: Recipe
    run_dir: Path
    model: nn.Module | None
    summary: dict
    info: Any  # the data's DataInfo (input_size, num_classes)
    dist: Any  # lrexport.train.distributed.Dist
    precision: Any  # lrexport.train.loop.Precision
    val_loader: Any
    progress: Progress
    channel_structure: dict | None

    def place(self, model: nn.Module) -> nn.Module: ...

    def save(self, name: str, **state) -> None: ...

    def validate(self) -> dict[str, float]: ...

    def macs(self) -> dict: ...

    def loss_gradients(self, batches: int): ...

    def train_phase(self, phase: str, cfg: PhaseConfig, loss, resume: dict | None = None, track_best: bool = False) -> dict: ...


@dataclass(frozen=True)
class Phase:
    name: str
    keys: tuple[str, ...]  # recipe keys (dotted prefixes) this phase is the first to depend on
    run: Callable[[Pipeline, "dict | None"], dict]
    methods: tuple[str, ...] = METHODS  # the recipe methods that run this phase


REGISTRY: list[Phase] = []


WITH_CHANNELS = tuple(m for m in METHODS if "channels" in m)
WITH_LOWRANK = tuple(m for m in METHODS if "lowrank" in m)


def phase(name: str, keys: tuple[str, ...], methods: tuple[str, ...] = METHODS):
    """Register the decorated function as the next phase of the methods."""

    def register(fn):
        REGISTRY.append(Phase(name, tuple(keys), fn, tuple(methods)))
        return fn

    return register


@phase("dense", keys=("model", "data", "seed", "phases.dense"))
def dense(p: Pipeline, resume: dict | None) -> dict:
    if p.recipe.phases.dense.epochs:
        result = p.train_phase("dense", p.recipe.phases.dense, _loss(), resume)
    else:
        result = {"epochs": 0, **p.validate()}
    p.save(rundir.DENSE, phase="dense")  # the dense model the decomposition starts from: export's baseline
    return result


@phase("channels", keys=("method", "channels"), methods=WITH_CHANNELS)
def channels(p: Pipeline, resume: dict | None) -> dict:
    result = prune_channels(p, p.model)
    p.channel_structure = result.structure
    p.place(p.model)
    p.summary["channels"] = result.to_dict()
    p.save("channels", phase="channels")
    return {"ratio": result.ratio, "speedup": result.speedup, **p.validate()}


@phase("recover", keys=("phases.recover",), methods=WITH_CHANNELS)
def recover(p: Pipeline, resume: dict | None) -> dict:
    cfg = p.recipe.phases.recover
    if not cfg.epochs:
        return {"epochs": 0}
    return p.train_phase("recover", cfg, _loss(), resume)


@phase("decompose", keys=("decompose",), methods=WITH_LOWRANK)
def decompose(p: Pipeline, resume: dict | None) -> dict:
    from ..lowrank import decompose as decompose_model, layer_status, svd_layers

    d, size = p.recipe.decompose, tuple(p.info.input_size)
    # every conv and linear layer: decomposed, or left dense and why
    p.summary["layers"] = {s.name: s.to_dict() for s in layer_status(p.model, d.mode, d.include, d.exclude, d.linear, size)}
    decompose_model(p.model, d.mode, d.include, d.exclude, d.linear, input_size=size)
    if d.init == "scratch":
        for _, layer in svd_layers(p.model):
            layer.reset_parameters()
    p.place(p.model)
    return {"mode": d.mode, "layers": len(svd_layers(p.model)), **p.validate()}


@phase("fullrank", keys=("reg.ortho", "phases.fullrank"), methods=WITH_LOWRANK)
def fullrank(p: Pipeline, resume: dict | None) -> dict:
    cfg = p.recipe.phases.fullrank
    if not cfg.epochs:
        return {"epochs": 0}
    return p.train_phase("fullrank", cfg, _loss(ortho=p.recipe.reg.ortho), resume)


@phase("svd", keys=("reg.type", "reg.decay", "phases.svd"), methods=WITH_LOWRANK)
def svd(p: Pipeline, resume: dict | None) -> dict:
    r = p.recipe
    if not resume and p.dist.is_main:
        rundir.write_spectra(p.run_dir, {"before": spectra(p.model)})
    result = p.train_phase("svd", r.phases.svd, _loss(r.reg.ortho, r.reg.type, r.reg.decay), resume)
    if p.dist.is_main:
        before = rundir.read_spectra(p.run_dir)["before"]
        rundir.write_spectra(p.run_dir, {"before": before, "after": spectra(p.model)})
    return result


@phase("prune", keys=("prune",), methods=WITH_LOWRANK)
def prune(p: Pipeline, resume: dict | None) -> dict:
    from ..lowrank import prune as prune_model

    cfg = p.recipe.prune
    energy = _search_energy(p) if cfg.energy == "auto" else cfg.energy
    pruned = prune_model(p.model, energy, cfg.multiple_of) if cfg.latency == "none" else _latency_prune(p, energy)
    p.save("pruned", phase="prune")
    macs = p.macs()
    p.summary["ranks"] = {res.name: {"full": res.full_rank, "pruned": res.after} for res in pruned}
    p.summary["macs"] = macs
    return {"energy": energy, "multiple_of": cfg.multiple_of, **p.validate(), "macs": macs["macs"], "speedup": macs["speedup"]}


@phase("finetune", keys=("phases.finetune",))
def finetune(p: Pipeline, resume: dict | None) -> dict:
    r = p.recipe
    ortho = r.reg.ortho if r.method in WITH_LOWRANK else 0.0  # no SVD layers: nothing to keep orthogonal
    ft = p.train_phase("finetune", r.phases.finetune, _loss(ortho=ortho), resume, track_best=True)
    if r.phases.finetune.epochs == 0:  # nothing trained: the pruned model is the result
        pruned = p.summary["phases"][_last_compressing(p)]
        p.save(rundir.LOWRANK, phase="finetune", metrics={"top1": pruned["top1"], "top5": pruned["top5"]})
        ft.update(best_top1=pruned["top1"], best_top5=pruned["top5"], best_epoch=0)
    return ft


PHASES: tuple[str, ...] = tuple(ph.name for ph in REGISTRY)
PHASE_KEYS: dict[str, tuple[str, ...]] = {ph.name: ph.keys for ph in REGISTRY}
PHASE_METHODS: dict[str, tuple[str, ...]] = {ph.name: ph.methods for ph in REGISTRY}


# -- what the phases share -----------------------------------------------------------------
def prune_channels(p: Pipeline, model, trial: bool = False):
    """``model`` pruned in place as the recipe's [channels] says; ``trial``: one round by filter norm, no gradients
    (the check, on a copy, that the target is in reach and the model can be pruned, before any training)."""
    from ..channels import prune_channels as prune

    c = p.recipe.channels
    return prune(model, tuple(p.info.input_size), speedup=c.speedup, ratio=c.ratio, importance_name="l2" if trial else c.importance,
                 round_to=c.round_to, steps=1 if trial else c.steps, exclude=c.exclude,
                 gradients=None if trial else p.loss_gradients(c.taylor_batches))


def _last_compressing(p: Pipeline) -> str:
    """The phase whose model finetuning starts from, with its accuracy: prune, else recover or channels."""
    done = p.summary["phases"]
    return next(ph for ph in ("prune", "recover", "channels") if "top1" in done.get(ph, {}))


def _loss(*args, **kwargs):
    from .loop import Loss

    return Loss(*args, **kwargs)


def spectra(model) -> dict[str, list[float]]:
    """Each SVD layer's singular values, largest first."""
    from ..lowrank import svd_layers

    return {name: sorted(layer.s.detach().abs().float().cpu().tolist(), reverse=True) for name, layer in svd_layers(model)}


def _search_energy(p: Pipeline) -> float:
    """prune.energy = "auto": the largest threshold of the ladder within the tolerance (summary's energy_search)."""
    from ..lowrank.energy_search import search_energy
    from .loop import evaluate

    cfg = p.recipe.prune
    choice = search_energy(
        p.model, lambda m: evaluate(m, p.val_loader, p.precision, reduce=p.dist.all_sum)["top1"],
        cfg.ladder, cfg.tolerance, cfg.multiple_of, input_size=tuple(p.info.input_size),
        base_top1=p.summary["phases"]["svd"].get("top1"),
        progress=p.progress,
    )
    p.summary["energy_search"] = choice.to_dict()
    return choice.energy


def _latency_prune(p: Pipeline, energy: float):
    """Ranks from the target runtime's measured latency within the energy rule's budget.

    Rank 0 times and allocates; under torchrun the other processes take its ranks.
    """
    from ..deploy.planning.latency_ranks import cap_of, latency_config, latency_prune
    from ..lowrank import prune as prune_model

    cfg, ranks, results = p.recipe.prune, None, None
    if p.dist.is_main:
        p.model.cpu()  # the forward pass that sizes each layer's input runs on the CPU; the runtimes time on their own
        result = latency_prune(p.model, tuple(p.info.input_size), energy, cap_of(cfg.max_layer_energy, energy),
                               latency_config(cfg), cfg.multiple_of, p.progress)
        p.place(p.model)
        p.summary["latency_ranks"] = result.record
        results, ranks = result.results, {res.name: res.after for res in result.results}
    ranks = p.dist.broadcast(ranks)
    return results if results is not None else prune_model(p.model, energy, ranks=ranks)
