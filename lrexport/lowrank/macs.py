"""The MAC rule (DESIGN §5), in one place.

Conv and linear multiply-accumulates only (no BN, ReLU, pooling, add), as the paper,
torchvision's `_ops` and fvcore count. A decomposed layer is costed as it would be
deployed: the factored pair below its break-even rank, one dense conv at or above it. The
paper's own code costs it as the factored pair at any rank; both costings are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .probe import probe


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def dense_conv_macs(c: int, n: int, kh: int, kw: int, out_hw: tuple[int, int]) -> int:
    return out_hw[0] * out_hw[1] * kh * kw * c * n


def channel_macs(c: int, n: int, kh: int, kw: int, r: int, out_hw: tuple[int, int]) -> int:
    """conv1 c→r (kh×kw, original stride) then conv2 r→n (1×1)."""
    return out_hw[0] * out_hw[1] * (kh * kw * c * r + r * n)


def spatial_macs(c: int, n: int, kh: int, kw: int, r: int, out_hw: tuple[int, int], mid_w: int) -> int:
    """conv1 c→r (kh×1, stride (sh, 1)) at H'×mid_w, then conv2 r→n (1×kw, stride (1, sw)) at H'×W'."""
    return out_hw[0] * mid_w * kh * c * r + out_hw[0] * out_hw[1] * kw * r * n


def linear_macs(in_f: int, out_f: int, r: int | None = None) -> int:
    return in_f * out_f if r is None else r * (in_f + out_f)


@dataclass
class LayerMacs:
    name: str
    kind: str  # "conv", "linear", "svd-channel", "svd-spatial", "svd-linear"
    dense: int  # cost of the original dense layer
    paper: int  # cost as the paper's code counts it: an SVD layer's factored pair at its rank, whatever the rank; else dense
    rank: int | None = None
    full_rank: int | None = None

    @property
    def deployed(self) -> int:
        """Cost as deployed: the factored pair below break-even, one dense conv at or above it (dense on ties)."""
        return min(self.dense, self.paper)

    @property
    def factored(self) -> bool:
        return self.deployed < self.dense


@dataclass
class MacReport:
    layers: list[LayerMacs] = field(default_factory=list)

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def deployed(self) -> int:
        return sum(layer.deployed for layer in self.layers)

    @property
    def paper(self) -> int:
        return sum(layer.paper for layer in self.layers)

    @property
    def speedup(self) -> float:
        return self.dense / self.deployed

    @property
    def paper_speedup(self) -> float:
        """Dense MACs over the paper's costing: never above ``speedup``, lower once a layer is at or above break-even."""
        return self.dense / self.paper

    def to_dict(self) -> dict:
        return {
            "dense_macs": self.dense,
            "macs": self.deployed,
            "speedup": self.speedup,
            "paper_macs": self.paper,
            "paper_speedup": self.paper_speedup,
            "layers": [vars(layer) | {"deployed": layer.deployed, "factored": layer.factored} for layer in self.layers],
        }


def _is_svd(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("macs", "mode", "rank", "full_rank"))


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> MacReport:
    """Per-layer and total MACs for one image of ``input_size`` (C, H, W), by running the model.

    An SVD layer is any module with ``macs(in_hw)``, ``mode``, ``rank`` and ``full_rank`` (lowrank.svd_layers):
    recognised by what it does, so that the MAC rules need not import the layers that use them.
    """
    report = MacReport()
    hooks = []

    def hook_for(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if _is_svd(module):
                dense, factored = module.macs(tuple(x.shape[-2:]) if x.dim() == 4 else None)
                report.layers.append(LayerMacs(name, f"svd-{module.mode}", dense, factored, module.rank, module.full_rank))
            elif isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = dense_conv_macs(module.in_channels // module.groups, module.out_channels, kh, kw, tuple(output.shape[-2:]))
                report.layers.append(LayerMacs(name, "conv", macs, macs))
            elif isinstance(module, nn.Linear):
                macs = linear_macs(module.in_features, module.out_features)
                report.layers.append(LayerMacs(name, "linear", macs, macs))

        return hook

    for name, module in model.named_modules():
        if _is_svd(module) or isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook_for(name)))
    probe(model, input_size, hooks)
    return report
