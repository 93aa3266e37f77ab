"""Filter pruning through Torch-Pruning: its dependency graph keeps residual adds, concats and
normalisation layers consistent while whole channels are removed.

The target is a fraction of each prunable group's channels (``ratio``) or a MACs reduction
(``speedup``: dense MACs over pruned MACs). Every group is pruned by the same fraction, so the
MACs a fraction leaves do not depend on which channels go: a bisection on copies of the model
finds the fraction for a MACs target with the cheap magnitude score, then the chosen importance
picks the channels. ``steps`` > 1 removes them in that many rounds, the importance (and for
``taylor`` its gradients) taken anew before each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable

import torch
from torch import nn

from ..errors import LrexportError, ModelError, RuntimeMissingError, first_line
from ..lowrank import count_macs
from .structure import layer_widths, record_structure, snapshot

IMPORTANCES = ("l2", "l1", "group", "taylor", "fpgm", "random")
# The fractions tried for a MACs target, coarse then bisected. MACs fall with the fraction only up to a
# point: near 1, Torch-Pruning leaves a group whole rather than empty it, and round_to rounds widths up,
# so the scan stops at 90 % (10 % of a layer's channels) and the bisection runs below the first hit.
SCAN = tuple(i / 20 for i in range(1, 19))
SEARCH_STEPS = 8


class ChannelsError(LrexportError):
    """A channel-pruning target or model that cannot be pruned as asked."""

    exit_code = 2


@dataclass
class ChannelResult:
    ratio: float  # the fraction of each prunable group's channels removed
    dense_macs: int
    macs: int
    structure: dict  # lrexport.channels.structure: what a checkpoint rebuilds
    widths: dict = field(default_factory=dict)  # per layer whose width changed: in/out before and after

    @property
    def speedup(self) -> float:
        return self.dense_macs / self.macs

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "dense_macs": self.dense_macs, "macs": self.macs, "speedup": self.speedup,
                "layers": self.widths}


def _tp():
    try:
        import torch_pruning
    except ImportError:
        raise RuntimeMissingError("channel pruning needs the torch-pruning package: pip install 'torch-pruning>=1.6.1,<1.7'") from None
    return torch_pruning


def importance(name: str):
    """Torch-Pruning's scorer for an importance name: "l1"/"l2" score a filter by its own weights (Li et al.),
    "group" by the norm over every layer the channel couples (DepGraph), "taylor" by |weight × gradient|."""
    imp = _tp().importance
    scorers = {
        "l2": lambda: imp.GroupMagnitudeImportance(p=2, group_reduction="first"),
        "l1": lambda: imp.GroupMagnitudeImportance(p=1, group_reduction="first"),
        "group": lambda: imp.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        "taylor": lambda: imp.GroupTaylorImportance(),
        "fpgm": lambda: imp.FPGMImportance(),
        "random": lambda: imp.RandomImportance(),
    }
    if name not in scorers:
        raise ChannelsError(f"channels.importance = {name!r} is not one of {', '.join(IMPORTANCES)}")
    return scorers[name]()


def classifier(model: nn.Module, example: torch.Tensor) -> str:
    """The name of the last conv or linear layer a forward pass calls: its outputs are the classes."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ChannelsError("the model has no conv or linear layer to prune")
    return order[-1]


def ignored_layers(model: nn.Module, example: torch.Tensor, exclude: list[str]) -> list[nn.Module]:
    """The classifier and every layer an ``exclude`` pattern names (a pattern that names none is an error)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for pattern in exclude:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ChannelsError(f"channels.exclude pattern {pattern!r} matches no conv or linear layer (e.g. {names[:3]})")
    keep = {classifier(model, example)} | {n for n in names if any(fnmatchcase(n, p) for p in exclude)}
    return [model.get_submodule(n) for n in sorted(keep)]


def _pruner(model: nn.Module, example: torch.Tensor, scorer, ratio: float, steps: int, round_to: int, exclude: list[str]):
    tp = _tp()
    try:
        with torch.enable_grad():  # the dependency graph is traced through autograd, even where the caller disabled it
            return tp.pruner.MetaPruner(model, example, importance=scorer, pruning_ratio=ratio, iterative_steps=steps,
                                        ignored_layers=ignored_layers(model, example, exclude),
                                        round_to=round_to if round_to > 1 else None)
    except LrexportError:
        raise
    except Exception as e:  # the dependency graph could not trace the model
        raise ModelError(f"Torch-Pruning cannot trace this model: {first_line(e)}") from None


def _step(pruner) -> None:
    """One round of pruning; Torch-Pruning's own failure on a graph it cannot handle is one line, not a traceback."""
    try:
        pruner.step()
    except Exception as e:
        raise ModelError(f"Torch-Pruning cannot prune this model: {first_line(e)}; leave the layers around the failing "
                         "operation whole with channels.exclude") from None


def failing_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, str] | None:
    """Run ``model``; where it fails, the innermost module it was inside and the error, else None."""
    stack: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: stack.append(n)) for n, m in model.named_modules() if n]
    hooks += [m.register_forward_hook(lambda mod, i, o: stack.pop() and None) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(example)
        return None
    except Exception as e:
        return (stack[-1] if stack else "the model's own forward"), first_line(e)
    finally:
        for h in hooks:
            h.remove()


def _macs_at(model: nn.Module, example: torch.Tensor, input_size, ratio: float, round_to: int, exclude: list[str]) -> int:
    trial = copy.deepcopy(model)
    _step(_pruner(trial, example, importance("l2"), ratio, 1, round_to, exclude))
    _check_runs(trial, example)
    return count_macs(trial, input_size).dense


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """A pruned model that no longer runs: one line naming the layer where it fails."""
    failed = failing_layer(model, example)
    if failed:
        layer, error = failed
        kind = type(model.get_submodule(layer)).__name__ if layer in dict(model.named_modules()) else "forward"
        raise ModelError(f"Torch-Pruning cannot prune this model consistently: after pruning, {layer} ({kind}) fails "
                         f"({error}); leave the layers that feed it whole with channels.exclude")


def _ratio_for(model, example, input_size, target: float, dense: int, round_to: int, exclude: list[str]) -> float:
    """The smallest fraction whose pruned model has at most dense/target MACs (a bisection on copies)."""
    lo, hi, most = 0.0, None, 1.0
    for ratio in SCAN:
        reached = dense / _macs_at(model, example, input_size, ratio, round_to, exclude)
        if reached >= target:
            hi = ratio
            break
        lo, most = ratio, max(most, reached)
    if hi is None:
        raise ChannelsError(f"channels.speedup = {target:g} cannot be reached: removing up to {SCAN[-1]:.0%} of every prunable "
                            f"layer's channels gives at most {most:.2f}x fewer MACs (channels.exclude and the classifier stay whole; "
                            f"Torch-Pruning keeps at least round_to = {round_to} channels in a layer)")
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if dense / _macs_at(model, example, input_size, mid, round_to, exclude) >= target else (mid, hi)
    return hi


def prune_channels(model: nn.Module, input_size: tuple[int, int, int], *, speedup: float = 0.0, ratio: float = 0.0,
                   importance_name: str = "l2", round_to: int = 1, steps: int = 1, exclude: list[str] | tuple = (),
                   gradients: Callable[[nn.Module], None] | None = None) -> ChannelResult:
    """Remove whole channels from ``model`` in place; returns what was removed and the structure to rebuild it.

    ``speedup``: dense MACs over pruned MACs to reach (the fraction is searched); else ``ratio``, the fraction
    of each prunable group's channels. ``gradients(model)`` accumulates loss gradients into ``.grad``: the
    "taylor" importance needs it before each step.
    """
    if (speedup > 0) == (ratio > 0):
        raise ChannelsError("channel pruning needs one target: channels.speedup (> 1) or channels.ratio (between 0 and 1)")
    if speedup and speedup <= 1:
        raise ChannelsError(f"channels.speedup = {speedup:g} must be > 1: it is dense MACs over pruned MACs")
    scorer = importance(importance_name)
    if importance_name == "taylor" and gradients is None:
        raise ChannelsError("channels.importance = \"taylor\" needs gradients, and none were given")
    exclude = list(exclude)
    was_training = model.training
    model.eval()  # tracing runs forward passes: batch norm's running statistics must not move
    try:
        param = next(model.parameters())
        example = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        dense = count_macs(model, input_size).dense
        if speedup:
            ratio = _ratio_for(model, example, input_size, speedup, dense, round_to, exclude)
        before = snapshot(model)
        pruner = _pruner(model, example, scorer, ratio, steps, round_to, exclude)
        for _ in range(steps):
            if importance_name == "taylor":
                model.zero_grad()
                gradients(model)
            _step(pruner)
        model.zero_grad(set_to_none=True)
        _check_runs(model, example)
        return ChannelResult(ratio, dense, count_macs(model, input_size).dense, record_structure(model, before),
                             layer_widths(before, model))
    finally:
        model.train(was_training)
