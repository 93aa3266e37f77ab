"""Regularizers of DESIGN §2, each summed over a model's SVD layers (not averaged)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..errors import LrexportError
from .svd_layers import svd_layers


class _GramDeviation(torch.autograd.Function):
    """‖A·Aᵀ − I‖²_F with its closed-form gradient 4·(A·Aᵀ − I)·A.

    Autograd of the plain expression spends two matmuls on the gradient of A·Aᵀ; the closed
    form needs one, which is a third of the term's cost at full rank (spatial-wise: 3n×3n).
    It runs in A's own precision even under autocast: in bf16 the deviation of a near-identity
    Gram matrix is mostly rounding.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):
            d = a @ a.T
        d.diagonal().sub_(1)
        ctx.save_for_backward(a, d)
        return (d * d).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        a, d = ctx.saved_tensors
        return (4 * grad) * (d @ a)


def orthogonality_of(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖UᵀU − I‖²_F / r² + ‖V·Vᵀ − I‖²_F / r² for U (rows×r), V (r×cols)."""
    r = v.shape[0]
    return (_GramDeviation.apply(u.T) + _GramDeviation.apply(v)) / r**2


def l1_of(s: torch.Tensor) -> torch.Tensor:
    return s.abs().sum()


def hoyer_of(s: torch.Tensor) -> torch.Tensor:
    """‖s‖₁ / ‖s‖₂ (of each row of a matrix): scale-invariant, 1 for a one-hot s, √r for a flat one."""
    return s.abs().sum(-1) / s.norm(dim=-1).clamp_min(1e-12)


def _summed(term: Callable[..., torch.Tensor], model: nn.Module, *attrs: str) -> torch.Tensor:
    layers = svd_layers(model)
    if not layers:
        return torch.zeros(())
    return torch.stack([term(*(getattr(layer, a) for a in attrs)) for _, layer in layers]).sum()


def orthogonality(model: nn.Module) -> torch.Tensor:
    return _summed(orthogonality_of, model, "U", "V")


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
