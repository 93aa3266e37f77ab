"""lrexport: learn low-rank CNNs (SVD training, energy pruning, finetuning) and deploy them."""

from .errors import LrexportError
from .lowrank import count_macs, decompose, energy_rank, hoyer, l1, layer_ranks, orthogonality, prune
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "LrexportError", "create_model", "list_models", "decompose", "layer_ranks", "orthogonality",
    "l1", "hoyer", "prune", "energy_rank", "count_macs", "__version__",
]
