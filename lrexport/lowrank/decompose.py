"""Replace a model's Conv2d (and optionally Linear) layers by their exact SVD form, and say of every
conv and linear layer whether it was, or why not."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Mapping

from torch import nn

from ..errors import LrexportError
from . import macs as M
from .probe import input_sizes
from .svd_layers import MODES, SVDConv2d, SVDLinear, break_even, conv_macs, matrix_shape, svd_layers

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)  # every layer the inventory lists


@dataclass
class LayerStatus:
    """One conv or linear layer of a model: decomposed, or left dense and why."""

    name: str
    type: str  # the module's class name
    shape: str  # "64→128 3×3 /2"
    decomposed: bool
    reason: str = ""  # why it stays dense

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"{m.in_features}→{m.out_features}"
    stride = "" if set(m.stride) == {1} else f" /{'×'.join(map(str, dict.fromkeys(m.stride)))}"
    return f"{m.in_channels}→{m.out_channels} {'×'.join(map(str, m.kernel_size))}{stride}"


def _why_dense(module: nn.Module, linear: bool) -> str | None:
    """Why a layer cannot take the SVD form (one factor pair over all input channels, zero padding), or None."""
    if isinstance(module, nn.Linear):
        return None if linear else "Linear, decompose.linear = false"
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__}: only Conv2d and Linear layers are decomposed"
    if type(module).forward is not nn.Conv2d.forward:  # e.g. timm's Conv2dSame pads in its forward
        return f"{type(module).__name__} has a forward of its own"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind}, groups={module.groups}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    return None


def _matches(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def select_layers(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = (), linear: bool = False
) -> list[str]:
    """Names of decomposable layers matched by an ``include`` pattern and no ``exclude`` pattern.

    Patterns are shell-style (``layer1.*``, ``*.conv2``) on qualified module names; a pattern
    that matches no decomposable layer is an error, since it is almost always a typo.
    """
    include, exclude = list(include), list(exclude)
    names = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and _why_dense(m, linear) is None]
    if not names:  # say why, rather than that a pattern matched nothing
        why = [f"{n}: {_why_dense(m, linear)}" for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
        raise LrexportError(f"the model has no decomposable layer ({'; '.join(why[:2]) + ('; …' if len(why) > 2 else '') if why else 'no Conv2d or Linear layer'})")
    for pattern in include + exclude:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise LrexportError(f"layer pattern {pattern!r} matches no decomposable layer (e.g. {names[:3]})")
    return [n for n in names if _matches(n, include, exclude)]


def _costs_less(module: nn.Module, mode: str, in_hw) -> bool:
    """Whether some rank's factored pair costs fewer MACs than the dense layer at this input size."""
    if isinstance(module, nn.Linear):
        i, o = module.in_features, module.out_features
        dense, per_rank, full = M.linear_macs(i, o), M.linear_macs(i, o, 1), min(i, o)
    else:
        c, n, k = module.in_channels, module.out_channels, module.kernel_size
        dense, per_rank = conv_macs(c, n, k, module.stride, module.padding, module.dilation, mode, in_hw, 1)
        full = min(matrix_shape(c, n, k, mode))
    return break_even(dense, per_rank, full) > 1


def layer_status(model: nn.Module, mode: str = "channel", include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                 linear: bool = False, input_size=None) -> list[LayerStatus]:
    """Every conv and linear layer of ``model`` and whether ``decompose`` with these settings decomposes it.

    With ``input_size`` (C, H, W) one forward pass also finds the layers it does not call and
    those no rank of which costs fewer MACs than the dense layer; both stay dense.
    """
    include, exclude = list(include), list(exclude)
    selected = set(select_layers(model, include, exclude, linear))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    sizes = input_sizes(model, input_size, layers) if input_size is not None else None
    out = []
    for name, m in layers.items():
        reason = _why_dense(m, linear)
        if reason is None and name not in selected:
            reason = "excluded by decompose.exclude" if any(fnmatchcase(name, p) for p in exclude) else "not matched by decompose.include"
        if reason is None and sizes is not None:
            if name not in sizes:
                reason = "not called in the forward pass"
            elif not _costs_less(m, mode, sizes[name]):
                reason = "no rank costs fewer MACs than the dense layer"
        out.append(LayerStatus(name, type(m).__name__, _shape(m), reason is None, reason or ""))
    return out


def decompose(
    model: nn.Module,
    mode: str = "channel",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    linear: bool = False,
    ranks: Mapping[str, int] | None = None,
    input_size=None,
) -> nn.Module:
    """Swap the selected layers for SVD layers, in place, and return the model.

    Without ``ranks`` each layer becomes the exact SVD of its dense weights, so the output
    is unchanged; with ``input_size`` (C, H, W) layers the forward pass does not call, or that
    no rank makes cheaper, stay dense (``layer_status``). With ``ranks`` (name → rank, as saved
    with a checkpoint) the layers are built at those ranks for ``load_state_dict`` to fill:
    loading rebuilds, then loads.
    """
    if mode not in MODES:
        raise LrexportError(f"decomposition mode must be one of {', '.join(MODES)}; got {mode!r}")
    if ranks is None:
        names = [s.name for s in layer_status(model, mode, include, exclude, linear, input_size) if s.decomposed]
    else:
        names = list(ranks)
    for name in names:
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise LrexportError(f"checkpoint names layer {name!r}, which the model does not have") from None
        if ranks is None:
            new = SVDConv2d.from_dense(dense, mode) if isinstance(dense, nn.Conv2d) else SVDLinear.from_dense(dense)
        elif isinstance(dense, nn.Conv2d):
            new = SVDConv2d(
                dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding, dense.dilation,
                bias=dense.bias is not None, mode=mode, rank=ranks[name], init=False,
            )
        elif isinstance(dense, nn.Linear):
            new = SVDLinear(dense.in_features, dense.out_features, bias=dense.bias is not None, rank=ranks[name], init=False)
        else:
            raise LrexportError(f"layer {name!r} is a {type(dense).__name__}, not a Conv2d or Linear")
        _set_submodule(model, name, new)
    return model


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of each SVD layer: the data a checkpoint needs to rebuild the model."""
    return {name: layer.rank for name, layer in svd_layers(model)}
