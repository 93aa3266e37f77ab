"""Structured filter (channel) pruning: fewer channels in plain layers, through Torch-Pruning.

``structure`` records what pruning changed as data (per module its new widths and tensor
shapes) and applies such a record to a freshly built model, so a checkpoint of a pruned
model rebuilds without unpickling modules and without Torch-Pruning. ``prune`` runs the
pruning itself.
"""

from .structure import apply_structure, layer_widths, record_structure, snapshot

__all__ = ["apply_structure", "layer_widths", "record_structure", "snapshot", "prune_channels", "ChannelResult"]


def __getattr__(name):  # the pruning imports torch_pruning: only when it is used
    if name in ("prune_channels", "ChannelResult"):
        from . import prune

        return getattr(prune, name)
    raise AttributeError(name)
