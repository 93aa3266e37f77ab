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
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import LrexportError
from ..lowrank.regularizers import orthogonality, sparsity
from ..lowrank.svd_layers import svd_layers
from ..recipe import PhaseConfig, Recipe
from .stability import CE_RUNAWAY, NONFINITE, ORTHO_RUNAWAY, Limits, scale_factor_grads, worst_layer


class NonFiniteLoss(LrexportError):
    """The loss became NaN or inf, or ran away (``Limits``): the epoch stops, the last good checkpoint stays.

    ``step``: the epoch's step it happened at (0: after the epoch); ``reason``: "nonfinite",
    "ce" or "ortho"; ``layer``: the SVD layer farthest from orthonormal then, if any.
    """

    def __init__(self, message: str, step: int = 0, reason: str = "nonfinite", layer: str | None = None):
        super().__init__(message)
        self.step, self.reason, self.layer = step, reason, layer


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
    # fused: one kernel per step, and it takes GradScaler's found_inf flag, which lets a step
    # whose loss is not finite be skipped on the device, without a host read
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the built optimizer's implementation.

    A state saved by a non-fused optimizer (an older lrexport) would otherwise switch it off.
    """
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, impl):
        group.update(keep)


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

    def autocast(self, cache: bool = True):
        """``cache=False`` under CUDA-graph capture, as torch's docs require (the cache would outlive the graph)."""
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16, cache_enabled=cache)

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


class CudaGraphs:
    """``train.cuda_graph`` resolved for one run: whether training steps are captured, and one warning when they cannot be."""

    def __init__(self, setting: bool | str, device: torch.device, amp: str = "none", processes: int = 1):
        reason = ("the device is not a CUDA GPU" if device.type != "cuda"
                  else "it runs under torchrun (DistributedDataParallel's hooks are not captured)" if processes > 1
                  else "fp16's gradient scaler is not captured (bf16 needs none)" if amp == "fp16" else None)
        self.enabled = setting is not False and reason is None
        if setting is True and reason:
            warnings.warn(f"train.cuda_graph = true, but {reason}: training steps run eagerly", stacklevel=2)
        self._warm: weakref.WeakSet = weakref.WeakSet()

    def warmup_steps(self, optimizer: torch.optim.Optimizer) -> int:
        """Eager steps before a capture: more in a phase's first epoch, where lazy set-up happens
        (optimizer state, cudnn.benchmark's choices, torch.compile of the regularizers)."""
        first = optimizer not in self._warm
        self._warm.add(optimizer)
        return 3 if first else 1

    def failed(self, error: BaseException) -> None:
        """A capture failed: warn (once, as capture is tried no more) and train eagerly from here on."""
        self.enabled = False
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
        warnings.warn(f"capturing the training step as a CUDA graph failed ({reason}); training eagerly "
                      "(train.cuda_graph = false skips the attempt)", stacklevel=2)


# An epoch's statistics live in one float64 vector on the device, read by the host every
# log_every steps: a read waits for the GPU, so reading every step starves it.
_SUMS = slice(0, 6)  # Σ loss·n, Σ ce·n, Σ ortho·n, Σ sparsity·n, correct, seen: EpochState.sums
_STEP = 6  # steps done in the epoch
_BAD = 7  # the first step whose loss was not finite (0: none)
_BAD_TERMS = slice(8, 12)  # that step's loss, ce, ortho, sparsity
_REASON = 12  # why that step stopped the epoch: stability.NONFINITE, CE_RUNAWAY or ORTHO_RUNAWAY
_REASONS = {NONFINITE: "nonfinite", CE_RUNAWAY: "ce", ORTHO_RUNAWAY: "ortho"}
_START_CE, _START_ORTHO = 13, 14  # this call's first step's ce and ortho: a runaway is also twice as high
_STARTED = 15  # 1 once _START is set
_TERMS = ("ce", "ortho", "sparsity")


class _Step:
    """One training step that decides everything on the device: no host reads.

    A step whose loss is not finite or passes ``limits``, and every step after it, changes no weight: the fused
    optimizer gets the skip flag the way GradScaler hands it ``found_inf`` (under fp16's
    scaler, a NaN factor makes the gradients non-finite and the scaler skips the step).
    ``stats`` records that first step and its loss terms for the next read to report.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: Loss, precision: Precision,
                 scaler: torch.amp.GradScaler, stats: torch.Tensor, graphed: bool = False, limits: Limits = Limits(),
                 scaled: list[nn.Module] = ()):
        self.model, self.optimizer, self.loss, self.precision, self.scaler, self.stats = model, optimizer, loss, precision, scaler, stats
        self.limits = limits
        self.scaled = list(scaled)
        # the limit is per layer; the term sums over them
        self.ortho_limit = limits.ortho * len(svd_layers(_regularized_module(model)))
        self.autocast_cache = not graphed
        # a caller's own optimizer may lack the found_inf protocol: then the host decides, one read per step
        self.on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in optimizer.param_groups)
        self.names: list[str] = ["ce"]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast(self.autocast_cache):
            logits = self.model(x)
        # outside autocast: the Gram-matrix deviations of the orthogonality term lose most
        # of their precision in bf16/fp16
        terms = self.loss.terms(_regularized_module(self.model), logits.float(), y)
        total = self.loss.total(terms)
        self.names = list(terms)
        s, n = self.stats, y.shape[0]
        with torch.no_grad():
            zero = total.new_zeros(())
            values = torch.stack([total, *(terms.get(k, zero) for k in _TERMS)]).double()
            s[_STEP] += 1
            reason = torch.where(torch.isfinite(total), 0, NONFINITE)
            # a term runs away when it passes its limit and twice its value at the first step: a
            # model that starts the epoch past a limit (the phase before left it there) is not
            # diverging, and going back to the epoch's start would not help it
            s[_START_CE:_STARTED] = torch.where(s[_STARTED] > 0, s[_START_CE:_STARTED], values[1:3])
            s[_STARTED] = 1
            if self.limits.ce:
                limit = torch.clamp_min(2 * s[_START_CE], self.limits.ce * math.log(max(2, logits.shape[1])))
                reason = torch.where((reason == 0) & (terms["ce"] > limit), CE_RUNAWAY, reason)
            if self.ortho_limit and "ortho" in terms:
                limit = torch.clamp_min(2 * s[_START_ORTHO], self.ortho_limit)
                reason = torch.where((reason == 0) & (terms["ortho"] > limit), ORTHO_RUNAWAY, reason)
            first = (reason > 0) & (s[_BAD] == 0)
            s[_BAD] = torch.where(first, s[_STEP], s[_BAD])
            s[_BAD_TERMS] = torch.where(first, values, s[_BAD_TERMS])
            s[_REASON] = torch.where(first, reason.double(), s[_REASON])
            skip = s[_BAD] > 0
            s[0:4] += values * n
            s[4] += (logits.argmax(1) == y).sum()
            s[5] += n
        if self.scaler.is_enabled():
            self.scaler.scale(total * torch.where(skip, torch.nan, 1.0)).backward()
            scale_factor_grads(self.scaled)  # a scale commutes with the scaler's
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        total.backward()
        scale_factor_grads(self.scaled)
        if self.on_device:
            self.optimizer.found_inf = skip.float()  # 0-dim, as GradScaler makes it (Adam subtracts it from its 0-dim step counts)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not skip.item():
            self.optimizer.step()


class _GraphedStep:
    """A ``_Step`` captured as one CUDA graph, replayed with each batch copied into static inputs.

    The first steps run eagerly on a side stream (torch's recipe for whole-network capture):
    lazy set-up must not happen inside a capture. Each epoch captures anew, as the learning
    rate is baked into the graph. A batch of another shape (an epoch's last) runs eagerly.
    """

    def __init__(self, step: _Step, graphs: CudaGraphs):
        self.step, self.graphs = step, graphs
        self.warmup = graphs.warmup_steps(step.optimizer)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream(step.precision.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is not None and x.shape == self.x.shape and y.shape == self.y.shape:
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()
        elif self.graph is None and self.graphs.enabled and self.warmup > 0:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
        elif self.graph is None and self.graphs.enabled and self._capture(x, y):
            self.graph.replay()  # capturing records the step without running it
        else:
            self.step(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        self.x, self.y = x.clone(), y.clone()
        self.step.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads it rewrites on replay
        graph = torch.cuda.CUDAGraph()
        groups = self.step.optimizer.param_groups
        capturable = [g.get("capturable") for g in groups]
        try:
            # Adam refuses a capture unless `capturable`; the fused kernels ignore it ("needed for
            # consistency"), and set outside a capture it warns at every eager step: on for the capture only
            for g in groups:
                if "capturable" in g and g.get("fused"):
                    g["capturable"] = True
            # thread_local: the DataLoader's pin-memory thread keeps allocating during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.step(self.x, self.y)
        except Exception as e:  # noqa: BLE001 (whatever stopped the capture, the eager step computes the same)
            self.step.optimizer.zero_grad(set_to_none=True)
            self.graphs.failed(e)
            return False
        finally:
            for g, c in zip(groups, capturable):
                if c is not None:
                    g["capturable"] = c
        self.graph = graph
        return True


def _device_batches(loader, precision: Precision) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches on the device; on CUDA the next batch is copied on a side stream while a step runs."""
    device = precision.device
    if device.type != "cuda":
        for x, y in loader:
            yield precision.inputs(x), y.to(device)
        return
    stream, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def load(batch):
        with torch.cuda.stream(stream):
            return precision.inputs(batch[0]), batch[1].to(device, non_blocking=True)

    it = iter(loader)
    batch = next(it, None)
    ready = load(batch) if batch is not None else None
    while ready is not None:
        current.wait_stream(stream)
        for t in ready:
            t.record_stream(current)  # made on the side stream, used (and freed) on this one
        yield ready
        batch = next(it, None)  # the caller has queued its step: load the next batch meanwhile
        ready = load(batch) if batch is not None else None


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
    log_every: int = 50,
    cuda_graphs: CudaGraphs | None = None,
    limits: Limits = Limits(),
    scaled: list[nn.Module] = (),
) -> dict[str, float] | None:
    """Train over ``loader`` (from ``state.step`` on); mean loss terms, accuracy and images/s.

    The host reads the running statistics only every ``log_every`` steps (counted from the
    epoch's start) and after the last step; ``on_step(step, steps, info)`` and
    ``should_stop()`` are called at those reads, ``info`` holding the mean loss and ce since
    the previous read and ``advance``, the steps since it. Returns None when ``should_stop()``
    asked to stop early; ``state`` then says where. Raises NonFiniteLoss at the first read
    after a NaN/inf loss, or one past ``limits``, naming its step (and the SVD layer farthest
    from orthonormal); neither that step nor any later one changed a weight. ``scaled``:
    the SVD layers whose factor gradients each step scales (stability.scale_factor_grads).
    """
    model.train()
    scaler = scaler or precision.scaler()
    state = state or EpochState()
    steps = state.step + len(loader)
    stats = torch.zeros(16, dtype=torch.float64, device=precision.device)
    stats[_SUMS] = torch.tensor(state.sums, dtype=torch.float64)
    stats[_STEP] = state.step
    graphed = cuda_graphs is not None and cuda_graphs.enabled
    step = _Step(model, optimizer, loss, precision, scaler, stats, graphed, limits, scaled)
    run = _GraphedStep(step, cuda_graphs) if graphed else step
    start = time.perf_counter() - state.elapsed
    shown_step, shown = state.step, list(state.sums)  # at the previous read
    for x, y in _device_batches(loader, precision):
        run(x, y)
        state.step += 1
        if state.step % log_every and state.step < steps:
            continue
        read = stats.tolist()  # the one host read: it waits for the device
        if read[_BAD]:
            raise _stopped(model, read, step.names, limits)
        state.sums, state.elapsed = read[_SUMS], time.perf_counter() - start
        if on_step:
            seen = max(1.0, state.sums[5] - shown[5])
            on_step(state.step, steps, {"loss": (state.sums[0] - shown[0]) / seen, "ce": (state.sums[1] - shown[1]) / seen,
                                        "advance": state.step - shown_step})
        shown_step, shown = state.step, state.sums
        if should_stop and state.step < steps and should_stop():
            return None
    state.done = True
    sums = reduce(torch.tensor(state.sums, dtype=torch.float64)).tolist() if reduce is not None else state.sums
    return _epoch_means(sums, state.elapsed)


def _epoch_means(sums: list[float], elapsed: float) -> dict[str, float]:
    """The epoch's mean loss terms, training accuracy and throughput from its running sums (over every process)."""
    seen = max(1.0, sums[5])
    return {
        "loss": sums[0] / seen, "ce": sums[1] / seen, "ortho": sums[2] / seen, "sparsity": sums[3] / seen,
        "train_top1": 100.0 * sums[4] / seen, "images_per_s": seen / max(elapsed, 1e-9),
    }


def _stopped(model: nn.Module, read: list[float], names: list[str], limits: Limits) -> NonFiniteLoss:
    """The error for the step a read found bad: what happened, at which step, and the layer farthest from orthonormal."""
    bad, at, reason = dict(zip(("loss", *_TERMS), read[_BAD_TERMS])), int(read[_BAD]), _REASONS[int(read[_REASON])]
    what = {"nonfinite": f"loss became {bad['loss']}",
            "ce": f"cross-entropy ran away to {bad['ce']:.4g} (past train.diverge_ce = {limits.ce:g} × ln(classes) and twice "
                  f"the epoch's first step's {read[_START_CE]:.4g})",
            "ortho": f"orthogonality term ran away to {bad['ortho']:.4g} (past train.diverge_ortho = {limits.ortho:g} per SVD layer "
                     f"and twice the epoch's first step's {read[_START_ORTHO]:.4g})"}[reason]
    worst = worst_layer(_regularized_module(model))  # the weights the bad step saw: it changed none
    where = f"; factors farthest from orthonormal: {worst[0]} ({worst[1]:.3g})" if worst else ""
    return NonFiniteLoss(f"{what} at step {at} of the epoch (" + ", ".join(f"{k}={bad[k]:.4g}" for k in names) + f"){where}; "
                         "lower the learning rate or λ", step=at, reason=reason, layer=worst[0] if worst else None)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, precision: Precision, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader``."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=precision.device)  # loss sum, top1, top5, count: read once, at the end
    for x, y in _device_batches(loader, precision):
        with precision.autocast():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, 1).indices
        stats[0] += F.cross_entropy(logits, y, reduction="sum")
        stats[1] += (top[:, 0] == y).sum()
        stats[2] += (top == y[:, None]).any(1).sum()
        stats[3] += y.shape[0]
    stats = stats.cpu()
    if reduce is not None:
        stats = reduce(stats)
    n = max(1.0, stats[3].item())
    return {"val_loss": stats[0].item() / n, "top1": 100.0 * stats[1].item() / n, "top5": 100.0 * stats[2].item() / n}
