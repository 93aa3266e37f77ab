"""LiteRT (formerly TensorFlow Lite) with XNNPACK: the runtime most Android phones and many boards run models with.

Export converts the plain models with litert-torch (``litert_torch.convert``, the ``litert`` extra; it
needs torch), which folds BatchNorm and ReLU into the convs. A converted model has a static input shape,
so export writes one .tflite per deployment batch. Its input is NHWC: fed NCHW, the converter puts a
transpose in front of the first conv (meta.json's ``litert.layout`` says which). int8 is PT2E static
quantization with litert-torch's quantizer (activations int8 per tensor, weights int8 per output channel,
symmetric), ranges calibrated on images, a conv whose own int8 error exceeds export's bound left in float
(lrexport.deploy.backends.pt2e). The graph is exported strictly: the quantizer finds residual adds by the source
function only such an export records (without it they ran in float, between DEQUANTIZE and QUANTIZE ops). An
int8 model takes and returns int8 tensors, which the runner quantizes and dequantizes with the model's own scale
and zero point.

Running needs only ai-edge-litert's interpreter and numpy (the ``litert-runtime`` extra), which applies
XNNPACK by default: this module imports torch only to convert, so ``lrexport infer`` serves a .tflite on a
device without torch.

Tuning converts many one-layer candidates, and the converter's cost is mostly fixed per call: ``open_many``
converts them as one model of disjoint graphs and splits its flatbuffer into one model per candidate, the
bundles converted by one worker process per core.
"""

from __future__ import annotations

import copy
import contextlib
import functools
import os
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from ...errors import LrexportError, RuntimeMissingError, first_line
from ...io import muted
from ...progress import Progress, quiet
from ..artifacts import FILES
from ..timing import WALL, cpu_name
from . import RUNTIMES
from .base import Backend, BuildContext, ModelSource, RuntimeOptions, random_batches, run_batched
from .workers import prepare_candidates

LAYOUT = "NHWC"  # the input layout of every model this module converts
BUNDLE_SIZE = 64  # candidates converted together: bounds one conversion's memory (0.2 s a candidate at 16 and at 64)


@functools.cache
def require_runtime() -> SimpleNamespace:
    """ai-edge-litert's interpreter (torch-free); a RuntimeMissingError (one line, exit 2) where it is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise RuntimeMissingError(f'LiteRT is not installed (ai-edge-litert: {first_line(e)}): pip install "lrexport[litert-runtime]" '
                                  'to run .tflite models, "lrexport[litert]" to export them too') from None
    return SimpleNamespace(version=version("ai-edge-litert"), Interpreter=Interpreter)


@functools.cache
def require_converter() -> SimpleNamespace:
    """litert-torch, the converter; a RuntimeMissingError (one line, exit 2) where it is not installed."""
    try:
        with muted(2):  # its native libraries log their set-up (oneDNN, absl) on stderr at import
            import litert_torch
            from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise RuntimeMissingError(f'litert-torch is not installed (or not whole: {first_line(e)}): pip install "lrexport[litert]"') from None
    return SimpleNamespace(version=version("litert-torch"), convert=litert_torch.convert, channels_last=litert_torch.to_channel_last_io,
                           quantizer=PT2EQuantizer, config=get_symmetric_quantization_config, quant_config=QuantConfig,
                           prepare=prepare_pt2e, convert_pt2e=convert_pt2e)


# -- conversion (torch) ----------------------------------------------------------------------------
def _quantizer(keep_float=()):
    """litert-torch's static int8 quantizer, leaving the convs named in ``keep_float`` (module paths) in float."""
    from .pt2e import layer_of

    lt = require_converter()
    keep_float = set(keep_float)

    class Quantizer(lt.quantizer):
        # litert-torch's quantizer takes no node filter of its own: every annotation pass gets this one
        def _annotate_all_static_patterns(self, model, config, filter_fn=None):
            def keep(node) -> bool:
                return layer_of(node) not in keep_float and (filter_fn is None or filter_fn(node))

            return super()._annotate_all_static_patterns(model, config, keep)

    return Quantizer().set_global(lt.config(is_per_channel=True, is_dynamic=False))


def prepare(module, input_size, keep_float=()):
    """``module`` exported with a free batch dimension and observed for int8, except the convs in ``keep_float``."""
    from .pt2e import exported

    return require_converter().prepare(exported(module, input_size, sources=True), _quantizer(keep_float))


def _convert_int8(prepared):
    return require_converter().convert_pt2e(prepared, fold_quantize=False)


def quantize(module, input_size, batches: list[np.ndarray]):
    """``module`` in int8 as LiteRT's converter takes it (PT2E, ranges from ``batches``), any batch size."""
    from .pt2e import calibrate

    return _convert_int8(calibrate(prepare(module, input_size), batches))


def quantize_checked(module, input_size, batches: list[np.ndarray], max_layer_error: float | None):
    """``quantize`` with the per-layer error fallback (``pt2e.quantize_checked``): the int8 module and its evidence."""
    from . import pt2e

    return pt2e.quantize_checked(functools.partial(prepare, module, input_size), _convert_int8, batches, max_layer_error)


@contextlib.contextmanager
def _quiet_converter():
    """No progress lines from the converter (it prints them unless its environment variable says not to)."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    os.environ[key] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _convert(module, examples: tuple, int8: bool, label: str) -> bytes:
    """``module`` (float, or int8 from PT2E) as a .tflite taking NHWC ``examples``-shaped inputs (given NCHW) and giving
    NHWC where an output is an image."""
    import torch

    lt = require_converter()
    with torch.no_grad():
        outs = module(*examples)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrapped = lt.channels_last(module, args=list(range(len(examples))), outputs=[i for i, y in enumerate(outs) if y.dim() == 4])
    wrapped.training = False  # the module itself is in eval mode already (a quantized one refuses .eval())
    nhwc = tuple(x.permute(0, 2, 3, 1).contiguous() for x in examples)
    try:
        with _quiet_converter(), muted(2):  # and its native passes log op counts on stderr
            return bytes(lt.convert(wrapped, nhwc, quant_config=lt.quant_config(pt2e_quantizer=_quantizer()) if int8 else None)
                         .model_content())
    except Exception as e:  # export and conversion raise many types of their own
        raise LrexportError(f"LiteRT cannot convert {label}: {first_line(e)}") from None


def convert(module, batch: int, input_size, int8: bool = False, label: str = "the model") -> bytes:
    """``module`` (float, or int8 from ``quantize``) as a .tflite for NHWC batches of ``batch`` images of
    ``input_size`` (C, H, W)."""
    import torch

    return _convert(module, (torch.zeros(batch, *input_size),), int8, label)


def convert_many(modules: list, shapes: list[tuple], int8: bool = False) -> list[bytes]:
    """One .tflite per module (input shapes N, C, H, W in ``shapes``), converted together: one conversion of all of
    them as disjoint graphs (quantized together in int8, on random inputs), split per module. Where the split does
    not find the graphs apart, one conversion each."""
    import torch

    from .pt2e import Bundle, calibrate, exported

    bundle, examples = Bundle(modules).eval(), tuple(torch.zeros(*s) for s in shapes)
    if int8:
        prepared = require_converter().prepare(exported(bundle, *(s[1:] for s in shapes), sources=True), _quantizer())
        bundle = _convert_int8(calibrate(prepared, list(zip(*(random_batches(s) for s in shapes)))))
    parts = split_components(_convert(bundle, examples, int8, f"{len(modules)} candidates together"), len(modules))
    if parts is not None:
        return parts
    if int8:
        modules = [quantize(m, s[1:], random_batches(s)) for m, s in zip(modules, shapes)]
    return [convert(m, s[0], s[1:], int8, f"candidate {i}") for i, (m, s) in enumerate(zip(modules, shapes))]


def split_components(model: bytes, count: int) -> list[bytes] | None:
    """The ``count`` disjoint graphs of a converted bundle (input ``args_i`` → output ``output_i``), each as a model of
    its own (its operators, tensors and buffers only); None where the graphs are not disjoint as expected."""
    from ai_edge_litert.tools import flatbuffer_utils

    full = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    if len(full.subgraphs) != 1 or len(full.signatureDefs) != 1:
        return None
    graph, signature = full.subgraphs[0], full.signatureDefs[0]
    ins = {_name(t.name): t.tensorIndex for t in signature.inputs}
    outs = {_name(t.name): t.tensorIndex for t in signature.outputs}
    try:
        pairs = [(ins[f"args_{i}"], outs[f"output_{i}"]) for i in range(count)]
    except KeyError:
        return None
    components = _components(full, graph)
    if components is None:
        return None
    root, flowing = components
    roots = [root(i) for i, _ in pairs]
    if len(set(roots)) != count or any(root(o) != r for (_, o), r in zip(pairs, roots)):
        return None
    return [_part(full, graph, [op for op, ts in zip(graph.operators, flowing) if root(ts[0]) == r], inp, out)
            for (inp, out), r in zip(pairs, roots)]


def _components(full, graph):
    """The connected components of ``graph``'s operators: (tensor → its component's root, each operator's activation
    tensors); None where an operator touches no activation. Graphs join through the activations they pass: weights
    the converter stored once for several candidates (equal constants) do not join them."""
    parent = list(range(len(graph.tensors)))

    def root(t: int) -> int:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def constant(t: int) -> bool:
        data = full.buffers[graph.tensors[t].buffer].data
        return data is not None and len(data) > 0

    flowing = [[t for t in [*op.inputs, *op.outputs] if t >= 0 and not constant(t)] for op in graph.operators]
    if not all(flowing):
        return None
    for ts in flowing:
        for t in ts[1:]:
            parent[root(t)] = root(ts[0])
    return root, flowing


def _part(full, graph, ops, inp: int, out: int) -> bytes:
    """A model of ``ops`` alone, input tensor ``inp``, output ``out``: the tensors and buffers they use, renumbered
    (each part gets its copy of a buffer parts share)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    used = sorted({inp, out} | {t for op in ops for t in [*op.inputs, *op.outputs] if t >= 0})
    index = {t: i for i, t in enumerate(used)}
    buffers, buffer_index = [schema.BufferT()], {}  # buffer 0: the empty one every tensor without data points to

    def keep_buffer(b: int) -> int:
        if b > 0 and b not in buffer_index:
            buffer_index[b] = len(buffers)
            buffers.append(full.buffers[b])
        return buffer_index.get(b, 0)

    tensors = []
    for t in used:
        tensors.append(copy.copy(graph.tensors[t]))
        tensors[-1].buffer = keep_buffer(tensors[-1].buffer)
    operators = []
    for op in ops:
        operators.append(copy.copy(op))
        operators[-1].inputs = [index[t] if t >= 0 else t for t in op.inputs]
        operators[-1].outputs = [index[t] for t in op.outputs]
    sub = schema.SubGraphT()
    sub.tensors, sub.operators, sub.inputs, sub.outputs, sub.name = tensors, operators, [index[inp]], [index[out]], graph.name
    metadata = []
    for md in full.metadata or []:
        metadata.append(copy.copy(md))
        metadata[-1].buffer = keep_buffer(md.buffer)
    part = copy.copy(full)
    part.subgraphs, part.signatureDefs, part.metadata, part.buffers = [sub], [], metadata, buffers
    return bytes(flatbuffer_utils.convert_object_to_bytearray(part))


def _name(name) -> str:
    return name.decode() if isinstance(name, bytes) else name


# -- running (torch-free) ------------------------------------------------------------------------
class TfliteModel:
    """One .tflite in an interpreter: NCHW float batches in, float outputs out (an int8 model's tensors quantized
    and dequantized with its own scale and zero point; a 4-D output back to NCHW)."""

    def __init__(self, model: bytes | Path, threads: int, label: str):
        rt = require_runtime()
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        try:
            with muted(2):  # the interpreter announces its XNNPACK delegate on stderr, once per model
                self.interpreter = rt.Interpreter(num_threads=threads, **source)
                self.interpreter.allocate_tensors()
        except Exception as e:  # the interpreter raises ValueError and RuntimeError of its own
            raise LrexportError(f"LiteRT cannot load {label}: {first_line(e)}") from None
        self.input, self.output = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def feed(self, x: np.ndarray) -> np.ndarray:
        """``x`` (float32 NCHW) as the model's input tensor takes it."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        dtype = self.input["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        return np.ascontiguousarray(x, dtype=dtype)

    def result(self) -> np.ndarray:
        y = self.interpreter.get_tensor(self.output["index"])
        if np.issubdtype(y.dtype, np.integer):
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.transpose(0, 3, 1, 2) if y.ndim == 4 else y

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], self.feed(x))
        self.interpreter.invoke()
        return self.result()

    def bind(self, x: np.ndarray) -> Callable[[], object]:
        self.interpreter.set_tensor(self.input["index"], self.feed(x))
        return self.interpreter.invoke


class LiteRTRunner:
    """.tflite models on the CPU through XNNPACK: stored ones (one per batch), or converted on demand from a module,
    per batch (in int8 quantized first, on random inputs: ranges do not change a kernel's speed)."""

    clock = WALL
    batch = None  # takes any batch: stored models split and pad it (``run``)

    def __init__(self, options: RuntimeOptions, models: dict[int, bytes | Path] | None = None, module=None,
                 label: str = "the model"):
        self.version = require_runtime().version
        self.options = RUNTIMES["litert"].resolve(options)
        self.threads, self.label = self.options.cpu_threads, label
        self.models = {int(b): m for b, m in (models or {}).items()}
        self.module = module
        self.quantized = self.options.precision != "int8"  # a module to run in int8 is quantized on first use
        self.loaded: dict[int, TfliteModel] = {}

    def _model(self, batch: int, sample_shape) -> TfliteModel:
        if batch not in self.loaded:
            if batch in self.models:
                model = self.models[batch]
            elif self.module is not None:
                if not self.quantized:
                    self.module = quantize(self.module, sample_shape, random_batches((2, *sample_shape)))
                    self.quantized = True
                model = convert(self.module, batch, sample_shape, self.options.precision == "int8", self.label)
            else:
                raise LrexportError(f"{self.label} has LiteRT models for batch {', '.join(map(str, sorted(self.models)))}, "
                                    f"not {batch}: export with --batch {batch} or --batches including it")
            self.loaded[batch] = TfliteModel(model, self.threads, f"{self.label} (batch {batch})")
        return self.loaded[batch]

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.module is None and len(x) not in self.models:  # stored models: the largest batch, the last part padded
            return run_batched(self.run, x, max(self.models))
        return self._model(len(x), x.shape[1:]).run(x)

    def bind(self, x: np.ndarray) -> Callable[[], object]:
        return self._model(len(x), x.shape[1:]).bind(x)

    def settings(self) -> dict:
        return {"runtime": "litert", "version": self.version, "device": cpu_name(), "provider": "XNNPACK",
                "threads": self.threads, "precision": self.options.precision, "layout": LAYOUT}


# -- the backend ------------------------------------------------------------------------------------
def tflite_file(model: str, batch: int) -> str:
    return f"{Path(FILES[model]).stem}_b{batch}.tflite"


class LiteRTBackend(Backend):
    def require(self) -> str:
        require_converter()  # export, tuning and the guard convert; verify times what they wrote
        return require_runtime().version

    def open(self, source: ModelSource, options: RuntimeOptions) -> LiteRTRunner:
        if source.files:
            return LiteRTRunner(options, models=source.files, label=source.label)
        if source.torch is None:
            raise LrexportError(f"{source.label} has no LiteRT model; export it with --runtime litert")
        return LiteRTRunner(options, module=source.torch(), label=source.label)

    def open_many(self, sources: dict, options: RuntimeOptions, progress: Progress = quiet) -> dict:
        """Runners of one-input modules of known input shape (tuning's candidates), converted together
        (``convert_many``) by worker processes; the other sources one by one."""
        models = prepare_candidates(convert_many, sources, options.precision == "int8", BUNDLE_SIZE, progress)
        return {k: LiteRTRunner(options, models={s.input_shape[0]: models[k]}, label=s.label) if k in models
                else self.open(s, options) for k, s in sources.items()}

    def own_files(self, path: Path, meta: dict, model: str):
        files = ((meta.get("litert") or {}).get("files") or {}).get(model, {})
        return {int(b): path / f for b, f in files.items()} or None

    def serve(self, path: Path, meta: dict, model: str, threads: int | None):
        """The runner ``lrexport infer`` uses: the stored models, no torch."""
        files = self.own_files(path, meta, model)
        if not files:
            raise LrexportError(f"{path} holds no LiteRT model {model!r}; export it with --runtime litert")
        return LiteRTRunner(RuntimeOptions(threads=threads, precision=meta.get("precision")), models=files, label=f"the {model} model of {path}")

    def build(self, ctx: BuildContext) -> None:
        """.tflite models of both models at each deployment batch (``pt2e.build_per_batch``), in int8 quantized by
        litert-torch's quantizer."""
        from .pt2e import build_per_batch

        files = build_per_batch(
            ctx, self.name, "LiteRT int8 (PT2E, litert-torch's quantizer): activations int8 per tensor, weights int8 per channel, "
                            "symmetric; int8 input and output tensors", quantize_checked,
            lambda module, batch, int8, label: convert(module, batch, ctx.input_size, int8, label),
            lambda models, label: LiteRTRunner(ctx.options, models=models, label=label), "the LiteRT models do")
        ctx.files = {tflite_file(m, b): blob for m, by_batch in files.items() for b, blob in by_batch.items()}
        ctx.meta["litert"] = {"layout": LAYOUT, "files": {m: {str(b): tflite_file(m, b) for b in by_batch} for m, by_batch in files.items()}}
        ctx.versions.update({"litert-torch": require_converter().version, "ai-edge-litert": require_runtime().version})


BACKEND = LiteRTBackend(RUNTIMES["litert"])
