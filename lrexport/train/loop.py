"""One epoch of training, one evaluation, and the pieces they are built from.

Like torchvision's references: the compression phases reuse one loop, differing only in
which regularizer weights they pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import LrexportError
from ..lowrank.regularizers import orthogonality, sparsity
from ..recipe import PhaseConfig, Recipe


class NonFiniteLoss(LrexportError):
    """The loss became NaN or inf: the phase stops, the last good checkpoint stays."""


@dataclass
class Loss:
    """The training objective of DESIGN §2: CE + λ_o·Σ L_o + λ_s·Σ L_s."""

    ortho: float = 0.0
    sparsity_type: str = "none"
    decay: float = 0.0

    def __post_init__(self):
        self._regularizers: Callable[[nn.Module], dict[str, torch.Tensor]] = self.regularizers

    def regularizers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The unweighted regularizer terms this loss uses, summed over ``model``'s SVD layers."""
        terms = {}
        if self.ortho:
            terms["ortho"] = orthogonality(model)
        if self.decay and self.sparsity_type != "none":
            terms["sparsity"] = sparsity(self.sparsity_type)(model)
        return terms

    @property
    def regularized(self) -> bool:
        return bool(self.ortho) or bool(self.decay and self.sparsity_type != "none")

    def compiled(self) -> "Loss":
        """This loss with its regularizer terms run through torch.compile (eager if compiling fails)."""
        loss = dataclasses.replace(self)
        loss._regularizers = _CompiledOrEager(loss.regularizers)
        return loss

    def terms(self, model: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(logits, target)} | self._regularizers(model)

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        total = terms["ce"]
        if "ortho" in terms:
            total = total + self.ortho * terms["ortho"]
        if "sparsity" in terms:
            total = total + self.decay * terms["sparsity"]
        return total


class _CompiledOrEager:
    """``torch.compile(fn)``; if its first call cannot compile (no C compiler, say), warn and stay eager.

    Compiling happens at the first call; a failure there that is not the compiler's recurs in
    the eager call and is raised from it.
    """

    def __init__(self, fn: Callable):
        self.eager, self.fn, self.first = fn, torch.compile(fn), True

    def __call__(self, *args):
        if not self.first:
            return self.fn(*args)
        self.first = False
        try:
            return self.fn(*args)
        except Exception as e:  # noqa: BLE001 (whatever the compiler raised, the eager function computes the same)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
            warnings.warn(f"torch.compile of the regularizers failed ({reason}); running them eagerly "
                          "(reg.compile = false skips compiling)", stacklevel=2)
            self.fn = self.eager
            return self.eager(*args)


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), sharded over ``world`` ranks.

    Reseeding per epoch makes a resumed run see the same order as an uninterrupted one, and
    every rank the same permutation. ``start`` skips the batches a resumed epoch already did.
    Training shards are padded to equal length (every rank must step together); evaluation
    shards are not, so summed counts equal one process's.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))[self.rank :: self.world]
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist()
        order += order[: math.ceil(self.size / self.world) * self.world - self.size]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int, pin: bool, rank: int = 0, world: int = 1) -> DataLoader:
    """``batch_size`` is per rank."""
    sampler = EpochSampler(len(ds), seed, shuffle, rank, world)
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
        drop_last=False, persistent_workers=workers > 0,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise LrexportError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LrexportError(f"device {name!r} asked for, but this machine has no usable CUDA GPU; use device = \"auto\" or \"cpu\"")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LrexportError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def build_optimizer(params, cfg: PhaseConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: PhaseConfig):
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


@dataclass
class Precision:
    """AMP and memory format, from the recipe, resolved for one device."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

    @classmethod
    def from_recipe(cls, recipe: Recipe, device: torch.device) -> "Precision":
        return cls(device, recipe.amp, recipe.channels_last)

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16" and self.device.type == "cuda")

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _regularized_module(model: nn.Module) -> nn.Module:
    # DistributedDataParallel wraps the model; the regularizers read the SVD layers inside it.
    return getattr(model, "module", model)


@dataclass
class EpochState:
    """Where an epoch stands: enough to stop after any step and resume it exactly."""

    step: int = 0  # batches done
    sums: list[float] = field(default_factory=lambda: [0.0] * 6)  # loss, ce, ortho, sparsity, correct, seen
    elapsed: float = 0.0
    done: bool = False


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss: Loss,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    state: EpochState | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float] | None:
    """Train over ``loader`` (from ``state.step`` on); mean loss terms, accuracy and images/s.

    Returns None when ``should_stop()`` asked to stop early; ``state`` then says where.
    Raises NonFiniteLoss, naming the step, before a NaN/inf loss touches the weights.
    """
    model.train()
    scaler = scaler or precision.scaler()
    state = state or EpochState()
    sums = torch.tensor(state.sums, dtype=torch.float64)
    steps = state.step + len(loader)
    start = time.perf_counter() - state.elapsed
    for x, y in loader:
        x, y = precision.inputs(x), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        # outside autocast: the Gram-matrix deviations of the orthogonality term lose most
        # of their precision in bf16/fp16
        terms = loss.terms(_regularized_module(model), logits.float(), y)
        total = loss.total(terms)
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"loss became {total.item()} at step {state.step + 1} of the epoch ("
                                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()) + "); lower the learning rate or λ")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        n = y.shape[0]
        sums += torch.tensor([
            total.item() * n, terms["ce"].item() * n, terms.get("ortho", torch.zeros(())).item() * n,
            terms.get("sparsity", torch.zeros(())).item() * n, (logits.argmax(1) == y).sum().item(), n,
        ], dtype=torch.float64)
        state.step += 1
        state.sums, state.elapsed = sums.tolist(), time.perf_counter() - start
        if on_step:
            on_step(state.step, steps, {"loss": total.item(), "ce": terms["ce"].item()})
        if should_stop and should_stop() and state.step < steps:
            return None
    state.done = True
    stats = reduce(sums) if reduce is not None else sums
    seen = max(1.0, stats[5].item())
    return {
        "loss": stats[0].item() / seen, "ce": stats[1].item() / seen, "ortho": stats[2].item() / seen,
        "sparsity": stats[3].item() / seen, "train_top1": 100.0 * stats[4].item() / seen,
        "images_per_s": seen / max(state.elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, precision: Precision, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader``."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, count
    for x, y in loader:
        x, y = precision.inputs(x), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, 1).indices
        stats += torch.tensor([
            F.cross_entropy(logits, y, reduction="sum").item(), (top[:, 0] == y).sum().item(),
            (top == y[:, None]).any(1).sum().item(), y.shape[0],
        ], dtype=torch.float64)
    if reduce is not None:
        stats = reduce(stats)
    n = max(1.0, stats[3].item())
    return {"val_loss": stats[0].item() / n, "top1": 100.0 * stats[1].item() / n, "top5": 100.0 * stats[2].item() / n}
