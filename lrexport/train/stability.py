"""What keeps SVD training stable: the factor step scale, divergence limits, and rollback.

A gradient step on U, s, V moves W = U·diag(s)·V up to about 2·s²+1 times as far as the same
step on the dense W (the U and V steps carry s² each): a model whose dense training sits near
the largest stable learning rate, with no BatchNorm after a conv to absorb the scale, then
diverges at that rate in SVD form. ``scale_factor_grads`` divides each rank-one component's
U-column and V-row gradients by max(1, s_i²), which brings the step on W back to the dense
one's size (docs/training.md has the measurements); by default only where no normalization
layer takes the SVD layer's output (a BatchNorm after it absorbs W's scale, and the paper's
recipes were tuned with those layers unscaled). ``Limits`` says when a step has diverged;
``Rollback`` returns a phase to its last good state with a lower learning rate.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..lowrank import svd_layers
from ..recipe import TrainConfig


NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@torch.no_grad()
def unnormalized_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The SVD layers whose output no normalization layer takes as its input, seen on one forward of ``example``."""
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # the tensors are kept: an id must not be reused meanwhile
    normalized: set[int] = set()
    layers = [layer for _, layer in svd_layers(model)]
    hooks = [layer.register_forward_hook(lambda m, args, out: outputs.__setitem__(id(out), (m, out))) for layer in layers]
    hooks += [m.register_forward_pre_hook(lambda m, args: normalized.add(id(outputs[id(args[0])][0])) if id(args[0]) in outputs else None)
              for m in model.modules() if isinstance(m, NORMS)]
    training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return [layer for layer in layers if id(layer) not in normalized]


def factor_layers(model: nn.Module, setting: bool | str, example: torch.Tensor) -> list[nn.Module]:
    """The SVD layers whose factor gradients ``train.scale_factor_grads`` scales: all (true), none (false),
    those without a normalization after them ("auto")."""
    if setting is False or not svd_layers(model):
        return []
    if setting is True:
        return [layer for _, layer in svd_layers(model)]
    return unnormalized_layers(model, example)


@torch.no_grad()
def scale_factor_grads(layers: list[nn.Module]) -> None:
    """Divide U[:, i]'s and V[i, :]'s gradients by max(1, s_i²), in place (no host read)."""
    for layer in layers:
        if layer.U.grad is None or layer.V.grad is None:
            continue
        scale = layer.s.detach().float().square().clamp_min(1).reciprocal()
        layer.U.grad.mul_(scale.to(layer.U.grad.dtype))
        layer.V.grad.mul_(scale.to(layer.V.grad.dtype)[:, None])


@dataclass(frozen=True)
class Limits:
    """A step has diverged when its cross-entropy passes ``ce`` × ln(classes) (a uniform guess's loss)
    or its orthogonality term (unweighted, summed over the SVD layers) passes ``ortho`` times the
    number of SVD layers, and twice its value at the epoch's first step; 0: no limit."""

    ce: float = 0.0
    ortho: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Limits":
        return cls(cfg.diverge_ce, cfg.diverge_ortho)


# why a step stopped the epoch: the code the training step records on the device
NONFINITE, CE_RUNAWAY, ORTHO_RUNAWAY = 1, 2, 3


@torch.no_grad()
def deviations(model: nn.Module) -> dict[str, float]:
    """Each SVD layer's ‖UᵀU − I‖²_F/r² + ‖V·Vᵀ − I‖²_F/r² (its share of the orthogonality term)."""
    out = {}
    for name, layer in svd_layers(model):
        u, v = layer.U.detach().float(), layer.V.detach().float()
        eye = torch.eye(u.shape[1], device=u.device)
        out[name] = ((u.T @ u - eye).square().sum() + (v @ v.T - eye).square().sum()).item() / u.shape[1] ** 2
    return out


def worst_layer(model: nn.Module) -> tuple[str, float] | None:
    """The SVD layer whose factors are farthest from orthonormal (a NaN counts as farthest), and that distance."""
    devs = deviations(model)
    if not devs:
        return None
    name = max(devs, key=lambda k: math.inf if math.isnan(devs[k]) else devs[k])
    return name, devs[name]


class Rollback:
    """A phase's last good state (taken at each epoch's start), and lowering its learning rate.

    The lowered rate persists: the scheduler's base rates are scaled with the optimizer's, and
    each param group records its ``lr_scale`` and ``recoveries`` (saved in last.pt with the
    optimizer's state, so a resumed run keeps both).
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, scaler, factor: float, bound: int):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.factor, self.bound = factor, bound
        self.saved: dict | None = None

    @property
    def used(self) -> int:
        return int(self.optimizer.param_groups[0].get("recoveries", 0))

    @property
    def left(self) -> bool:
        return self.used < self.bound

    def resumed(self) -> None:
        """After a last.pt state was loaded: rescale the rebuilt scheduler's base rates to the saved scale."""
        scale = self.optimizer.param_groups[0].get("lr_scale", 1.0)
        self.scheduler.base_lrs = [b * scale for b in self.scheduler.base_lrs]

    def save(self, epoch_state) -> None:
        if not self.bound:
            return
        self.saved = {
            "model": copy.deepcopy(self.model.state_dict()), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch_state": dataclasses.replace(epoch_state, sums=list(epoch_state.sums)),
        }

    def restore(self):
        """Go back to the saved state with the learning rate × factor; returns (old lr, new lr, the saved epoch state)."""
        used, scale = self.used, self.optimizer.param_groups[0].get("lr_scale", 1.0)
        old, s = self.optimizer.param_groups[0]["lr"], self.saved
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(copy.deepcopy(s["optimizer"]))
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        # the saved state may predate earlier lowerings (in this epoch): apply all of them
        total = scale * self.factor / self.optimizer.param_groups[0].get("lr_scale", 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] *= total
            if "initial_lr" in group:  # the scheduler's record of the starting rate
                group["initial_lr"] *= total
            group["lr_scale"] = scale * self.factor
            group["recoveries"] = used + 1
        self.scheduler.base_lrs = [b * total for b in self.scheduler.base_lrs]
        saved = s["epoch_state"]
        return old, self.optimizer.param_groups[0]["lr"], dataclasses.replace(saved, sums=list(saved.sums))
