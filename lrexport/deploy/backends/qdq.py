"""Static int8 of the exported ONNX graphs, shared by the runtimes that run them (onnxruntime's quantization tools).

QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantized op, which
onnxruntime and OpenVINO both turn into int8 kernels), weights int8 per output channel,
activations uint8 per tensor with ranges calibrated on real images (the 99.999th
percentile of each activation's magnitude: min-max ranges let a few outliers coarsen
every other value's step, which cost a trained quickstart model 0.6 top-1 points where
percentile ranges cost none). A layer whose own
output error under int8 (its input and weights quantized with the calibrated ranges,
against the float layer, on calibration images) exceeds ``max_layer_error`` stays in float:
the graph is quantized again without it, and the evidence goes into plan.json.

``onnx`` is imported where used: the torch-free runtime (``lrexport infer``) imports this module
through its backend and needs onnxruntime, numpy and Pillow only.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from . import reference_runner
from .base import Backend, BuildContext, ModelSource, QuantizationError, compare, random_batches, run_batched
from .base import QuantConfig  # noqa: F401 (read from here too)


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs advice on the root logger on every call; keep the user's console clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, name: str, batches):
        self.name, self.batches = name, iter(batches)

    def get_next(self):
        x = next(self.batches, None)
        return None if x is None else {self.name: x}

    def rewind(self):  # some calibrators call it; a list replays from the start
        pass


def quantize(proto: onnx.ModelProto, batches: list[np.ndarray], exclude=(), ranges: str = "percentile") -> onnx.ModelProto:
    """``proto`` quantized statically (QDQ, int8 weights per channel, uint8 activations), ranges from ``batches``.

    ``ranges``: "percentile" (for accuracy) or "minmax" (fast; enough where only speed is measured).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not batches:
        raise QuantizationError("int8 needs calibration images; got none")
    name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        try:
            quantize_static(str(src), str(dst), _Batches(name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                            calibrate_method=CalibrationMethod.Percentile if ranges == "percentile" else CalibrationMethod.MinMax)
        except Exception as e:  # the quantizer raises bare Exceptions and ValueErrors of its own
            raise QuantizationError(f"onnxruntime cannot quantize the model: {str(e).splitlines()[0][:200]}") from None
        return onnx.load(str(dst))


def quantize_for_timing(proto: onnx.ModelProto, input_shape) -> onnx.ModelProto:
    """``proto`` in int8 as export quantizes it, calibrated fast on random inputs of ``input_shape``: for timing only."""
    return quantize(proto, random_batches(input_shape), ranges="minmax")


# -- per-layer error ----------------------------------------------------------------------------
def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q.astype(np.float32) - zero.reshape(shape).astype(np.float32)) * scale.reshape(shape)


def _fake_quantize(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """uint8 quantize-dequantize of an activation, as QuantizeLinear/DequantizeLinear compute it."""
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def _conv_inputs(qdq: onnx.ModelProto) -> dict[str, tuple]:
    """Conv name → (float input tensor, its scale and zero point, dequantized int8 weight) for every quantized conv."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    made_by = _producers(qdq.graph)
    convs = {}
    for node in qdq.graph.node:
        if node.op_type != "Conv":
            continue
        act_dq, w_dq = made_by.get(node.input[0]), made_by.get(node.input[1])
        if not (act_dq and w_dq and act_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue  # left in float
        act_q = made_by[act_dq.input[0]]
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        weight = _dequantize(inits[w_dq.input[0]], inits[w_dq.input[1]], inits[w_dq.input[2]], axis)
        convs[node.name] = (act_q.input[0], float(inits[act_dq.input[1]]), int(inits[act_dq.input[2]]), weight)
    return convs


def layer_errors(fp32: onnx.ModelProto, qdq: onnx.ModelProto, batches: list[np.ndarray]) -> dict[str, float]:
    """Per quantized conv: ‖int8 layer − float layer‖ / ‖float layer‖ on ``batches``, each layer on its float input."""
    import onnx
    import torch
    from onnx import numpy_helper

    from ..onnx_graph import conv_from_node

    convs = _conv_inputs(qdq)
    nodes = {n.name: n for n in fp32.graph.node if n.name in convs}
    weights = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    wanted = sorted({convs[n][0] for n in nodes} - {o.name for o in probe.graph.output})
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted)
    runner = reference_runner(probe.SerializeToString())  # a session of onnxruntime, whose quantizer this is
    names = [o.name for o in runner.session.get_outputs()]
    diff, ref = {n: 0.0 for n in nodes}, {n: 0.0 for n in nodes}
    with torch.no_grad():
        for x in batches:
            acts = dict(zip(names, runner.session.run(None, {runner.input_name: x})))
            for name, node in nodes.items():
                tensor, scale, zero, w_int8 = convs[name]
                conv = conv_from_node(node, weights)
                y = conv(torch.from_numpy(acts[tensor]))
                conv.weight.copy_(torch.from_numpy(w_int8))
                y_q = conv(torch.from_numpy(_fake_quantize(acts[tensor], scale, zero).astype(np.float32)))
                diff[name] += float((y_q - y).double().pow(2).sum())
                ref[name] += float(y.double().pow(2).sum())
    return {n: (diff[n] / ref[n]) ** 0.5 if ref[n] else 0.0 for n in nodes}


def quantize_checked(proto: onnx.ModelProto, batches: list[np.ndarray], max_layer_error: float | None) -> tuple[onnx.ModelProto, dict]:
    """``quantize``, then again without the convs whose own int8 error exceeds ``max_layer_error``.

    Returns the quantized graph and its evidence: each conv's error, the bound, the convs left in float.
    """
    qdq = quantize(proto, batches)
    if max_layer_error is None:
        return qdq, {"max_layer_error": None, "layer_errors": {}, "float_layers": []}
    errors = layer_errors(proto, qdq, batches[:2])  # two batches: the error of a layer, not of the data set
    keep_float = sorted(n for n, e in errors.items() if e > max_layer_error)
    if keep_float:
        qdq = quantize(proto, batches, exclude=keep_float)
    return qdq, {"max_layer_error": max_layer_error, "layer_errors": {n: round(e, 5) for n, e in errors.items()},
                 "float_layers": keep_float}


def quantize_built(ctx: BuildContext) -> None:
    """Both graphs of ``ctx`` in int8 (the fp32 dense one kept as "dense_fp32"); their agreement with PyTorch
    and per-layer evidence into ``ctx.quantization``."""
    import torch

    ctx.protos["dense_fp32"] = ctx.protos["dense"]
    evidence = {"calibration": {"split": ctx.quant.split, "images": sum(len(b) for b in ctx.calibration)},
                "format": "QDQ, weights int8 per channel, activations uint8 per tensor, percentile ranges"}
    with torch.no_grad():
        for m in ("lowrank", "dense"):
            ctx.protos[m], evidence[m] = quantize_checked(ctx.protos[m], ctx.calibration, ctx.quant.max_layer_error)
            out = run_batched(reference_runner(ctx.protos[m].SerializeToString(), "int8").run, ctx.x.numpy(), ctx.batch)
            evidence[m]["check"] = compare(f"{m}: onnxruntime int8 vs original fp32", out, ctx.originals[m](ctx.x).numpy()).to_dict()
    ctx.quantization = evidence


class OnnxBackend(Backend):
    """A runtime of the exported ONNX graphs: timed on a layer's one-layer graph (in int8 quantized as here, on
    random inputs: ranges do not change a kernel's speed); its int8 artifacts are these QDQ graphs."""

    def timing_source(self, precision, graph, module, input_shape, label: str) -> ModelSource:
        proto = graph()
        if precision == "int8":
            proto = quantize_for_timing(proto, input_shape)
        return ModelSource(onnx=proto.SerializeToString(), torch=module, label=label)

    def build(self, ctx: BuildContext) -> None:
        ctx.precision = ctx.options.precision
        if ctx.options.precision == "int8":
            quantize_built(ctx)
