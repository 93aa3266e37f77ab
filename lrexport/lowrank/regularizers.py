"""Regularizers of DESIGN §2, each summed over a model's SVD layers (not averaged)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import LrexportError
from .svd_layers import svd_layers


def _gram_deviation(a: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    return ((a @ a.T - eye) ** 2).sum()


def orthogonality_of(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖UᵀU − I‖²_F / r² + ‖V·Vᵀ − I‖²_F / r² for U (rows×r), V (r×cols)."""
    r = v.shape[0]
    return (_gram_deviation(u.T) + _gram_deviation(v)) / r**2


def l1_of(s: torch.Tensor) -> torch.Tensor:
    return s.abs().sum()


def hoyer_of(s: torch.Tensor) -> torch.Tensor:
    """‖s‖₁ / ‖s‖₂: scale-invariant, 1 for a one-hot s, √r for a flat one."""
    return s.abs().sum() / s.norm().clamp_min(1e-12)


def _summed(term: Callable[..., torch.Tensor], model: nn.Module, *attrs: str) -> torch.Tensor:
    layers = svd_layers(model)
    if not layers:
        return torch.zeros(())
    return torch.stack([term(*(getattr(layer, a) for a in attrs)) for _, layer in layers]).sum()


def orthogonality(model: nn.Module) -> torch.Tensor:
    return _summed(orthogonality_of, model, "U", "V")


def l1(model: nn.Module) -> torch.Tensor:
    return _summed(l1_of, model, "s")


def hoyer(model: nn.Module) -> torch.Tensor:
    return _summed(hoyer_of, model, "s")


def no_sparsity(model: nn.Module) -> torch.Tensor:
    return torch.zeros((), device=next(model.parameters()).device)


SPARSITY = {"hoyer": hoyer, "l1": l1, "none": no_sparsity}


def sparsity(kind: str) -> Callable[[nn.Module], torch.Tensor]:
    try:
        return SPARSITY[kind]
    except KeyError:
        raise LrexportError(f"sparsity regularizer must be one of {', '.join(SPARSITY)}; got {kind!r}") from None
