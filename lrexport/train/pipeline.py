"""The whole method as phases: dense → decompose → full-rank → SVD training → prune → finetune.

Each phase writes its checkpoint into the run directory and ``checkpoints/last.pt`` holds
everything needed to continue (model, optimizer, scheduler, phase, epoch, step, ranks, RNG,
summary so far), so a run resumes inside any phase, and a sweep can branch a new run from
another's completed phases. The library reports progress through a callback and never
draws a UI. Under torchrun only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from .. import __version__, rundir
from ..progress import EpochEnd, PhaseEnd, PhaseStart, Progress, Step, Warn, quiet
from ..data import build_datasets, resolve_input
from ..errors import CheckpointError, DataError, LrexportError, ModelError, first_line
from ..lowrank import count_macs, layer_ranks
from ..models import create_model, load_state_dict_file, model_input
from ..recipe import PhaseConfig, Recipe
from .checkpoint import build_model, class_path, load_checkpoint, load_weights, model_arch, save_checkpoint
from .distributed import Dist, any_rank, init_distributed, shutdown, sync_batchnorm
from .phases import PHASES, REGISTRY, prune_channels
from .loop import (CudaGraphs, EpochState, Loss, NonFiniteLoss, Precision, build_optimizer, build_scheduler, evaluate,
                   load_optimizer_state, make_loader, resolve_device, train_one_epoch)
from .stability import Limits, Rollback, factor_layers

class Interrupted(LrexportError):
    """SIGINT/SIGTERM: the state was saved; ``--resume`` continues from it."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    summary: dict = field(default_factory=dict)


class _StopSignals:
    """While active, SIGINT/SIGTERM set a flag instead of killing: the loop saves, then stops."""

    def __init__(self):
        self.raised: int | None = None

    def __enter__(self):
        self._old = {}
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Pipeline:
    """Runs one recipe into one run directory, phase by phase."""

    def __init__(self, recipe: Recipe, run_dir: Path, progress: Progress = quiet, dist: Dist | None = None,
                 model: nn.Module | None = None):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.given = model  # a model passed in from Python: the run starts from a copy of it
        self.dist = dist or Dist()
        self.progress = progress if self.dist.is_main else quiet
        device = resolve_device(recipe.device)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.precision = Precision.from_recipe(recipe, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        compile_regs = recipe.reg.compile
        self.compile_regularizers = compile_regs is True or (compile_regs == "auto" and device.type == "cuda")
        self.cuda_graphs = CudaGraphs(recipe.train.cuda_graph, device, recipe.amp, self.dist.world)
        self.last_path = rundir.checkpoint_path(self.run_dir, rundir.LAST)
        self.summary: dict = {}
        self.completed: list[str] = []
        self.model: nn.Module | None = None
        self.channel_structure: dict | None = None  # what the channels phase narrowed (lrexport.channels.structure)
        self.stop = _StopSignals()

    # -- setup -------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return class_path(self.given) if self.given is not None else self.recipe.model.name

    def _setup_data(self) -> None:
        r, d = self.recipe, self.dist
        # input size and normalisation the recipe leaves open come from the model's own config (timm's)
        self.data_config = resolve_input(r.data, model_input(self.given if self.given is not None else r.model.name, r.model.kwargs))
        train_ds, val_ds, self.info = build_datasets(self.data_config)
        num_classes = r.model.num_classes or self.info.num_classes
        if num_classes != self.info.num_classes:
            raise DataError(f"model.num_classes = {num_classes} but the {r.data.dataset} data has {self.info.num_classes} classes")
        if r.data.batch_size % d.world:
            raise LrexportError(f"data.batch_size = {r.data.batch_size} (the global batch) is not divisible by {d.world} processes")
        self.num_classes = num_classes
        pin = self.device.type == "cuda"
        eval_bs = r.data.eval_batch_size or r.data.batch_size
        kw = dict(seed=r.seed, workers=r.data.workers, pin=pin, rank=d.rank, world=d.world)
        self.train_loader = make_loader(train_ds, r.data.batch_size // d.world, shuffle=True, **kw)
        self.val_loader = make_loader(val_ds, max(1, eval_bs // d.world), shuffle=False, **kw)

    def _new_summary(self) -> dict:
        r = self.recipe
        return {
            "name": r.name, "run_dir": str(self.run_dir), "recipe_hash": r.hash(), "lrexport_version": __version__,
            "torch_version": torch.__version__, "device": str(self.device), "processes": self.dist.world,
            "started": datetime.now().isoformat(timespec="seconds"),
            "model": {"name": self.model_name, "num_classes": self.num_classes, "kwargs": r.model.kwargs, "weights": r.model.weights,
                      "given": self.given is not None},
            "data_config": dataclasses.asdict(self.data_config), "data_info": self.info.to_dict(),
            "method": r.method, "channels_config": dataclasses.asdict(r.channels),
            "decomposition": dataclasses.asdict(r.decompose), "reg": dataclasses.asdict(r.reg),
            "prune": dataclasses.asdict(r.prune), "phases": {},
        }

    def place(self, model: nn.Module) -> nn.Module:
        fmt = torch.channels_last if self.recipe.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=fmt)

    def _trained(self) -> nn.Module:
        """The module to train: DDP-wrapped under torchrun (rewrapped after every rank change)."""
        if not self.dist.enabled:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = sync_batchnorm(self.model, self.dist, self.device)
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _arch(self) -> dict:
        return model_arch(self.model, self.model_name, self.num_classes, self.info.input_size, self.recipe.model.kwargs,
                          given=self.given is not None, channels=self.channel_structure)

    def _new_model(self) -> nn.Module:
        """The model the run starts from: the recipe's by name, or a copy of the one passed in (the caller's stays as it is)."""
        m = self.recipe.model
        if self.given is None:
            return create_model(m.name, num_classes=self.num_classes, weights=m.weights or None, **m.kwargs)
        model = copy.deepcopy(self.given)
        if m.weights:
            load_state_dict_file(model, m.weights)
        return model

    @torch.no_grad()
    def _check_model(self) -> None:
        """The model runs on the data's images and gives one output per class: else one line now, not a traceback later."""
        x = torch.zeros(2, *self.info.input_size, device=self.device)
        shape = "×".join(map(str, x.shape))
        self.model.eval()
        try:
            out = self.model(x)
        except Exception as e:
            raise ModelError(f"model {self.model_name} cannot run on the data's images ({shape}; data.image_size and data.channels "
                             f"set them): {first_line(e)}") from None
        finally:
            self.model.train()
        if not isinstance(out, torch.Tensor) or out.shape != (2, self.num_classes):
            got = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
            raise ModelError(f"model {self.model_name} gives {got} for {shape} images; training needs logits of shape "
                             f"(2, {self.num_classes}), one per class of the {self.recipe.data.dataset} data")

    # -- files (rank 0 only) -----------------------------------------------------------
    def save(self, name: str, **state) -> None:
        if self.dist.is_main:
            save_checkpoint(rundir.checkpoint_path(self.run_dir, name), self.model, self._arch(), **state)

    def _save_last(self, phase: str | None = None, epoch: int = 0, epoch_state: EpochState | None = None,
                   optimizer=None, scaler=None, best=None) -> None:
        """The resume point. The previous one is kept as last.prev.pt until the new one is whole."""
        if not self.dist.is_main:
            return
        prev = rundir.checkpoint_path(self.run_dir, rundir.LAST_PREV)
        state = {
            "completed": list(self.completed), "phase": phase, "epoch": epoch,
            "epoch_state": dataclasses.asdict(epoch_state) if epoch_state else None,
            "optimizer": optimizer.state_dict() if optimizer else None, "scaler": scaler.state_dict() if scaler else None,
            "best": best, "summary": json.dumps(self.summary), "recipe_hash": self.recipe.hash(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()[1]},
        }
        tmp = rundir.checkpoint_path(self.run_dir, rundir.LAST_NEXT)
        save_checkpoint(tmp, self.model, self._arch(), **state)
        if self.last_path.exists():
            self.last_path.replace(prev)
        tmp.replace(self.last_path)

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            rundir.append_metrics(self.run_dir, record)

    def _write_summary(self) -> None:
        if self.dist.is_main:
            rundir.write_summary(self.run_dir, self.summary)

    def _complete(self, phase: str, result: dict) -> None:
        """Record a finished phase's result, with the MACs of the model it leaves (as deployed: min(pair, dense) per layer)."""
        self.summary["phases"][phase] = {**result, "macs": result.get("macs", self.macs()["macs"])}
        self.completed.append(phase)
        self._write_summary()
        self._save_last()

    # -- evaluation --------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.val_loader, self.precision, reduce=self.dist.all_sum)

    def macs(self) -> dict:
        """The model's MACs as deployed; its dense MACs and speedups are those of the model before any channel was pruned."""
        macs = count_macs(self.model, tuple(self.info.input_size)).to_dict()
        original = self.summary.get("channels", {}).get("dense_macs")
        if original:
            macs.update(dense_macs=original, speedup=original / macs["macs"], paper_speedup=original / macs["paper_macs"])
        return macs

    def loss_gradients(self, batches: int):
        """A function that sums the cross-entropy gradients of ``batches`` training batches into the model's
        ``.grad`` (summed over processes): what channel importance by Taylor expansion scores."""
        def accumulate(model: nn.Module) -> None:
            model.eval()  # batch norm's running statistics must not move
            for i, (x, y) in enumerate(self.train_loader):
                if i == batches:
                    break
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                nn.functional.cross_entropy(model(x), y).backward()
            for param in model.parameters():
                if param.grad is not None and self.dist.enabled:
                    param.grad.copy_(self.dist.all_sum(param.grad.cpu()))

        return accumulate

    # -- a training phase ------------------------------------------------------------------
    def _should_stop(self) -> bool:
        """SIGINT/SIGTERM seen (on any rank: all ranks stop at the same step)."""
        return any_rank(self.dist, self.stop.raised is not None)

    def _interrupted(self, where: str) -> Interrupted:
        return Interrupted(f"stopped by signal {self.stop.raised} {where}; state saved to {self.last_path}; "
                           f"continue with --resume {self.run_dir}")

    @staticmethod
    def _resume_training(resume: dict | None, optimizer, scheduler, scaler) -> tuple[int, EpochState | None, dict]:
        """Bring a phase's optimizer, schedule and scaler to a last.pt state; (start epoch, epoch state, best)."""
        best = {"top1": -1.0, "top5": -1.0, "epoch": 0}
        if not resume:
            return 0, None, best
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step
            warnings.simplefilter("ignore")
            for _ in range(resume["epoch"]):
                scheduler.step()
        load_optimizer_state(optimizer, resume["optimizer"])
        if resume["scaler"]:
            scaler.load_state_dict(resume["scaler"])
        epoch_state = EpochState(**resume["epoch_state"]) if resume["epoch_state"] else None
        return resume["epoch"], epoch_state, resume["best"] or best

    def _track_best(self, phase: str, epoch: int, metrics: dict, best: dict) -> None:
        """Keep the best top-1 epoch's model as <phase>_best (and the best top-5 beside it)."""
        best["top5"] = max(best["top5"], metrics["top5"])  # the paper's ImageNet tables report top-5
        if metrics["top1"] > best["top1"]:
            best.update(top1=metrics["top1"], epoch=epoch)
            self.save(f"{phase}_best", phase=phase, epoch=epoch, metrics=metrics)

    def train_phase(self, phase: str, cfg: PhaseConfig, loss: Loss, resume: dict | None = None, track_best: bool = False) -> dict:
        """Train ``cfg.epochs`` epochs, from ``resume`` (a last.pt state inside this phase) if given."""
        trained = self._trained()
        if self.compile_regularizers and loss.regularized:
            loss = loss.compiled()
        optimizer = build_optimizer(self.model.parameters(), cfg)
        scheduler = build_scheduler(optimizer, cfg)
        scaler = self.precision.scaler()
        start_epoch, epoch_state, best = self._resume_training(resume, optimizer, scheduler, scaler)
        t = self.recipe.train
        rollback = Rollback(self.model, optimizer, scheduler, scaler, t.recovery_lr_factor, t.recoveries)
        if resume:
            rollback.resumed()
        limits, recoveries = Limits.from_config(t), []
        scaled = factor_layers(self.model, t.scale_factor_grads, torch.zeros(2, *self.info.input_size, device=self.device))
        metrics: dict = {}
        self.progress(PhaseStart(phase, cfg.epochs, len(self.train_loader), start_epoch, epoch_state.step if epoch_state else 0))
        started = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            epoch_state = epoch_state or EpochState()
            rollback.save(epoch_state)
            # one event per read of the running loss (train.log_every steps); "advance": the steps since the last
            on_step = lambda step, steps, info: self.progress(Step(phase, epoch + 1, step, steps, **info))
            while True:  # the epoch; again from its start after each recovery
                self.train_loader.sampler.set_epoch(epoch, start=epoch_state.step * self.train_loader.batch_size)
                try:
                    stats = train_one_epoch(trained, self.train_loader, optimizer, loss, self.precision, scaler, epoch_state,
                                            on_step, self._should_stop, self.dist.all_sum, t.log_every, self.cuda_graphs,
                                            limits, scaled)
                    if stats is not None:
                        metrics = self._after_epoch(epoch, cfg, stats, scheduler)
                    break
                except NonFiniteLoss as e:
                    where = f"{phase} phase, epoch {epoch + 1}: {e}"
                    if not rollback.left:
                        tried = f"; {rollback.used} recoveries at a lower learning rate did not help" if rollback.used else ""
                        raise NonFiniteLoss(f"{where}{tried}; the last good checkpoint is {self.last_path}") from None
                    epoch_state = self._recover(phase, epoch, e, where, rollback, recoveries)
            if stats is None:
                self._save_last(phase, epoch, epoch_state, optimizer, scaler, best)
                raise self._interrupted(f"in the {phase} phase (epoch {epoch + 1}, step {epoch_state.step})")
            epoch_state = None
            self._end_epoch(phase, epoch + 1, epoch + 1 == cfg.epochs, stats, metrics, track_best, best, optimizer, scaler)
        result = {"epochs": cfg.epochs, **metrics, "seconds": round(time.perf_counter() - started, 2)}
        if recoveries:
            result["recoveries"] = recoveries
        if track_best:
            result.update(best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"])
        self.save(phase, phase=phase, epoch=cfg.epochs, metrics=metrics)
        self.progress(PhaseEnd(phase, result))
        return result

    def _end_epoch(self, phase: str, done: int, last: bool, stats: dict, metrics: dict, track_best: bool, best: dict,
                   optimizer, scaler) -> None:
        """A finished epoch (``done`` of the phase): its record logged, the best model kept, the resume point saved when due,
        and a stop signal seen during it honoured."""
        record = {"phase": phase, "epoch": done, **stats, **metrics}
        self._log(record)
        if track_best and metrics:
            self._track_best(phase, done, metrics, best)
        if last or done % self.recipe.checkpoint.every == 0:
            self._save_last(phase, done, None, optimizer, scaler, best)
        self.progress(EpochEnd(phase, done, record))
        # signals are looked at when the loss is read; one in an epoch's last log_every steps stops here
        if not last and self._should_stop():
            if done % self.recipe.checkpoint.every:  # else saved just above
                self._save_last(phase, done, None, optimizer, scaler, best)
            raise self._interrupted(f"in the {phase} phase (after epoch {done})")

    def _after_epoch(self, epoch: int, cfg: PhaseConfig, stats: dict, scheduler) -> dict:
        """After an epoch's last step: its learning rate into ``stats``, the schedule stepped, the validation if due.

        A validation loss that is not finite (finite training losses, yet weights that overflow) raises NonFiniteLoss.
        """
        stats["lr"] = scheduler.optimizer.param_groups[0]["lr"]
        scheduler.step()
        last = epoch + 1 == cfg.epochs
        metrics = self.validate() if (last or (epoch + 1) % self.recipe.eval.every == 0) else {}
        if metrics and not math.isfinite(metrics["val_loss"]):
            raise NonFiniteLoss(f"validation loss became {metrics['val_loss']} after the epoch's last step; lower the learning rate or λ")
        return metrics

    def _recover(self, phase: str, epoch: int, error: NonFiniteLoss, where: str, rollback: Rollback, recoveries: list) -> EpochState:
        """Roll the phase back to the epoch's start with a lower learning rate, recorded in metrics.jsonl and
        ``recoveries`` (the phase's summary); returns the epoch state to train from."""
        old, new, epoch_state = rollback.restore()
        record = {"phase": phase, "epoch": epoch + 1, "recovery": rollback.used, "step": error.step, "reason": error.reason,
                  "layer": error.layer, "lr_before": old, "lr": new}
        self._log(record)
        recoveries.append(record)
        self.progress(Warn(f"{where}; rolled back to the epoch's start, learning rate {old:.4g} → {new:.4g} "
                           f"(recovery {rollback.used} of {rollback.bound}: train.recoveries)"))
        return epoch_state

    def _finish(self) -> None:
        s, final = self.summary, layer_ranks(self.model)
        for name, ranks in s.get("ranks", {}).items():
            ranks["final"] = final[name]
        s["macs"] = self.macs()
        # the accuracy gains are against the model before compression: the dense one where channels are pruned,
        # else (the paper's) the full-rank decomposed one
        phases = s["phases"]
        if "channels" in self.recipe.method:
            base = phases["dense"]
        else:
            base = phases["fullrank"] if phases.get("fullrank", {}).get("epochs") else phases["decompose"]
        ft = phases["finetune"]
        s.update(method=self.recipe.method,
            base_top1=base["top1"], base_top5=base["top5"], best_finetune_top1=ft["best_top1"], best_finetune_top5=ft["best_top5"],
            accuracy_gain=ft["best_top1"] - base["top1"], macs_speedup=s["macs"]["speedup"],
            finished=datetime.now().isoformat(timespec="seconds"),
        )
        self._write_summary()

    # -- driver ------------------------------------------------------------------------
    def _restore(self, source: Path, previous: bool) -> dict:
        """Load a last.pt (this run's, or another run's for a branch); returns its state."""
        path = rundir.checkpoint_path(source, rundir.LAST_PREV if previous else rundir.LAST)
        if not previous and not path.exists() and rundir.checkpoint_path(source, rundir.LAST_NEXT).exists():
            path = rundir.checkpoint_path(source, rundir.LAST_NEXT)  # stopped between _save_last's two renames: the new one is whole
        try:
            state = load_checkpoint(path)
            missing = [k for k in ("completed", "phase", "summary", "rng") if k not in state]
            if missing:
                raise CheckpointError(f"{path} is not a resume checkpoint (it lacks {', '.join(missing)})")
            model = build_model(state["arch"], self.given)
            load_weights(model, state["model"], path)
        except CheckpointError as e:
            hint = "" if previous or not rundir.checkpoint_path(source, rundir.LAST_PREV).exists() else "; add --previous to use the one before it"
            raise CheckpointError(f"{e}{hint}") from None
        self.model = self.place(model)
        self.channel_structure = state["arch"].get("channels")
        self.summary = json.loads(state["summary"])
        self.summary["run_dir"] = str(self.run_dir)
        self.completed = list(state["completed"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        return state

    def run(self, resume: bool = False, previous: bool = False, start_from: Path | None = None, stop_after: str | None = None) -> RunResult:
        """Run the phases not yet done.

        ``resume``: continue this run directory from checkpoints/last.pt (``previous``: from
        the one before it). ``start_from``: branch from another run directory's completed
        phases. ``stop_after``: stop once that phase is complete (last.pt is the branch point).
        """
        if stop_after is not None and stop_after not in PHASES:
            raise LrexportError(f"stop_after must be one of {', '.join(PHASES)}; got {stop_after!r}")
        self._setup_data()
        if self.recipe.prune.latency != "none":
            from ..deploy.backends import get_runtime

            get_runtime(self.recipe.prune.latency)  # a runtime that is not installed fails now, not after training
        state = None
        if resume or start_from is not None:
            source = self.run_dir if resume else Path(start_from)
            state = self._restore(source, previous)
            if resume and state.get("recipe_hash") != self.recipe.hash():
                self.progress(Warn(f"the recipe differs from the one {source} was started with "
                                   f"(see its {rundir.RECIPE}): phases still to come use the new settings"))
            if start_from is not None:
                state = dict(state, phase=None)  # a branch starts at a phase boundary
                # the branch's own settings, not its source's (the phases it copied are the source's)
                fresh = self._new_summary()
                self.summary.update({k: fresh[k] for k in ("name", "started", "method", "channels_config", "decomposition", "reg", "prune")})
                if self.dist.is_main:
                    rundir.copy_branch(source, self.run_dir)
        else:
            torch.manual_seed(self.recipe.seed)
            random.seed(self.recipe.seed)
            self.model = self.place(self._new_model())
            self._check_model()
            if "channels" in self.recipe.method:  # a target or model that cannot be pruned fails before any training
                prune_channels(self, copy.deepcopy(self.model), trial=True)
            self.summary = self._new_summary()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_recipe(self.run_dir, self.recipe)
        self.summary["recipe_hash"] = self.recipe.hash()
        with self.stop:
            for ph in REGISTRY:
                phase = ph.name
                if phase in self.completed:
                    continue
                if self.recipe.method not in ph.methods:  # another method's phase: passed without a trace
                    if phase == stop_after:
                        break
                    continue
                inside = state if state and state.get("phase") == phase else None
                self._complete(phase, ph.run(self, inside))
                if phase == stop_after:
                    break
                if phase != PHASES[-1] and self._should_stop():  # a signal after the phase's last read; last.pt is its end
                    raise self._interrupted(f"after the {phase} phase")
        if "finetune" in self.completed:
            self._finish()
        self.dist.barrier()
        return RunResult(self.run_dir, self.summary)


def run_recipe(recipe: Recipe, output: str | Path | None = None, progress: Progress = quiet, *, resume: str | Path | bool | None = None,
               previous: bool = False, start_from: str | Path | None = None, stop_after: str | None = None,
               model: nn.Module | None = None) -> RunResult:
    """Run every phase of ``recipe``; returns the run directory and its summary.

    ``resume=True`` continues the newest run of this recipe, a path continues that run.
    ``model``: train this module (a copy of it) instead of the recipe's ``model.name``; resuming
    and exporting the run then take it again. Under torchrun (WORLD_SIZE > 1) each process calls
    this; rank 0 writes the files.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise ModelError(f"model= takes a torch.nn.Module; got a {type(model).__name__}")
    dist = init_distributed(recipe.device)
    try:
        if resume:
            run_dir = rundir.resumable_run(recipe.output_dir, recipe.name) if resume is True else Path(resume)
            return Pipeline(recipe, run_dir, progress, dist, model).run(resume=True, previous=previous, stop_after=stop_after)
        run_dir = Path(output) if output is not None else rundir.new_run_dir(recipe.output_dir, recipe.name)
        return Pipeline(recipe, run_dir, progress, dist, model).run(start_from=start_from, stop_after=stop_after)
    finally:
        shutdown(dist)
