"""Models from outside the registry: a user's factory by import path, and timm's models by name.

``model.name = "package.module:factory"`` imports ``package.module`` (from ``sys.path``, then the
current directory, where a user runs ``lrexport`` beside their code) and calls ``factory(**model.kwargs)``,
with ``num_classes`` where the factory takes it. ``model.name = "timm/NAME"`` builds timm's model;
timm is an optional extra. Every failure is one ModelError line naming the model.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable

from torch import nn

from ..errors import ModelError, RuntimeMissingError, first_line

TIMM_PREFIX = "timm/"
TIMM_WEIGHTS = "pretrained"  # model.weights that asks for timm's own pretrained weights


def is_import_path(name: str) -> bool:
    return ":" in name and not name.startswith(TIMM_PREFIX)


def _import(module_name: str, path: str):
    """Import ``module_name`` from the Python path, else from the current directory."""
    while True:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name == e.name or module_name.startswith(f"{e.name}.")):
                # the user's module imports something that is not installed
                raise ModelError(f"model {path!r}: importing {module_name} failed: {first_line(e)}") from None
            cwd = os.getcwd()
            if cwd in sys.path or "" in sys.path:
                raise ModelError(f"model {path!r}: no module named {module_name!r} on the Python path or in {cwd}") from None
            sys.path.append(cwd)  # `lrexport` (a console script) does not put the current directory on the path itself
        except Exception as e:  # the user's module raised while importing
            raise ModelError(f"model {path!r}: importing {module_name} failed: {first_line(e)}") from None


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """The callable that ``package.module:attr.attr`` names."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise ModelError(f"model {path!r} is not an import path: write it as package.module:factory")
    obj = _import(module_name, path)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {path!r}: {attr} is a {type(obj).__name__}, not a function or class")
    return obj


def _takes(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or extension without a signature: do not guess
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def imported_model(path: str, num_classes: int, kwargs: dict) -> nn.Module:
    """``factory(num_classes=..., **kwargs)`` of the import path (``num_classes`` only where it takes it)."""
    factory = resolve_factory(path)
    args = ({"num_classes": num_classes} if num_classes and _takes(factory, "num_classes") else {}) | kwargs
    try:
        model = factory(**args)
    except Exception as e:
        raise ModelError(f"model {path!r}: the factory raised {first_line(e)} (model.kwargs = {kwargs})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {path!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# -- timm ---------------------------------------------------------------------------------------
def _timm():
    try:
        import timm
    except ImportError:
        raise RuntimeMissingError('timm is not installed: pip install "lrexport[timm]"') from None
    return timm


def timm_model(name: str, num_classes: int, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm's ``name`` (``timm/`` stripped), randomly initialised or with timm's pretrained weights."""
    timm = _timm()
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:8]}*")[:5]
        raise ModelError(f"unknown timm model {arch!r}" + (f"; close names: {', '.join(close)}" if close else ""))
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes or None, **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"timm model {arch!r} cannot be built with model.kwargs = {kwargs}: {first_line(e)}") from None
    except Exception as e:  # hub download failures come as OSError, requests' and huggingface_hub's own errors
        if not pretrained:
            raise ModelError(f"timm model {arch!r} cannot be built: {first_line(e)}") from None
        raise ModelError(f"could not fetch timm's pretrained weights for {arch!r} ({first_line(e)}); "
                         "give a downloaded state dict as model.weights instead") from None


def _input_of(cfg, channels: int | None = None) -> dict | None:
    """{"channels", "image_size", "mean", "std"} of a timm pretrained config (a PretrainedCfg or its dict)."""
    get = cfg.get if isinstance(cfg, dict) else lambda key: getattr(cfg, key, None)
    size, mean, std = get("input_size"), get("mean"), get("std")
    if not (size and mean and std):
        return None
    channels = int(channels or size[0])
    mean, std = list(mean), list(std)
    if channels != len(mean):  # timm averages the colour statistics for other channel counts too
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return {"channels": channels, "image_size": int(size[-1]), "mean": mean, "std": std}


def timm_input(name: str, kwargs: dict) -> dict | None:
    """timm's pretrained config for ``name``, as ``_input_of`` gives it, or None."""
    cfg = _timm().models.get_pretrained_cfg(name.removeprefix(TIMM_PREFIX))
    return None if cfg is None else _input_of(cfg, kwargs.get("in_chans"))


def module_input(module: nn.Module) -> dict | None:
    """The input a module passed in from Python says it was made for: a timm model's ``pretrained_cfg``, else None."""
    cfg = getattr(module, "pretrained_cfg", None)
    return _input_of(cfg) if isinstance(cfg, dict) else None
