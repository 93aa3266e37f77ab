"""What the XNNPACK-based runtimes (ExecuTorch, LiteRT) share: PT2E int8, and bundles of candidates.

Both quantize a torch.export graph with a PT2E quantizer of their own (activations int8 per
tensor, weights int8 per output channel, symmetric); here: the export with a free batch
dimension, running the calibration images through the observed graph, measuring each conv's
error from its observers' ranges, and leaving a conv whose error exceeds export's bound in float.
Both prepare tuning's one-layer candidates together, as one ``Bundle`` of disjoint graphs.
"""

from __future__ import annotations

import copy
import re
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...lowrank.rewrite import node_values

MAX_BATCH = 4096  # the batch dimension's bound while quantizing (the runtime's models are built per batch)


class Bundle(nn.Module):
    """Modules side by side: input i goes through module i; the outputs in a tuple."""

    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.parts, xs))


def exported(module: nn.Module, *input_sizes, sources: bool = False) -> fx.GraphModule:
    """``module`` as a torch.export graph with a free batch dimension on each input (one per size in ``input_sizes``: a
    bundle of candidates takes several): what a PT2E quantizer observes, so that the quantized model serves every
    batch the runtime's models are built for. ``sources``: traced by TorchDynamo (strict export), which records the
    source function of each node (``source_fn_stack``) that a quantizer matching source partitions needs; where
    Dynamo cannot trace the module, the graph without them."""
    dynamic = tuple({0: torch.export.Dim(f"batch{i}", min=1, max=MAX_BATCH)} for i in range(len(input_sizes)))
    # a bundle's inputs are one varargs parameter: their shapes one nested tuple
    args = module.eval(), tuple(torch.zeros(2, *size) for size in input_sizes)
    shapes = (dynamic,) if len(input_sizes) > 1 else dynamic
    if sources:
        try:
            return torch.export.export(*args, dynamic_shapes=shapes, strict=True).module()
        except Exception:  # Dynamo's refusals come in many types; the non-strict graph quantizes all but those ops
            pass
    return torch.export.export(*args, dynamic_shapes=shapes).module()


def layer_of(node: fx.Node) -> str | None:
    """The module path of the layer an exported graph's node belongs to (its innermost module)."""
    stack = node.meta.get("nn_module_stack") or {}
    return module_path(next(reversed(stack.values()))[0]) if stack else None


_GETATTR = re.compile(r"getattr\((.*), '([^']*)'\)")


def module_path(name: str) -> str:
    """A module's dotted path (``layer1.0.conv1``) from the name a strict export gives it: Dynamo's expression for it
    where the module traced is an fx graph (``getattr(L['self'].layer1, '0').conv1``)."""
    if not name.startswith(("L[", "getattr(")):
        return name
    name = name.replace("L['self']", "")
    while (found := _GETATTR.search(name)) is not None:
        name = f"{name[:found.start()]}{found[1]}.{found[2]}{name[found.end():]}"
    return re.sub(r"\['?([^'\]]*)'?\]", r".\1", name).lstrip(".")


@torch.no_grad()
def calibrate(prepared: fx.GraphModule, batches: list) -> fx.GraphModule:
    """Run ``batches`` through ``prepared``: arrays, or tuples of arrays (one per input)."""
    for x in batches:
        prepared(*(torch.from_numpy(a) for a in (x if isinstance(x, tuple) else (x,))))
    return prepared


def _observer(prepared: fx.GraphModule, node) -> torch.nn.Module | None:
    return getattr(prepared, node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


@torch.no_grad()
def layer_errors(prepared: fx.GraphModule, batches: list[np.ndarray]) -> dict[str, float]:
    """Per quantized conv of a calibrated ``prepared`` model: ‖int8 conv − float conv‖ / ‖float conv‖ on
    ``batches``, each conv on its float input, with the input and weights quantized as its observers say."""
    convs = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.conv2d.default:
            continue
        act, weight = _observer(prepared, node.args[0]), _observer(prepared, node.args[1])
        if act is None or weight is None:
            continue  # left in float
        scale, zero = act.calculate_qparams()
        w_scale, w_zero = weight.calculate_qparams()
        geometry = dict(zip(("stride", "padding", "dilation", "groups"), node.args[3:]))
        convs[node.name] = (layer_of(node) or node.name, node, float(scale), int(zero), act.quant_min, act.quant_max,
                            w_scale, w_zero.int(), weight.ch_axis, weight.quant_min, weight.quant_max, geometry)
    # the probe observes what it runs: a copy, so that the prepared model keeps the calibration's ranges
    probe = copy.deepcopy(prepared)
    wanted = {a.name for _, node, *_ in convs.values() for a in node.args[:3] if isinstance(a, fx.Node)}
    diff, ref = dict.fromkeys(convs, 0.0), dict.fromkeys(convs, 0.0)
    for x in batches:
        values = node_values(probe, torch.from_numpy(x), keep=lambda n: n.name in wanted)
        for name, (_, node, scale, zero, qmin, qmax, w_scale, w_zero, axis, wqmin, wqmax, geometry) in convs.items():
            x_in, w = values[node.args[0].name], values[node.args[1].name]
            bias = values[node.args[2].name] if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else None
            y = F.conv2d(x_in, w, bias, **geometry)
            y_q = F.conv2d(torch.fake_quantize_per_tensor_affine(x_in, scale, zero, qmin, qmax),
                           torch.fake_quantize_per_channel_affine(w, w_scale, w_zero, axis, wqmin, wqmax), bias, **geometry)
            diff[name] += float((y_q - y).double().pow(2).sum())
            ref[name] += float(y.double().pow(2).sum())
    return {convs[n][0]: (diff[n] / ref[n]) ** 0.5 if ref[n] else 0.0 for n in convs}


def quantize_checked(prepare: Callable, convert: Callable, batches: list[np.ndarray], max_layer_error: float | None) -> tuple[nn.Module, dict]:
    """A model quantized by PT2E (``prepare(keep_float)`` exports and observes it, leaving the convs named in
    ``keep_float`` in float; ``convert`` turns a calibrated model into its int8 form), then again with the convs
    whose own int8 error exceeds ``max_layer_error`` in float.

    Returns the int8 module and its evidence: each conv's error, the bound, the convs left in float
    (as lrexport.deploy.backends.qdq does for ONNX).
    """
    prepared = calibrate(prepare(()), batches)
    if max_layer_error is None:
        return convert(prepared), {"max_layer_error": None, "layer_errors": {}, "float_layers": []}
    errors = layer_errors(prepared, batches[:2])  # two batches: the error of a layer, not of the data set
    keep_float = sorted(n for n, e in errors.items() if e > max_layer_error)
    if keep_float:
        prepared = calibrate(prepare(keep_float), batches)
    return convert(prepared), {"max_layer_error": max_layer_error, "layer_errors": {n: round(e, 5) for n, e in errors.items()},
                               "float_layers": keep_float}


@torch.no_grad()
def build_per_batch(ctx, runtime: str, int8_format: str, quantize_checked: Callable, to_bytes: Callable, runner: Callable,
                    what: str) -> dict[str, dict[int, bytes]]:
    """Both models as a runtime's own files, one per deployment batch (model → batch → bytes); in int8 quantized by
    ``quantize_checked`` (per-layer error fallback, its evidence into ``ctx.quantization``), the fp32 dense model's
    files beside them. ``to_bytes(module, batch, int8, label)`` builds one file, ``runner(files, label)`` runs a
    model's. The fp32 files must reproduce PyTorch on ``ctx.x`` (``what``: their subject and verb in the error);
    the int8 ones' comparison goes into their evidence. The int8 lives in these files: the ONNX graphs stay
    float, dense.onnx the fp32 reference."""
    from ..artifacts import MODELS
    from .base import compare, fail_beyond

    modules, evidence = dict(ctx.plain), None
    if ctx.calibration is not None:
        evidence = {"calibration": {"split": ctx.quant.split, "images": sum(len(b) for b in ctx.calibration)},
                    "format": int8_format, "runtime": runtime}
        for m in MODELS:
            modules[m], evidence[m] = quantize_checked(ctx.plain[m], ctx.input_size, ctx.calibration, ctx.quant.max_layer_error)
        modules["dense_fp32"] = ctx.plain["dense"]
    files, checks = {}, []
    for m, module in modules.items():
        quantized = evidence is not None and m in MODELS
        files[m] = {b: to_bytes(module, b, quantized, f"the {m} model") for b in ctx.batches}
        result = compare(f"{m}: {runtime}{' int8' if quantized else ''} vs original{' fp32' if quantized else ''}",
                         runner(files[m], f"the {m} model").run(ctx.x.numpy()), ctx.originals[m if m in MODELS else "dense"](ctx.x).numpy())
        if quantized:
            evidence[m]["check"] = result.to_dict()
        else:
            checks.append(result)
    fail_beyond(checks, ctx.tolerance, what)
    ctx.checks, ctx.quantization, ctx.precision = checks, evidence, ctx.options.precision
    return files

