"""Training: checkpoints, the epoch loop and the phase pipeline.

Names load on first use (as in ``lrexport/__init__``): importing ``lrexport.train.checkpoint``
or any one submodule does not pull in the whole pipeline.
"""

from importlib import import_module

_LAZY = {
    "build_model": ".checkpoint", "load_checkpoint": ".checkpoint", "load_model": ".checkpoint", "save_checkpoint": ".checkpoint",
    "Loss": ".loop", "evaluate": ".loop", "train_one_epoch": ".loop",
    "Pipeline": ".pipeline", "RunResult": ".pipeline", "run_recipe": ".pipeline",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'lrexport.train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
