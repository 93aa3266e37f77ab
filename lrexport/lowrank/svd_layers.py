"""Layers held in SVD form: W = U · diag(s) · V (DESIGN §1).

The training forward picks the cheaper of two exact computations: near full rank it
rebuilds the dense weight and runs one conv; at low rank it runs the two thin convs.
Both are differentiable in U, s and V, so the choice only changes speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from . import macs as M

MODES = ("channel", "spatial")


def conv_macs(c: int, n: int, kernel, stride, padding, dilation, mode: str, in_hw: tuple[int, int], rank: int) -> tuple[int, int]:
    """(dense, factored at ``rank``) MACs per image of a c→n conv in ``mode`` for an input of spatial size ``in_hw``."""
    (kh, kw), stride, padding, dilation = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    out_hw = tuple(M.conv_out(in_hw[i], (kh, kw)[i], stride[i], padding[i], dilation[i]) for i in (0, 1))
    dense = M.dense_conv_macs(c, n, kh, kw, out_hw)
    if mode == "channel":
        return dense, M.channel_macs(c, n, kh, kw, rank, out_hw)
    return dense, M.spatial_macs(c, n, kh, kw, rank, out_hw, mid_w=in_hw[1])


def matrix_shape(c: int, n: int, kernel, mode: str) -> tuple[int, int]:
    """(rows, cols) of a c→n conv's weight as the matrix ``mode`` factors: channel n × c·kh·kw, spatial n·kw × c·kh."""
    kh, kw = _pair(kernel)
    return (n, c * kh * kw) if mode == "channel" else (n * kw, c * kh)


def break_even(dense: int, per_rank: int, full_rank: int) -> int:
    """The smallest rank whose factored pair costs no less than the dense layer (``per_rank``: the pair's cost at rank 1)."""
    return min(full_rank + 1, math.ceil(dense / per_rank))


def _exact_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float64 so that the factors reproduce the dense layer to float32 rounding
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def _add_factors(layer: nn.Module, rows: int, cols: int, rank: int | None, bias: int) -> None:
    """Register U (rows×r), s (r), V (r×cols) and a bias of ``bias`` entries (none if 0), uninitialised;
    r is the full rank min(rows, cols) unless given."""
    layer.full_rank = min(rows, cols)
    rank = layer.full_rank if rank is None else rank
    if not 1 <= rank <= layer.full_rank:
        raise ValueError(f"rank must be in [1, {layer.full_rank}], got {rank}")
    layer.U = nn.Parameter(torch.empty(rows, rank))
    layer.s = nn.Parameter(torch.empty(rank))
    layer.V = nn.Parameter(torch.empty(rank, cols))
    layer.bias = nn.Parameter(torch.empty(bias)) if bias else None


class SVDConv2d(nn.Module):
    """A Conv2d as U (rows×r), s (r), V (r×cols) in channel-wise or spatial-wise form.

    channel: rows = n, cols = c·kh·kw; spatial: rows = n·kw, cols = c·kh.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        mode: str = "channel",
        rank: int | None = None,
        init: bool = True,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        _add_factors(self, *matrix_shape(in_channels, out_channels, self.kernel_size, mode), rank, out_channels if bias else 0)
        if init:  # skipped when a state dict will fill the factors anyway (an SVD per layer is not free)
            self.reset_parameters()

    # -- construction -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Training from scratch: the exact SVD of a Conv2d's default initialisation."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None)
        self.load_dense(conv.weight.data, None if conv.bias is None else conv.bias.data)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mode: str = "channel") -> "SVDConv2d":
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            bias=conv.bias is not None, mode=mode, init=False,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        layer.load_dense(conv.weight.data, None if conv.bias is None else conv.bias.data)
        return layer

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        u, s, vh = _exact_svd(self._to_matrix(weight))
        r = self.rank
        self.U.copy_(u[:, :r]), self.s.copy_(s[:r]), self.V.copy_(vh[:r])
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        n, c, kh, kw = weight.shape
        if self.mode == "channel":
            return weight.reshape(n, c * kh * kw)
        return weight.permute(0, 3, 1, 2).reshape(n * kw, c * kh)

    # -- views --------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def dense_weight(self) -> torch.Tensor:
        """U·diag(s)·V as an n×c×kh×kw conv weight."""
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        m = (self.U * self.s) @ self.V
        if self.mode == "channel":
            return m.reshape(n, c, kh, kw)
        return m.reshape(n, kw, c, kh).permute(0, 2, 3, 1)

    def factor_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv1, conv2) weights of the thin pair, s folded into conv1."""
        n, c, (kh, kw), r = self.out_channels, self.in_channels, self.kernel_size, self.rank
        first = self.s[:, None] * self.V
        if self.mode == "channel":
            return first.reshape(r, c, kh, kw), self.U.reshape(n, r, 1, 1)
        return first.reshape(r, c, kh, 1), self.U.reshape(n, kw, r).permute(0, 2, 1).reshape(n, r, 1, kw)

    def pair_geometry(self) -> tuple[dict, dict]:
        """stride/padding/dilation of conv1 and conv2 of the thin pair."""
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        if self.mode == "channel":
            return dict(stride=self.stride, padding=self.padding, dilation=self.dilation), dict(stride=1, padding=0, dilation=1)
        return dict(stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1)), dict(stride=(1, sw), padding=(0, pw), dilation=(1, dw))

    # -- cost -------------------------------------------------------------------------
    def macs(self, in_hw: tuple[int, int], rank: int | None = None) -> tuple[int, int]:
        """(dense, factored) MACs per image for an input of spatial size ``in_hw``."""
        return conv_macs(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.mode, in_hw, self.rank if rank is None else rank)

    def break_even_rank(self, in_hw: tuple[int, int]) -> int:
        """Smallest rank at which the factored pair costs no less than the dense conv."""
        return break_even(*self.macs(in_hw, rank=1), self.full_rank)

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, factored = self.macs(tuple(x.shape[-2:]))
        if factored >= dense:
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)
        w1, w2 = self.factor_weights()
        g1, g2 = self.pair_geometry()
        return F.conv2d(F.conv2d(x, w1, None, **g1), w2, self.bias, **g2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, mode={self.mode}, rank={self.rank}/{self.full_rank}, bias={self.bias is not None}"
        )


class SVDLinear(nn.Module):
    """A Linear as U (out×r), s (r), V (r×in)."""

    mode = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int | None = None, init: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        _add_factors(self, out_features, in_features, rank, out_features if bias else 0)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        self.load_dense(lin.weight.data, None if lin.bias is None else lin.bias.data)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mode: str | None = None) -> "SVDLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, init=False).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )
        layer.load_dense(linear.weight.data, None if linear.bias is None else linear.bias.data)
        return layer

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        u, s, vh = _exact_svd(weight)
        r = self.rank
        self.U.copy_(u[:, :r]), self.s.copy_(s[:r]), self.V.copy_(vh[:r])
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def dense_weight(self) -> torch.Tensor:
        return (self.U * self.s) @ self.V

    def macs(self, in_hw=None, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return M.linear_macs(self.in_features, self.out_features), M.linear_macs(self.in_features, self.out_features, r)

    def break_even_rank(self, in_hw=None) -> int:
        return break_even(*self.macs(rank=1), self.full_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, factored = self.macs()
        if factored >= dense:
            return F.linear(x, self.dense_weight(), self.bias)
        return F.linear(F.linear(x, self.s[:, None] * self.V), self.U, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}/{self.full_rank}, bias={self.bias is not None}"


SVD_LAYERS = (SVDConv2d, SVDLinear)


def svd_layers(model: nn.Module):
    """(name, layer) for every SVD layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVD_LAYERS)]
