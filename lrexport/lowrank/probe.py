"""One forward pass that records the input size each named layer is called with."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def input_sizes(model: nn.Module, input_size, layers: dict[str, nn.Module]) -> dict[str, tuple[int, int] | None]:
    """name → spatial (H, W) input size of each of ``layers`` (None for a non-image input) in an
    eval-mode forward pass of one image of ``input_size`` (C, H, W); a layer the pass does not call is absent."""
    sizes, hooks = {}, []
    for name, layer in layers.items():
        def hook(module, inputs, name=name):
            x = inputs[0]
            sizes[name] = tuple(x.shape[-2:]) if x.dim() == 4 else None

        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes
