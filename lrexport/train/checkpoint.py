"""Checkpoints: written atomically, loaded with weights_only=True, rebuilt from data.

A checkpoint holds ``arch`` (model name, num_classes, model kwargs, the widths channel pruning
left, decomposition mode and per-layer ranks, input size), the state dict under ``model``, and
whatever training state the writer adds (phase, epoch, optimizer, scheduler, rng, metrics).
Loading rebuilds the model from ``arch`` and then loads the weights; no modules are unpickled.
A model that was passed in from Python (``run_recipe(..., model=m)``, ``arch["given"]``) has no
name to rebuild it by: loading takes that module again as ``base``.
"""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..channels import apply_structure
from ..errors import CheckpointError, LrexportError
from ..io import atomic_write_bytes
from ..lowrank import decompose, layer_ranks, svd_layers
from ..models import create_model

FORMAT_VERSION = 1


def class_path(module: nn.Module) -> str:
    """``package.module.Class`` of a module: what names a model passed in from Python."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def model_arch(model: nn.Module, name: str, num_classes: int, input_size, model_kwargs: dict | None = None,
               given: bool = False, channels: dict | None = None) -> dict:
    """The data needed to rebuild ``model``: what a checkpoint stores beside the weights.

    ``given``: the model was passed in from Python; ``name`` is then its class path. ``channels``:
    what channel pruning narrowed (lrexport.channels.structure), applied before the decomposition.
    """
    layers = svd_layers(model)
    modes = {layer.mode for _, layer in layers} - {"linear"}
    return {
        "model": name,
        "given": given,
        "num_classes": int(num_classes),
        "model_kwargs": dict(model_kwargs or {}),
        "input_size": [int(v) for v in input_size],
        "channels": channels or None,
        "decomposition": None
        if not layers
        else {"mode": modes.pop() if modes else "channel", "ranks": layer_ranks(model)},
    }


class GivenModelError(CheckpointError):
    """A checkpoint of a model passed in from Python, loaded without that model."""

    exit_code = 2


def _given(arch: dict, base: nn.Module | None) -> nn.Module:
    """A copy of ``base``, the module a checkpoint's model was built from in Python."""
    if base is None:
        raise GivenModelError(f"this run's model was passed to lrexport from Python ({arch['model']}); there is no name to rebuild "
                              "it by: pass the same module again (model= of export_run, run_recipe or load_model)")
    if class_path(base) != arch["model"]:
        raise GivenModelError(f"the module given is a {class_path(base)}; this run's model is a {arch['model']}")
    return copy.deepcopy(base)


def build_model(arch: dict, base: nn.Module | None = None) -> nn.Module:
    """Rebuild the (possibly decomposed) model described by ``arch``, weights uninitialised.

    ``base``: the module the run started from, for a model that was passed in from Python.
    """
    try:
        if arch.get("given"):
            model = _given(arch, base)
        else:
            model = create_model(arch["model"], num_classes=arch["num_classes"], **arch.get("model_kwargs", {}))
        if arch.get("channels"):
            apply_structure(model, arch["channels"])
        dec = arch.get("decomposition")
        if dec:
            decompose(model, mode=dec["mode"], ranks=dec["ranks"])
    except GivenModelError:
        raise
    except LrexportError as e:
        raise type(e)(f"the model a checkpoint describes cannot be built: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # an arch entry of the wrong shape
        raise CheckpointError(f"a checkpoint's model description is damaged ({e.__class__.__name__}: {str(e)[:100]})") from None
    return model


def load_weights(model: nn.Module, state: dict, path: str | Path) -> None:
    """``model.load_state_dict(state)``; a mismatch is one CheckpointError naming ``path``."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match its model: {' '.join(str(e).split())[:300]}") from None


def save_checkpoint(path: str | Path, model: nn.Module, arch: dict, **state: Any) -> None:
    """Write a checkpoint atomically: a failed write (WriteError) leaves the previous one whole."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, "arch": arch, "model": model.state_dict(), **state}, buf)
    atomic_write_bytes(path, buf.getvalue(), "checkpoint")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if zipfile.is_zipfile(path):  # torch.load reads damaged tensor bytes without complaint; the zip CRCs catch them
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt ({e.__class__.__name__})") from None
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: its entry {bad} fails its checksum")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an lrexport checkpoint (no 'arch'/'model' entries)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('format_version')}, this lrexport reads {FORMAT_VERSION}")
    return ckpt


def load_model(path: str | Path, base: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes, load its weights; returns (model, checkpoint).

    ``base``: the module the run started from, for a model that was passed in from Python.
    """
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"], base)
    load_weights(model, ckpt["model"], path)
    return model, ckpt
