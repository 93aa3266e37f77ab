"""Deployment: runtimes (backends/), measured export plans (planning/), export, torch-free inference, verify.

Names load on first use so that ``lrexport.deploy.runtime`` stays importable without torch.
"""

from importlib import import_module

# public name -> module that defines it
_LAZY = {
    "export_run": ".export", "verify_artifacts": ".verify", "infer": ".runtime", "Classifier": ".runtime",
    "OrtRunner": ".backends.ort", "load_meta": ".runtime", "open_runner": ".backends", "RUNTIMES": ".backends",
    "RuntimeOptions": ".backends", "ExportConfig": ".export", "TuneConfig": ".planning.plan", "VerifyConfig": ".verify",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lrexport.deploy' has no attribute {name!r}")
