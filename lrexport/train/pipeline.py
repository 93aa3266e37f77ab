"""The whole method as phases: dense → decompose → full-rank → SVD training → prune → finetune.

Each phase writes its checkpoint into the run directory; the summary records what each
phase achieved. The library reports progress through a callback and never draws a UI.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__
from ..data import build_datasets
from ..errors import DataError
from ..lowrank import count_macs, decompose, layer_ranks, prune, svd_layers
from ..models import create_model
from ..recipe import PhaseConfig, Recipe
from .checkpoint import atomic_write_text, model_arch, save_checkpoint
from .loop import Loss, Precision, build_optimizer, build_scheduler, evaluate, make_loader, resolve_device, train_one_epoch

Progress = Callable[[str, dict], None]


def _quiet(kind: str, data: dict) -> None:
    pass


@dataclass
class RunResult:
    run_dir: Path
    summary: dict = field(default_factory=dict)


def new_run_dir(recipe: Recipe, output: str | Path | None = None) -> Path:
    """``output`` as given, else ``<output_dir>/<name>-<timestamp>`` (never reusing one)."""
    if output is not None:
        return Path(output)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(recipe.output_dir) / f"{recipe.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Each SVD layer's singular values, largest first."""
    return {name: sorted(layer.s.detach().abs().float().cpu().tolist(), reverse=True) for name, layer in svd_layers(model)}


class Pipeline:
    """Runs one recipe into one run directory. ``run()`` executes the phases in order."""

    def __init__(self, recipe: Recipe, run_dir: Path, progress: Progress = _quiet):
        self.recipe, self.run_dir, self.progress = recipe, Path(run_dir), progress
        self.device = resolve_device(recipe.device)
        self.precision = Precision.from_recipe(recipe, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.summary: dict = {}
        self.model: nn.Module | None = None

    # -- setup -------------------------------------------------------------------------
    def _setup(self) -> None:
        r = self.recipe
        torch.manual_seed(r.seed)
        train_ds, val_ds, self.info = build_datasets(r.data)
        num_classes = r.model.num_classes or self.info.num_classes
        if num_classes != self.info.num_classes:
            raise DataError(f"model.num_classes = {num_classes} but the {r.data.dataset} data has {self.info.num_classes} classes")
        self.num_classes = num_classes
        pin = self.device.type == "cuda"
        eval_bs = r.data.eval_batch_size or r.data.batch_size
        self.train_loader = make_loader(train_ds, r.data.batch_size, shuffle=True, seed=r.seed, workers=r.data.workers, pin=pin)
        self.val_loader = make_loader(val_ds, eval_bs, shuffle=False, seed=r.seed, workers=r.data.workers, pin=pin)
        self.model = create_model(r.model.name, num_classes=num_classes, weights=r.model.weights or None, **r.model.kwargs)
        self.model.to(self.device, memory_format=torch.channels_last if r.channels_last else torch.preserve_format)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "recipe.toml", r.to_toml())
        self.summary = {
            "name": r.name, "run_dir": str(self.run_dir), "recipe_hash": r.hash(), "lrexport_version": __version__,
            "torch_version": torch.__version__, "device": str(self.device), "started": datetime.now().isoformat(timespec="seconds"),
            "model": {"name": r.model.name, "num_classes": num_classes, "kwargs": r.model.kwargs, "weights": r.model.weights},
            "data_config": dataclasses.asdict(r.data), "data_info": self.info.to_dict(),
            "decomposition": dataclasses.asdict(r.decompose), "reg": dataclasses.asdict(r.reg),
            "prune": dataclasses.asdict(r.prune), "phases": {},
        }

    def _arch(self) -> dict:
        r = self.recipe
        return model_arch(self.model, r.model.name, self.num_classes, self.info.input_size, r.model.kwargs)

    def _save(self, name: str, **state) -> Path:
        path = self.ckpt_dir / f"{name}.pt"
        save_checkpoint(path, self.model, self._arch(), **state)
        return path

    def _evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.val_loader, self.precision)

    def _macs(self) -> dict:
        return count_macs(self.model, tuple(self.info.input_size)).to_dict()

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- phases --------------------------------------------------------------------------
    def _train_phase(self, phase: str, cfg: PhaseConfig, loss: Loss, track_best: bool = False) -> dict:
        """Train ``cfg.epochs`` epochs; the checkpoint ``<phase>.pt`` holds the final model."""
        optimizer = build_optimizer(self.model.parameters(), cfg)
        scheduler = build_scheduler(optimizer, cfg)
        scaler = self.precision.scaler()
        best, best5, best_epoch, metrics = -1.0, -1.0, 0, {}
        self.progress("phase_start", {"phase": phase, "epochs": cfg.epochs, "steps": len(self.train_loader)})
        started = time.perf_counter()
        for epoch in range(cfg.epochs):
            self.train_loader.sampler.set_epoch(epoch)
            on_step = lambda step, steps, terms: self.progress("step", {"phase": phase, "epoch": epoch + 1, "step": step, "steps": steps, **terms})
            stats = train_one_epoch(self.model, self.train_loader, optimizer, loss, self.precision, scaler, on_step)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            last = epoch + 1 == cfg.epochs
            metrics = self._evaluate() if (last or (epoch + 1) % self.recipe.eval.every == 0) else {}
            record = {"phase": phase, "epoch": epoch + 1, "lr": lr, **stats, **metrics}
            self._log(record)
            if track_best and metrics:
                best5 = max(best5, metrics["top5"])  # the paper's ImageNet tables report top-5
            if track_best and metrics and metrics["top1"] > best:
                best, best_epoch = metrics["top1"], epoch + 1
                self._save(f"{phase}_best", phase=phase, epoch=epoch + 1, metrics=metrics)
            self.progress("epoch_end", record)
        result = {"epochs": cfg.epochs, **metrics, "seconds": round(time.perf_counter() - started, 2)}
        if track_best:
            result.update(best_top1=best, best_top5=best5, best_epoch=best_epoch)
        self._save(phase, phase=phase, epoch=cfg.epochs, metrics=metrics)
        self.progress("phase_end", {"phase": phase, **result})
        return result

    def _record(self, phase: str, result: dict) -> None:
        self.summary["phases"][phase] = result
        self._write_summary()

    def _write_summary(self) -> None:
        atomic_write_text(self.run_dir / "summary.json", json.dumps(self.summary, indent=2))

    def run(self) -> RunResult:
        r = self.recipe
        self._setup()
        no_reg = Loss()
        if r.phases.dense.epochs:
            self._record("dense", self._train_phase("dense", r.phases.dense, no_reg))
        else:
            self._record("dense", {"epochs": 0, **self._evaluate()})
        # the dense model the decomposition starts from: export's baseline
        self._save("dense", phase="dense")

        decompose(self.model, r.decompose.mode, r.decompose.include, r.decompose.exclude, r.decompose.linear)
        if r.decompose.init == "scratch":
            for _, layer in svd_layers(self.model):
                layer.reset_parameters()
        self.model.to(self.device)
        self._record("decompose", {"mode": r.decompose.mode, "layers": len(svd_layers(self.model)), **self._evaluate()})

        ortho_only = Loss(ortho=r.reg.ortho)
        if r.phases.fullrank.epochs:
            self._record("fullrank", self._train_phase("fullrank", r.phases.fullrank, ortho_only))
        base = self.summary["phases"].get("fullrank") or self.summary["phases"]["decompose"]

        before = spectra(self.model)
        self._record("svd", self._train_phase("svd", r.phases.svd, Loss(r.reg.ortho, r.reg.type, r.reg.decay)))
        atomic_write_text(self.run_dir / "spectra.json", json.dumps({"before": before, "after": spectra(self.model)}))

        full = {name: layer.full_rank for name, layer in svd_layers(self.model)}
        pruned = prune(self.model, r.prune.energy, r.prune.multiple_of)
        self._save("pruned", phase="prune")
        macs = self._macs()
        self._record("prune", {"energy": r.prune.energy, "multiple_of": r.prune.multiple_of, **self._evaluate(),
                               "macs": macs["macs"], "speedup": macs["speedup"]})

        ft = self._train_phase("finetune", r.phases.finetune, ortho_only, track_best=True)
        if r.phases.finetune.epochs == 0:  # nothing trained: the pruned model is the result
            self._save("finetune_best", phase="finetune", metrics=self._evaluate())
            pruned_acc = self.summary["phases"]["prune"]
            ft.update(best_top1=pruned_acc["top1"], best_top5=pruned_acc["top5"], best_epoch=0)
        self._record("finetune", ft)

        ranks = layer_ranks(self.model)
        self.summary.update(
            ranks={name: {"full": full[name], "pruned": res.after, "final": ranks[name]} for name, res in zip(full, pruned)},
            macs=macs,
            base_top1=base["top1"],
            best_finetune_top1=ft["best_top1"],
            best_finetune_top5=ft["best_top5"],
            accuracy_gain=ft["best_top1"] - base["top1"],
            macs_speedup=macs["speedup"],
            finished=datetime.now().isoformat(timespec="seconds"),
        )
        self._write_summary()
        self.progress("done", self.summary)
        return RunResult(self.run_dir, self.summary)


def run_recipe(recipe: Recipe, output: str | Path | None = None, progress: Progress = _quiet) -> RunResult:
    """Run every phase of ``recipe``; returns the run directory and its summary."""
    return Pipeline(recipe, new_run_dir(recipe, output), progress).run()
