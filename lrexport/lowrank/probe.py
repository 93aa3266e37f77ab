"""One eval-mode forward pass with hooks: what each layer is called with (the MAC count, break-even ranks)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def probe(model: nn.Module, input_size, hooks: list) -> None:
    """Run one image of ``input_size`` (C, H, W), zeros, through ``model`` in eval mode; then restore its
    mode and remove ``hooks`` (the handles the caller registered)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def input_sizes(model: nn.Module, input_size, layers: dict[str, nn.Module]) -> dict[str, tuple[int, int] | None]:
    """name → spatial (H, W) input size of each of ``layers`` (None for a non-image input) in one
    forward pass; a layer the pass does not call is absent."""
    sizes = {}

    def hook_for(name: str):
        def hook(module, inputs):
            sizes[name] = tuple(inputs[0].shape[-2:]) if inputs[0].dim() == 4 else None

        return hook

    probe(model, input_size, [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()])
    return sizes
