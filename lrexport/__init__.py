"""lrexport: learn low-rank CNNs (SVD training, energy pruning, finetuning) and deploy them.

The public names load on first use (module ``__getattr__``), so torch-free parts such as
``lrexport.deploy.runtime`` and ``lrexport infer`` can run where torch is not installed.
"""

from importlib import import_module

from .errors import LrexportError

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "create_model": ".models", "list_models": ".models",
    "decompose": ".lowrank", "layer_ranks": ".lowrank", "orthogonality": ".lowrank", "l1": ".lowrank",
    "hoyer": ".lowrank", "prune": ".lowrank", "energy_rank": ".lowrank", "count_macs": ".lowrank",
    # one function per CLI command: recipe → train → export → verify → infer, and sweep / report
    "load_recipe": ".recipe", "run_recipe": ".train", "export_run": ".deploy.export",
    "verify_artifacts": ".deploy.verify", "infer": ".deploy.runtime", "run_sweep": ".sweep", "build_report": ".report",
}

# subpackages reachable as attributes (``lrexport.lowrank.SVDConv2d``) without an import
_SUBMODULES = {"data", "deploy", "lowrank", "models", "plots", "recipe", "report", "seed_results", "sweep", "train"}

__all__ = ["LrexportError", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lrexport' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
