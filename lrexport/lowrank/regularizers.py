"""Regularizers of DESIGN §2, each summed over a model's SVD layers (not averaged)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..errors import LrexportError
from .svd_layers import svd_layers


class _Orthogonality(torch.autograd.Function):
    """Σ over (U, V) pairs of (‖UᵀU − I‖²_F + ‖V·Vᵀ − I‖²_F) / r², with the closed-form gradient.

    The gradient of ‖A·Aᵀ − I‖²_F is 4·(A·Aᵀ − I)·A: one matmul, where autograd of the plain
    expression spends two. All layers go through one Function, so autograd records one node
    instead of a dozen per layer; at CIFAR sizes that bookkeeping costs as much as the products.
    It runs in the factors' own precision even under autocast: in bf16 the deviation of a
    near-identity Gram matrix is mostly rounding.
    """

    @staticmethod
    def forward(ctx, *factors: torch.Tensor) -> torch.Tensor:  # U₁, V₁, U₂, V₂, …
        values, scaled = [], []
        with torch.autocast(factors[0].device.type, enabled=False):
            for u, v in zip(factors[::2], factors[1::2]):
                per_r2 = 1.0 / v.shape[0] ** 2
                for d in (u.T @ u, v @ v.T):
                    d.diagonal().sub_(1)
                    flat = d.view(-1)
                    values.append(torch.dot(flat, flat) * per_r2)
                    scaled.append(d.mul_(4 * per_r2))  # kept for backward as d·4/r²
        ctx.save_for_backward(*factors, *scaled)
        return torch.stack(values).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        saved = ctx.saved_tensors
        factors, scaled = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        grads = []
        for u, v, du, dv in zip(factors[::2], factors[1::2], scaled[::2], scaled[1::2]):
            grads += [(u @ du).mul_(grad), (dv @ v).mul_(grad)]
        return tuple(grads)


def orthogonality_of(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖UᵀU − I‖²_F / r² + ‖V·Vᵀ − I‖²_F / r² for U (rows×r), V (r×cols)."""
    return _Orthogonality.apply(u, v)


def l1_of(s: torch.Tensor) -> torch.Tensor:
    return s.abs().sum()


def hoyer_of(s: torch.Tensor) -> torch.Tensor:
    """‖s‖₁ / ‖s‖₂ (of each row of a matrix): scale-invariant, 1 for a one-hot s, √r for a flat one."""
    return s.abs().sum(-1) / s.norm(dim=-1).clamp_min(1e-12)


def orthogonality(model: nn.Module) -> torch.Tensor:
    factors = [f for _, layer in svd_layers(model) for f in (layer.U, layer.V)]
    return _Orthogonality.apply(*factors) if factors else torch.zeros(())


def _singular_values(model: nn.Module) -> list[torch.Tensor]:
    return [layer.s for _, layer in svd_layers(model)]


# The sparsity terms run on all layers' s at once: a handful of ops instead of a handful per
# layer, which is most of their cost at CIFAR sizes. Zero padding changes neither norm.
def l1(model: nn.Module) -> torch.Tensor:
    s = _singular_values(model)
    return l1_of(torch.cat(s)) if s else torch.zeros(())


def hoyer(model: nn.Module) -> torch.Tensor:
    s = _singular_values(model)
    return hoyer_of(pad_sequence(s, batch_first=True)).sum() if s else torch.zeros(())


def no_sparsity(model: nn.Module) -> torch.Tensor:
    return torch.zeros((), device=next(model.parameters()).device)


SPARSITY = {"hoyer": hoyer, "l1": l1, "none": no_sparsity}


def sparsity(kind: str) -> Callable[[nn.Module], torch.Tensor]:
    try:
        return SPARSITY[kind]
    except KeyError:
        raise LrexportError(f"sparsity regularizer must be one of {', '.join(SPARSITY)}; got {kind!r}") from None
