"""Adaptive average pooling at fixed sizes as two matrix products, for ONNX.

The ONNX exporter carries ``adaptive_avg_pool2d`` only where each output size divides its
input size (it becomes an AveragePool); timm's VGG head pools a 1×1 map up to 7×7. At the
export's fixed input size each pool's sizes are known, and the pool is a linear map on each
spatial axis: y = P_h · x · P_wᵀ, each row of P averaging one output cell's window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .tracing import node_values


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages PyTorch's adaptive window [⌊i·n_in/n_out⌋, ⌈(i+1)·n_in/n_out⌉)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
        m[i, start:end] = 1 / (end - start)
    return m


class AdaptiveAvgPoolMatmul(nn.Module):
    """``adaptive_avg_pool2d`` from ``in_hw`` to ``out_hw`` as two MatMuls with constant matrices."""

    def __init__(self, in_hw, out_hw, like: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", pool_matrix(in_hw[0], out_hw[0]).to(like))  # (out H, in H)
        self.register_buffer("cols", pool_matrix(in_hw[1], out_hw[1]).T.contiguous().to(like))  # (in W, out W)

    def forward(self, x):
        return torch.matmul(self.rows, torch.matmul(x, self.cols))


def _is_adaptive_pool(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function":
        return node.target is F.adaptive_avg_pool2d
    return node.op == "call_module" and isinstance(modules[node.target], nn.AdaptiveAvgPool2d)


def matmul_adaptive_pools(gm: fx.GraphModule, sample: torch.Tensor) -> int:
    """Replace each 2-D adaptive average pool of ``gm`` whose output size does not divide its input
    size (both as on ``sample``, the export's input size). Returns how many were replaced."""
    modules = dict(gm.named_modules())
    pools = [node for node in gm.graph.nodes if _is_adaptive_pool(node, modules)]
    if not pools:
        return 0
    wanted = {n.name for node in pools for n in (node, node.args[0])}
    values = node_values(gm, sample, keep=lambda n: n.name in wanted)
    replaced = 0
    for node in pools:
        x, y = values[node.args[0].name], values[node.name]
        in_hw, out_hw = x.shape[-2:], y.shape[-2:]
        if in_hw[0] % out_hw[0] == 0 and in_hw[1] % out_hw[1] == 0:
            continue  # the exporter's AveragePool carries it
        name = f"{node.name}_matmul"
        gm.add_submodule(name, AdaptiveAvgPoolMatmul(in_hw, out_hw, x))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return replaced
