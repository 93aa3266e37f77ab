from .decompose import LayerStatus, decompose, layer_ranks, layer_status, select_layers
from .macs import LayerMacs, MacReport, count_macs
from .prune import PruneResult, energy_dropped, energy_rank, prune, round_rank, rule_rank, truncate, truncated
from .regularizers import hoyer, l1, orthogonality, sparsity
from .svd_layers import SVDConv2d, SVDLinear, svd_layers

__all__ = [
    "SVDConv2d", "SVDLinear", "svd_layers", "decompose", "layer_ranks", "select_layers", "layer_status", "LayerStatus",
    "orthogonality", "l1", "hoyer", "sparsity", "energy_rank", "energy_dropped", "round_rank", "rule_rank", "truncate", "truncated", "prune",
    "PruneResult", "count_macs", "MacReport", "LayerMacs",
]
