"""One registry of models by name: CIFAR ResNets here, any torchvision classifier beside, any timm
model as ``timm/NAME`` and a user's own factory as ``package.module:factory`` (lrexport.models.external)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from ..errors import CheckpointError, ModelError
from .cifar_resnet import CifarResNet
from .external import TIMM_PREFIX, TIMM_WEIGHTS, imported_model, is_import_path, module_input, timm_input, timm_model

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
            raise ModelError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        return CifarResNet(depth, num_classes=num_classes, shortcut=shortcut, **kw)

    register_model(f"cifar_resnet{_depth}")(_builder)


def list_models() -> list[str]:
    """Our own models, then torchvision's classification models (timm's and import paths are not listed)."""
    return sorted(_REGISTRY) + sorted(torchvision.models.list_models(module=torchvision.models))


WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")


def create_model(name: str, *, num_classes: int = 1000, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a model by name: a registered one, a torchvision classifier, ``timm/NAME`` or ``package.module:factory``.

    ``weights`` is a local state-dict file (.pt/.pth/.bin/.safetensors); for torchvision models it may
    name a weights enum member (``"DEFAULT"``, ``"IMAGENET1K_V1"``), for timm models ``"pretrained"``
    (timm's own weights); both download.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    local = weights is not None and Path(weights).suffix in WEIGHT_FILES
    if name.startswith(TIMM_PREFIX):
        if weights is not None and not local and weights != TIMM_WEIGHTS:
            raise ModelError(f"model.weights for {name} is a state-dict file or {TIMM_WEIGHTS!r} (timm's own); got {weights!r}")
        model = timm_model(name, num_classes, weights == TIMM_WEIGHTS, kwargs)
    elif is_import_path(name):
        if weights is not None and not local:
            raise ModelError(f"model.weights for {name} must be a state-dict file ({', '.join(WEIGHT_FILES)}); got {weights!r}")
        model = imported_model(name, num_classes, kwargs)
    elif name in _REGISTRY:
        if weights is not None and not local:
            raise ModelError(f"model {name!r} has no built-in weights; give a state-dict file (.pt/.pth), got {weights!r}")
        model = _build(name, _REGISTRY[name], num_classes=num_classes, **kwargs)
    elif name in torchvision.models.list_models(module=torchvision.models):
        tv_weights = None
        if weights is not None and not local:
            try:
                tv_weights = torchvision.models.get_model_weights(name)[weights]
            except KeyError:
                choices = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
                raise ModelError(f"unknown weights {weights!r} for {name}; choose from {choices} or a .pt file") from None
            if num_classes != len(tv_weights.meta["categories"]):
                raise ModelError(
                    f"weights {weights!r} of {name} have {len(tv_weights.meta['categories'])} classes, recipe asks for {num_classes}"
                )
        try:
            model = _build(name, torchvision.models.get_model, name, weights=tv_weights, num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError) as e:  # download failed
            raise ModelError(f"could not fetch torchvision weights {weights!r} for {name}: {e}") from None
    else:
        raise ModelError(f"unknown model {name!r}; see `lrexport models` for the names, or give timm/NAME or package.module:factory")
    if local:
        load_state_dict_file(model, weights)
    return model


def model_input(name: str | nn.Module, kwargs: dict | None = None) -> dict | None:
    """The input a model (by name, or a module) was made for, where it says (timm's pretrained config):
    channels, image_size, mean, std."""
    if isinstance(name, nn.Module):
        return module_input(name)
    return timm_input(name, kwargs or {}) if name.startswith(TIMM_PREFIX) else None


def _build(name: str, builder: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """Call a model builder; keyword arguments it refuses (recipe model.kwargs) are one clear error."""
    try:
        return builder(*args, **kwargs)
    except (TypeError, ValueError) as e:
        shown = {k: v for k, v in kwargs.items() if k not in ("weights", "num_classes")}
        raise ModelError(f"model {name!r} cannot be built with model.kwargs = {shown}: {str(e).splitlines()[0][:200]}") from None


class WeightsError(CheckpointError):
    """model.weights: a file that is missing, not a state dict, or does not fit the model."""

    exit_code = 2


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load a dense state dict (plain, or wrapped under 'model'/'state_dict') into ``model``; a WeightsError (exit 2) if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":  # timm's and Hugging Face's format: tensors only, no pickle
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # a foreign pickle makes torch warn before it refuses it
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message runs to many lines and suggests weights_only=False
        raise WeightsError(f"cannot read weights file {path}: not a torch.save'd state dict, or a damaged one "
                              f"({e.__class__.__name__})") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise WeightsError(f"weights file {path} does not match the model: {' '.join(first[:3])[:300]}") from None
