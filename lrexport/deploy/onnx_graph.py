"""A plain PyTorch module → a clean ONNX graph, in memory, checked.

The TorchScript exporter (``dynamo=False``) is used: for plain conv nets it yields the
graph as written. It leaves Identity nodes where it deduplicated equal initializers; we
rewire those away, and fold what computes on constants alone (the exporter spells
``F.pad`` with constant pads as a Reshape/Slice/Transpose chain), so the graph holds
the network's compute ops only.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import fx, nn

from ..errors import LrexportError, first_line
from ..io import muted

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 17


class GraphError(LrexportError):
    """An exported graph that is invalid or does more than run the network."""


def _export(module: nn.Module, args: tuple, buf, opset: int, **kwargs) -> None:
    # muted stdout: the TorchScript exporter prints the whole graph there (from C++) when it cannot
    # convert an op; the error it raises says what matters, in one line
    with warnings.catch_warnings(), muted(1):
        # the TorchScript exporter announces its own deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        # strided slices it cannot fold are left to fold_constants below
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(module.eval(), args, buf, dynamo=False, opset_version=opset, do_constant_folding=True, **kwargs)


def to_onnx(module: nn.Module, input_size, batch: int | None = None, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``module`` (eval mode) for inputs of ``input_size`` (C, H, W); ``batch=None`` is dynamic.

    A module ONNX cannot carry is one GraphError; where the module is a torch.fx graph (the
    export's rewrites are), it names the layer whose op failed.
    """
    example = torch.zeros(batch or 1, *input_size)
    dynamic = None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buf = io.BytesIO()
    try:
        _export(module, (example,), buf, opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic)
    except Exception as e:
        where = failing_layer(module, example, opset) if isinstance(module, fx.GraphModule) else None
        raise GraphError(f"ONNX (opset {opset}) cannot carry {where or 'the model'}: {first_line(e)}") from None
    proto = onnx.load_from_string(buf.getvalue())
    strip_identities(proto)
    fold_constants(proto)
    return proto


def _layer_of(node: fx.Node) -> str:
    """The layer an fx node belongs to, as a user names it: its module path, and the op where it is not the module."""
    if node.op == "call_module":
        return f"layer {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    op = getattr(node.target, "__name__", str(node.target))
    return f"layer {next(reversed(stack.values()))[0]!r} ({op})" if stack else f"the model's own forward ({op})"


def failing_layer(gm: fx.GraphModule, example: torch.Tensor, opset: int) -> str | None:
    """The first node of ``gm`` that does not export to ONNX on its own (its tensor inputs as graph
    inputs, the rest as constants), named by its layer; None if each node exports alone."""
    from ..lowrank.rewrite import node_values

    values = node_values(gm, example)
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or not isinstance(values[node.name], torch.Tensor):
            continue
        graph, inputs = fx.Graph(), []

        def as_input(arg: fx.Node):
            if not isinstance(values[arg.name], torch.Tensor):
                return values[arg.name]
            inputs.append(values[arg.name])
            return graph.placeholder(f"x{len(inputs)}")

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), as_input)
        graph.output(graph.create_node(node.op, node.target, args, kwargs))
        try:
            _export(fx.GraphModule(gm, graph), tuple(inputs), io.BytesIO(), opset)
        except Exception:
            return _layer_of(node)
    return None


# ops whose output is not a function of their inputs: never fold
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_constants(proto: onnx.ModelProto) -> int:
    """Evaluate every node whose inputs are all constants and store its outputs as initializers.

    Constant nodes become initializers too. Returns how many nodes were removed.
    """
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    new_inits, keep = {}, []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        foldable = node.domain in ("", "ai.onnx") and node.op_type not in _NONDETERMINISTIC and node.op_type != "If"
        if foldable and (node.op_type == "Constant" or (inputs and all(name in known for name in inputs))):
            feeds = {name: known[name] for name in inputs}
            results = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
            for name, value in zip(node.output, results):
                known[name] = new_inits[name] = np.asarray(value)
        else:
            keep.append(node)
    removed = len(graph.node) - len(keep)
    if not removed:
        return 0
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in new_inits.items())
    # drop initializers nothing reads any more
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    live = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return removed


def strip_identities(proto: onnx.ModelProto) -> int:
    """Remove Identity nodes by pointing their consumers at their input; returns how many went."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    renames, keep = {}, []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            renames[node.output[0]] = node.input[0]
        else:
            keep.append(node)

    def resolve(name: str) -> str:
        while name in renames:
            name = renames[name]
        return name

    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    return removed


def check_graph(proto: onnx.ModelProto) -> dict[str, int]:
    """onnx.checker plus our own rules; returns the op counts.

    Rules: only the default ONNX domain, and no node that computes on weights alone
    (a reshape or product of weights at run time means the rewrite left work undone).
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphError(f"exported ONNX graph is invalid: {str(e).splitlines()[0]}") from None
    weights = {init.name for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise GraphError(f"exported graph has a non-standard op {node.domain}::{node.op_type} ({node.name})")
        if node.op_type != "Constant" and node.input and all(name in weights for name in node.input if name):
            raise GraphError(f"exported graph computes on weights at run time: {node.op_type} {node.name} on {list(node.input)}")
    return dict(Counter(node.op_type for node in proto.graph.node))


def conv_weight_shapes(proto: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Shapes of the weight initializers of every Conv node, in graph order."""
    dims = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    return [dims[node.input[1]] for node in proto.graph.node if node.op_type == "Conv"]


def conv_from_node(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> nn.Conv2d:
    """One ONNX Conv node (2-D, symmetric pads) as the same ``nn.Conv2d``; ``weights`` holds its initializers."""
    a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    w = torch.from_numpy(np.array(weights[node.input[1]], dtype=np.float32))
    group = a.get("group", 1)
    pads = a.get("pads", [0, 0, 0, 0])
    conv = nn.Conv2d(w.shape[1] * group, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", (1, 1))),
                     padding=tuple(pads[:2]), dilation=tuple(a.get("dilations", (1, 1))), groups=group, bias=len(node.input) > 2)
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.copy_(torch.from_numpy(np.array(weights[node.input[2]], dtype=np.float32)))
    return conv


def conv_chain_module(proto: onnx.ModelProto) -> nn.Module:
    """A graph of Conv nodes in a chain (tuning's one-layer models) as the same PyTorch convs."""
    weights = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Conv":
            raise GraphError(f"conv_chain_module takes Conv nodes only; got {node.op_type}")
    return nn.Sequential(*(conv_from_node(node, weights) for node in proto.graph.node)).eval()
