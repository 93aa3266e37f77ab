"""Replace a model's Conv2d (and optionally Linear) layers by their exact SVD form."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Mapping

from torch import nn

from ..errors import LrexportError
from .svd_layers import MODES, SVDConv2d, SVDLinear, svd_layers


def _why_dense(conv: nn.Conv2d) -> str | None:
    """Why a conv cannot take the SVD form (one factor pair over all input channels, zero padding)."""
    if conv.groups != 1:
        return f"grouped, groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


def _decomposable(module: nn.Module, linear: bool) -> bool:
    if isinstance(module, nn.Conv2d):
        return _why_dense(module) is None
    return linear and isinstance(module, nn.Linear)


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
    names = [n for n, m in model.named_modules() if _decomposable(m, linear)]
    for pattern in include + exclude:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise LrexportError(f"layer pattern {pattern!r} matches no decomposable layer (e.g. {names[:3]})")
    return [n for n in names if _matches(n, include, exclude)]


def undecomposable_layers(model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> dict[str, str]:
    """Convs the patterns select that stay dense because the SVD form cannot express them: name -> why.

    ``select_layers`` leaves them out without a word; the run summary names them.
    """
    include, exclude = list(include), list(exclude)
    return {n: why for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and (why := _why_dense(m)) and _matches(n, include, exclude)}


def decompose(
    model: nn.Module,
    mode: str = "channel",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    linear: bool = False,
    ranks: Mapping[str, int] | None = None,
) -> nn.Module:
    """Swap the selected layers for SVD layers, in place, and return the model.

    Without ``ranks`` each layer becomes the exact SVD of its dense weights, so the output
    is unchanged. With ``ranks`` (name → rank, as saved with a checkpoint) the layers are
    built at those ranks for ``load_state_dict`` to fill: loading rebuilds, then loads.
    """
    if mode not in MODES:
        raise LrexportError(f"decomposition mode must be one of {', '.join(MODES)}; got {mode!r}")
    names = select_layers(model, include, exclude, linear) if ranks is None else list(ranks)
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
