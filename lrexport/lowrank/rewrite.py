"""Rewrite a low-rank model into plain modules for export (DESIGN §1, §6).

Each SVD layer becomes either a pair of plain convs (s folded into the first) with its
rank aligned upward by zero-padding, or, at or above its break-even rank, one dense conv.
BatchNorm is then folded into the conv before it, so the graph holds only standard ops.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from .adaptive_pool import matmul_adaptive_pools
from .probe import input_sizes
from .svd_layers import SVDConv2d, SVDLinear, svd_layers
from .tracing import RewriteError, fixed_read, node_values, sample_input, trace  # noqa: F401 (RewriteError, node_values: imported from here)


def aligned_rank(rank: int, multiple_of: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple_of`` (zero-padding keeps the output)."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be ≥ 1, got {multiple_of}")
    return math.ceil(rank / multiple_of) * multiple_of


@dataclass
class LayerPlan:
    """How one SVD layer is deployed."""

    name: str
    kind: str  # "svd-channel", "svd-spatial", "svd-linear"
    rank: int  # as trained
    full_rank: int
    break_even: int
    deployed_rank: int | None  # rank of the thin pair after alignment; None when merged to dense
    in_hw: tuple[int, int] | None = None

    @property
    def dense(self) -> bool:
        return self.deployed_rank is None

    def to_dict(self) -> dict:
        return asdict(self) | {"dense": self.dense}


@dataclass
class RewriteReport:
    layers: list[LayerPlan] = field(default_factory=list)
    multiple_of: int = 1
    bn_folded: int = 0
    bn_left: int = 0  # BatchNorms with no conv right before them stay as they are

    def to_dict(self) -> dict:
        return {
            "multiple_of": self.multiple_of, "bn_folded": self.bn_folded, "bn_left": self.bn_left,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def plan_layers(model: nn.Module, input_size, multiple_of: int = 8, plan: dict | None = None) -> list[LayerPlan]:
    """Deployment decision for every SVD layer of ``model`` at ``input_size`` (C, H, W).

    By default a layer's rank is aligned up to ``multiple_of`` and merged to dense at or
    above break-even. ``plan`` (name → deployed rank or "dense", e.g. from measured
    latency) overrides that per layer; a rank must be ≥ the layer's own (zero-padding
    changes no output, dropping values would change the model).
    """
    plan = dict(plan or {})
    layers = svd_layers(model)
    sizes = input_sizes(model, input_size, dict(layers))  # break-even depends on each layer's input size
    plans = []
    unknown = sorted(set(plan) - {name for name, _ in layers})
    if unknown:
        raise ValueError(f"plan names layers that are not SVD layers of the model: {unknown}")
    for name, layer in layers:
        if name not in sizes:
            raise ValueError(f"SVD layer {name!r} is not used in the forward pass")
        in_hw = sizes[name]
        kind = "svd-linear" if isinstance(layer, SVDLinear) else f"svd-{layer.mode}"
        even = layer.break_even_rank(in_hw)
        if name in plan:
            deployed = _planned_rank(name, plan[name], layer.rank)
        else:
            rank = aligned_rank(layer.rank, multiple_of)
            # padding up to or past break-even would cost more than the dense layer
            deployed = None if rank >= even else rank
        plans.append(LayerPlan(name, kind, layer.rank, layer.full_rank, even, deployed, in_hw))
    return plans


def _planned_rank(name: str, value, rank: int) -> int | None:
    if value == "dense":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"plan for {name!r} must be a rank or 'dense', got {value!r}")
    if value < rank:
        raise ValueError(f"plan deploys {name!r} at rank {value}, below its rank {rank}: that would change the model")
    return value


def _pad_rank(w1: torch.Tensor, w2: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of the first factor and zero columns of the second: the extra channels are exactly 0."""
    extra = rank - w1.shape[0]
    if extra == 0:
        return w1, w2
    w1 = torch.cat([w1, w1.new_zeros(extra, *w1.shape[1:])], 0)
    w2 = torch.cat([w2, w2.new_zeros(w2.shape[0], extra, *w2.shape[2:])], 1)
    return w1, w2


@torch.no_grad()
def _plain_conv(layer: SVDConv2d, plan: LayerPlan) -> nn.Module:
    n, c, k = layer.out_channels, layer.in_channels, layer.kernel_size
    bias = layer.bias is not None
    if plan.dense:
        conv = nn.Conv2d(c, n, k, layer.stride, layer.padding, layer.dilation, bias=bias)
        conv.weight.copy_(layer.dense_weight())
        if bias:
            conv.bias.copy_(layer.bias)
        return conv
    w1, w2 = _pad_rank(*layer.factor_weights(), plan.deployed_rank)
    g1, g2 = layer.pair_geometry()
    first = nn.Conv2d(c, w1.shape[0], tuple(w1.shape[-2:]), bias=False, **g1)
    second = nn.Conv2d(w1.shape[0], n, tuple(w2.shape[-2:]), bias=bias, **g2)
    first.weight.copy_(w1)
    second.weight.copy_(w2)
    if bias:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


@torch.no_grad()
def _plain_linear(layer: SVDLinear, plan: LayerPlan) -> nn.Module:
    bias = layer.bias is not None
    if plan.dense:
        lin = nn.Linear(layer.in_features, layer.out_features, bias=bias)
        lin.weight.copy_(layer.dense_weight())
        if bias:
            lin.bias.copy_(layer.bias)
        return lin
    w1, w2 = _pad_rank(layer.s[:, None] * layer.V, layer.U, plan.deployed_rank)
    first = nn.Linear(layer.in_features, w1.shape[0], bias=False)
    second = nn.Linear(w1.shape[0], layer.out_features, bias=bias)
    first.weight.copy_(w1)
    second.weight.copy_(w2)
    if bias:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def _batchnorms(gm: fx.GraphModule) -> int:
    """BatchNorm ops in a traced graph: BatchNorm modules, and F.batch_norm where a module of its own (timm's
    BatchNormAct2d) calls it."""
    modules = dict(gm.named_modules())
    return sum((n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm))
               or (n.op == "call_function" and n.target is F.batch_norm) for n in gm.graph.nodes)


def fold_batchnorm(model: nn.Module, input_size) -> tuple[fx.GraphModule, int, int]:
    """Trace ``model`` with torch.fx for inputs of ``input_size`` (C, H, W) and fold each BatchNorm into the
    conv/linear before it.

    Returns (graph module, folded count, BatchNorms left). The model must be in eval mode.
    """
    traced = trace(model, input_size)
    before = _batchnorms(traced)
    fused = fuse(traced, inplace=True, no_trace=True)
    left = _batchnorms(fused)
    return fused, before - left, left


def freeze_static_shapes(gm: fx.GraphModule, input_size) -> int:
    """Replace reads of non-batch tensor dimensions (``x.shape[1]``, ``x.size(2)``) by their values.

    Such reads would otherwise export as Shape/Gather arithmetic; only the batch size can
    vary at run time, so every other dimension is a constant. Returns how many were frozen.
    """
    values = node_values(gm, sample_input(gm, input_size))

    frozen = 0
    for node in list(gm.graph.nodes):
        if fixed_read(node, values) and isinstance(values.get(node.name), int):
            value = values[node.name]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
            frozen += 1
    if frozen:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return frozen


def to_plain(
    model: nn.Module, input_size, multiple_of: int = 8, plan: dict | None = None
) -> tuple[fx.GraphModule, RewriteReport]:
    """A plain copy of ``model`` for export: thin conv pairs or dense convs, BN folded, eval mode.

    ``input_size`` is (C, H, W) of one image: break-even ranks depend on each layer's input
    size. ``plan`` (name → rank or "dense") overrides the default decision per layer (see
    ``plan_layers``). The original model is left untouched. Works on dense models too (BN folding only).
    """
    plans = plan_layers(model, input_size, multiple_of, plan)
    plain = copy.deepcopy(model).eval()
    for plan in plans:
        layer = plain.get_submodule(plan.name)
        new = _plain_linear(layer, plan) if isinstance(layer, SVDLinear) else _plain_conv(layer, plan)
        plain.set_submodule(plan.name, new.to(device=layer.U.device, dtype=layer.U.dtype))
    plain.eval()  # the new modules start in training mode; folding needs eval statistics
    plain, folded, left = fold_batchnorm(plain, input_size)
    freeze_static_shapes(plain, input_size)
    matmul_adaptive_pools(plain, sample_input(plain, input_size))
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain.eval(), RewriteReport(plans, multiple_of, folded, left)


@torch.no_grad()
def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ over the whole batch."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
