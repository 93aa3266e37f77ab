"""One registry of models by name: CIFAR ResNets here, any torchvision classifier beside."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from ..errors import CheckpointError, LrexportError
from .cifar_resnet import CifarResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(fn: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


for _depth in (20, 32, 44, 56, 110):

    def _builder(*, num_classes: int = 10, shortcut: str = "B", depth: int = _depth, **kw) -> nn.Module:
        if shortcut not in ("A", "B"):
            raise LrexportError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        return CifarResNet(depth, num_classes=num_classes, shortcut=shortcut, **kw)

    register_model(f"cifar_resnet{_depth}")(_builder)


def list_models() -> list[str]:
    """Our own models, then torchvision's classification models."""
    return sorted(_REGISTRY) + sorted(torchvision.models.list_models(module=torchvision.models))


def create_model(name: str, *, num_classes: int = 1000, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a model by name.

    ``weights`` is a local state-dict file, or for torchvision models the name of a weights
    enum member (``"DEFAULT"``, ``"IMAGENET1K_V1"``), downloaded by torchvision.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    local = weights is not None and Path(weights).suffix in (".pt", ".pth", ".bin")
    if name in _REGISTRY:
        if weights is not None and not local:
            raise LrexportError(f"model {name!r} has no built-in weights; give a state-dict file (.pt/.pth), got {weights!r}")
        model = _build(name, _REGISTRY[name], num_classes=num_classes, **kwargs)
    elif name in torchvision.models.list_models(module=torchvision.models):
        tv_weights = None
        if weights is not None and not local:
            try:
                tv_weights = torchvision.models.get_model_weights(name)[weights]
            except KeyError:
                choices = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
                raise LrexportError(f"unknown weights {weights!r} for {name}; choose from {choices} or a .pt file") from None
            if num_classes != len(tv_weights.meta["categories"]):
                raise LrexportError(
                    f"weights {weights!r} of {name} have {len(tv_weights.meta['categories'])} classes, recipe asks for {num_classes}"
                )
        try:
            model = _build(name, torchvision.models.get_model, name, weights=tv_weights, num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError) as e:  # download failed
            raise LrexportError(f"could not fetch torchvision weights {weights!r} for {name}: {e}") from None
    else:
        raise LrexportError(f"unknown model {name!r}; see `lrexport models` for the names")
    if local:
        load_state_dict_file(model, weights)
    return model


def _build(name: str, builder: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """Call a model builder; keyword arguments it refuses (recipe model.kwargs) are one clear error."""
    try:
        return builder(*args, **kwargs)
    except (TypeError, ValueError) as e:
        shown = {k: v for k, v in kwargs.items() if k not in ("weights", "num_classes")}
        raise LrexportError(f"model {name!r} cannot be built with model.kwargs = {shown}: {str(e).splitlines()[0][:200]}") from None


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load a dense state dict (plain, or wrapped under 'model'/'state_dict') into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn before it refuses it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message runs to many lines and suggests weights_only=False
        raise CheckpointError(f"cannot read weights file {path}: not a torch.save'd state dict, or a damaged one "
                              f"({e.__class__.__name__})") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"weights file {path} does not match the model: {' '.join(first[:3])[:300]}") from None
