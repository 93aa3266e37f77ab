"""A pruned model's structure as data: what changed per module, and rebuilding it.

Pruning narrows modules in place (Torch-Pruning slices their tensors and updates attributes
such as ``out_channels``). The record keeps, for each module that changed, those attributes
and the shapes of its own parameters and buffers; applying it to the unpruned model replaces
them with empty tensors of the recorded shapes, ready for ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

# the width attributes of torch's layers that pruning may change (others are left as built)
WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "num_channels", "num_groups", "normalized_shape", "embed_dim")


def _own_tensors(module: nn.Module) -> dict[str, list[int]]:
    tensors = {n: t for n, t in module.named_parameters(recurse=False) if t is not None}
    tensors |= {n: t for n, t in module.named_buffers(recurse=False) if t is not None}
    return {n: list(t.shape) for n, t in tensors.items()}


def _attrs(module: nn.Module) -> dict:
    """The width attributes the module holds itself (a wrapper's read-only property, as timm's ConvNormAct has, is not one)."""
    out = {}
    for a in WIDTH_ATTRS:
        v = vars(module).get(a)
        if isinstance(v, int) and not isinstance(v, bool):
            out[a] = v
        elif isinstance(v, tuple) and all(isinstance(i, int) for i in v):
            out[a] = list(v)
    return out


def snapshot(model: nn.Module) -> dict[str, dict]:
    """Every module's width attributes and tensor shapes, before pruning."""
    return {name: {"attrs": _attrs(m), "shapes": _own_tensors(m)} for name, m in model.named_modules()}


def record_structure(model: nn.Module, before: dict[str, dict]) -> dict[str, dict]:
    """The modules of ``model`` whose widths or shapes differ from ``before`` (a ``snapshot``)."""
    now = snapshot(model)
    return {name: entry for name, entry in now.items() if name in before and entry != before[name]}


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Narrow ``model`` (built unpruned) to ``structure``; its tensors are then uninitialised."""
    for name, entry in structure.items():
        module = model.get_submodule(name)
        for attr, value in entry["attrs"].items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for tname, shape in entry["shapes"].items():
            old = getattr(module, tname)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, tname, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(tname, new)
    return model


def layer_widths(before: dict[str, dict], model: nn.Module) -> dict[str, dict]:
    """Per conv and linear layer whose width changed: input and output channels, before and after."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in before:
            key_in, key_out = ("in_channels", "out_channels") if isinstance(m, nn.Conv2d) else ("in_features", "out_features")
            was, now = before[name]["attrs"], _attrs(m)
            if (was[key_in], was[key_out]) != (now[key_in], now[key_out]):
                out[name] = {"in": [was[key_in], now[key_in]], "out": [was[key_out], now[key_out]]}
    return out
