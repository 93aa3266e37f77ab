"""A model as a torch.fx graph for export, with branches on its fixed input size resolved.

An exported graph has a dynamic batch and every other dimension fixed (the export's
``input_size``). So a forward that branches on a tensor's spatial size or channel count
(timm's VGG head pools up inputs smaller than its kernel) takes the same branch on every
input the graph will see: the tracer takes that branch, read from a sample input. A
branch on the batch size or on an input's values has no such answer and stays a
RewriteError naming the layer.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..errors import LrexportError, first_line

MAX_BRANCHES = 1000  # a forward that loops on static sizes takes one decision per iteration


class RewriteError(LrexportError):
    """A model the export cannot rewrite into a static graph."""


class _Undecided(Exception):
    """Tracing reached a branch no decision is recorded for yet: ``node`` is its condition."""

    def __init__(self, node: fx.Node):
        super().__init__(node.name)
        self.node = node


class _Tracer(fx.Tracer):
    """torch.fx's tracer taking recorded branch decisions in order, and remembering the innermost
    module whose forward could not be traced."""

    def __init__(self, decisions: list[tuple[str, bool]]):
        super().__init__()
        self.decisions = decisions
        self.taken = 0
        self.failed_in: str | None = None

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.taken == len(self.decisions):
            raise _Undecided(obj.node)
        name, value = self.decisions[self.taken]
        if name != obj.node.name:  # tracing is deterministic; a mismatch means the forward is not
            raise fx.proxy.TraceError(f"the forward branched differently when traced again ({obj.node.name} for {name})")
        self.taken += 1
        return value

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # an undecided branch too: it names the layer if the branch cannot be decided
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _shape_source(node) -> bool:
    """``t.shape`` or ``t.size()``: a tensor's whole shape."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
        or (node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs))


def fixed_read(node: fx.Node, values: dict) -> bool:
    """Whether ``node`` reads something fixed at export: a non-batch dimension, the rank, dtype or device.

    ``values``: node name → value on a sample input, for the tensors and shapes ``node`` reads.
    """
    if node.op == "call_function" and node.target is operator.getitem and _shape_source(node.args[0]):
        shape, idx = values[node.args[0].name], node.args[1]
        if isinstance(idx, int):
            return len(shape) > 0 and idx % len(shape) != 0
        return isinstance(idx, slice) and 0 not in range(len(shape))[idx]
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        ndim = values[node.args[0].name].dim()
        return ndim > 0 and node.args[1] % ndim != 0
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("ndim", "dtype", "device")
    return node.op == "call_method" and node.target == "dim"


def _depends_on_input(cond: fx.Node, values: dict) -> bool:
    """Whether ``cond`` depends on the input other than through its fixed reads (parameters and
    buffers are constants of the exported graph)."""
    stack, seen = [cond], set()
    while stack:
        node = stack.pop()
        if node in seen or fixed_read(node, values):
            continue
        seen.add(node)
        if node.op == "placeholder":
            return True
        stack.extend(node.all_input_nodes)
    return False


def _evaluate(root: nn.Module, partial: fx.Graph, cond: fx.Node, sample: torch.Tensor) -> tuple[object, dict]:
    """``cond``'s value when the traced-so-far ``partial`` graph runs on ``sample``, and the values
    ``fixed_read`` looks at."""
    graph, env = fx.Graph(), {}
    graph.graph_copy(partial, env)
    graph.output(env[cond])
    sized = {n.args[0].name for n in partial.nodes if n.op == "call_method" and n.target == "size" and len(n.args) == 2}
    values = node_values(fx.GraphModule(root, graph), sample,
                         keep=lambda n: n.name == cond.name or n.name in sized or _shape_source(n))
    return values[cond.name], values


@torch.no_grad()
def node_values(gm: fx.GraphModule, *inputs, keep=None) -> dict[str, object]:
    """node name → the value it computes when ``gm`` runs on ``inputs`` (only nodes ``keep(node)`` accepts, if given)."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if keep is None or keep(n):
                values[n.name] = out
            return out

    Recorder(gm).run(*inputs)
    return values


def sample_input(model: nn.Module, input_size) -> torch.Tensor:
    """Zeros of ``input_size`` (C, H, W) in a batch of 2 (not mistaken for a size-1 dimension), as ``model``'s parameters."""
    param = next(model.parameters(), None)
    like = dict(dtype=param.dtype, device=param.device) if param is not None else {}
    return torch.zeros(2, *input_size, **like)


def trace(model: nn.Module, input_size) -> fx.GraphModule:
    """``model`` as a torch.fx graph for inputs of ``input_size`` (C, H, W) and any batch size.

    Branches on non-batch sizes take the side they take at ``input_size``; a model that
    cannot be traced otherwise is a RewriteError naming the layer.
    """
    sample = sample_input(model, input_size)
    decisions: list[tuple[str, bool]] = []
    while True:
        tracer = _Tracer(decisions)
        try:
            graph = tracer.trace(model)
            break
        except _Undecided as u:
            reason = _decide(tracer, u.node, sample, decisions)
        except Exception as e:
            reason = first_line(e)
        if reason is not None:
            where = f"layer {tracer.failed_in!r}" if tracer.failed_in else f"the forward of {type(model).__name__}"
            raise RewriteError(f"export cannot trace {where} into a static graph (torch.fx: {reason})") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _decide(tracer: _Tracer, cond: fx.Node, sample: torch.Tensor, decisions: list) -> str | None:
    """Record the branch ``cond`` takes on ``sample``; or why it cannot be decided at export."""
    if len(decisions) >= MAX_BRANCHES:
        return f"more than {MAX_BRANCHES} branches on tensor sizes"
    try:
        value, values = _evaluate(tracer.root, tracer.graph, cond, sample)
    except Exception as e:
        return f"its branch on {cond.name} could not be evaluated: {first_line(e)}"
    if _depends_on_input(cond, values):
        return "control flow on the batch size or on a tensor's values, which a static graph cannot hold"
    decisions.append((cond.name, bool(value)))
    return None
