"""ExecuTorch with its XNNPACK backend: PyTorch's runtime for phones and boards, as a deployment target.

A model reaches it as a program (.pte): ``torch.export`` → ``to_edge_transform_and_lower`` with
the XNNPACK partitioner → ``to_executorch``. Each program has a static input shape: with a
dynamic batch, ExecuTorch 1.5's XNNPACK delegate refused batches above a bound of its own and
crashed (SIGSEGV) running a ResNet-18 below its bound here, so export writes one program per
deployment batch, and the runner lowers one per batch where it gets a module (tuning, the guard).

int8 is PT2E static quantization with ExecuTorch's ``XNNPACKQuantizer`` (activations int8 per
tensor, weights int8 per output channel, symmetric), ranges calibrated on images; a conv whose
own int8 error exceeds a bound stays in float, which XNNPACK runs in fp32 (``quantize_checked``).

ExecuTorch's Python runtime needs torch; a .pte runs without it only from ExecuTorch's own C++
runtime (and its Android/iOS bindings).
"""

from __future__ import annotations

import functools
import logging
import operator
from pathlib import Path
from importlib.metadata import version
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from ...errors import LrexportError, RuntimeMissingError, first_line
from ...io import muted
from ...progress import Progress, quiet
from ..artifacts import FILES
from ..timing import WALL, cpu_name
from . import RUNTIMES
from . import pt2e
from .base import Backend, BuildContext, ModelSource, RuntimeOptions, random_batches, run_batched
from .pt2e import Bundle, calibrate, exported, layer_of
from .workers import prepare_candidates


@functools.cache
def require():
    """The ExecuTorch modules lrexport uses; a RuntimeMissingError (one line, exit 2) where it is not installed."""
    # torchao, which ExecuTorch imports, logs a deprecation warning on torch's pytree logger at import
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
        from executorch.exir import to_edge_transform_and_lower
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise RuntimeMissingError(f'ExecuTorch is not installed (or not whole: {first_line(e)}): pip install "lrexport[executorch]"') from None
    finally:
        pytree_log.setLevel(level)
    with muted(2):  # its CPU probing prints what it could not read (ARM registers on x86) to stderr, once
        portable_lib._threadpool_get_thread_count()
    return SimpleNamespace(version=version("executorch"), partitioner=XnnpackPartitioner, lower=to_edge_transform_and_lower,
                           runtime=Runtime.get(), quantizer=XNNPACKQuantizer, config=get_symmetric_quantization_config,
                           prepare=prepare_pt2e, convert=convert_pt2e, pool=portable_lib)


def set_threads(threads: int) -> int:
    """Size XNNPACK's thread pool (one per process); returns the size it has."""
    pool = require().pool
    if pool._threadpool_get_thread_count() != threads:
        pool._unsafe_reset_threadpool(threads)  # "unsafe" while a program runs; no program runs here
    return pool._threadpool_get_thread_count()


# -- programs --------------------------------------------------------------------------------------
def lower(module: nn.Module, example: torch.Tensor, label: str = "the model") -> bytes:
    """``module`` (in eval mode: quantized modules refuse ``.eval()``) as an ExecuTorch program for inputs
    shaped like ``example``, XNNPACK running what it can."""
    et = require()
    try:
        program = torch.export.export(module, (example,))
        return et.lower(program, partitioner=[et.partitioner()]).to_executorch().buffer
    except Exception as e:  # export and lowering raise many types of their own
        raise LrexportError(f"ExecuTorch cannot lower {label}: {first_line(e)}") from None


def prepare(module: nn.Module, input_size, keep_float=(), more_inputs=()) -> fx.GraphModule:
    """``module`` exported with a free batch dimension and observed for XNNPACK's int8, except the
    convs named in ``keep_float`` (their module paths). ``more_inputs``: a Bundle's further input sizes."""
    et = require()
    keep_float = set(keep_float)
    graph = exported(module, input_size, *more_inputs)
    quantizer = et.quantizer().set_global(et.config(is_per_channel=True))
    if keep_float:
        quantizer.set_filter_function(lambda node: layer_of(node) not in keep_float)
    return et.prepare(graph, quantizer)


def quantize(module: nn.Module, input_size, batches: list[np.ndarray], keep_float=()) -> nn.Module:
    """``module`` in int8 as XNNPACK runs it (PT2E, ranges from ``batches``), any batch size."""
    return require().convert(calibrate(prepare(module, input_size, keep_float), batches))


def quantize_checked(module: nn.Module, input_size, batches: list[np.ndarray], max_layer_error: float | None) -> tuple[nn.Module, dict]:
    """``quantize`` with the per-layer error fallback (``pt2e.quantize_checked``): the int8 module and its evidence."""
    return pt2e.quantize_checked(functools.partial(prepare, module, input_size), require().convert, batches, max_layer_error)


# -- many programs at once (tuning) --------------------------------------------------------------
# Lowering has a large fixed cost per call (about 1 s here, mostly torch's decompositions), so tuning's
# hundreds of one-layer candidates are lowered together: one module holding many, exported and lowered
# once, each candidate's delegate then written as a program of its own. What remains is per candidate (XNNPACK
# runs its graph passes on each delegate) and single-threaded: the bundles are lowered by one worker per core.
BUNDLE_SIZE = 64  # candidates per lowering: bounds one lowering's memory; the fixed cost is already spread thin


@functools.cache
def per_component_partitioner():
    """A partitioner giving each connected component of XNNPACK's partitions a delegate of its own (XNNPACK's
    partitioner puts disjoint graphs in one delegate)."""
    from executorch.exir.backend.partitioner import Partitioner, PartitionResult

    class PerComponent(Partitioner):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def ops_to_not_decompose(self, program):
            return self.inner.ops_to_not_decompose(program)

        def partition(self, program):
            result = self.inner.partition(program)
            tagged = [n for n in result.tagged_exported_program.graph_module.graph.nodes if "delegation_tag" in n.meta]
            parent = {n: n for n in tagged}

            def root(n):
                while parent[n] is not n:
                    parent[n] = n = parent[parent[n]]
                return n

            for n in tagged:
                for a in n.all_input_nodes:
                    if a in parent and a.meta["delegation_tag"] == n.meta["delegation_tag"]:
                        parent[root(a)] = root(n)
            components, tags = {}, {}
            for n in tagged:
                old = n.meta["delegation_tag"]
                n.meta["delegation_tag"] = new = f"{old}_{components.setdefault(root(n), len(components))}"
                tags[new] = result.partition_tags[old]
            return PartitionResult(result.tagged_exported_program, tags)

    return PerComponent


def quantize_many(modules: list[nn.Module], sample_shapes) -> nn.Module:
    """A Bundle of ``modules`` in int8, each as ``quantize`` gives it on its ``random_batches`` (the one-by-one
    runner's calibration), quantized in one pass."""
    shapes = [tuple(s) for s in sample_shapes]
    data = [random_batches((2, *s)) for s in shapes]
    prepared = prepare(Bundle(modules), shapes[0], more_inputs=shapes[1:])
    return require().convert(calibrate(prepared, list(zip(*data))))


def lower_many(module: nn.Module, examples: list[torch.Tensor]) -> list[bytes] | None:
    """The program of each part of a Bundle ``module`` for inputs shaped like ``examples``, lowered together; None
    where the lowered bundle is not one XNNPACK delegate per part, reading that part's input only and giving
    its output only (then each part must be lowered alone)."""
    from executorch.exir.delegate import executorch_call_delegate

    et = require()
    program = et.lower(torch.export.export(module, tuple(examples)), partitioner=[per_component_partitioner()(et.partitioner())])
    exported = program.exported_program()
    graph = exported.graph_module
    nodes = {n.name: n for n in graph.graph.nodes}
    inputs = [nodes[name] for name in exported.graph_signature.user_inputs]
    outputs = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    if len(inputs) != len(examples) or len(outputs) != len(examples) or len(calls) != 2 * len(examples):
        return None  # anything beyond a delegate and its getitem per part
    lowered = []
    for x, y in zip(inputs, outputs):
        call = y.args[0] if y.op == "call_function" and y.target is operator.getitem and y.args[1] == 0 else None
        if (call is None or call.target is not executorch_call_delegate or list(call.args[1:]) != [x] or len(call.users) != 1
                or len(x.users) != 1):
            return None
        lowered.append(getattr(graph, call.args[0].target))
    return [part.buffer() for part in lowered]


def lower_bundle(modules: list[nn.Module], shapes: list[tuple], int8: bool) -> list[bytes] | None:
    """The program of each of ``modules`` (in int8 quantized first) for inputs of ``shapes``, lowered together
    (``lower_many``); None where they do not lower so, or fail to (each module alone then says what is wrong)."""
    try:
        with torch.no_grad():
            bundle = quantize_many(modules, [s[1:] for s in shapes]) if int8 else Bundle(modules).eval()
            return lower_many(bundle, [torch.zeros(s) for s in shapes])
    except Exception:  # noqa: BLE001 — export and lowering raise many types of their own
        return None


# -- the runner --------------------------------------------------------------------------------------
class ExecutorchRunner:
    """ExecuTorch programs on the CPU through XNNPACK: stored ones (one per batch), or lowered on demand
    from a module, per batch (in int8 quantized first, on random inputs: ranges do not change a kernel's speed)."""

    clock = WALL

    def __init__(self, options: RuntimeOptions, programs: dict[int, bytes | Path] | None = None,
                 module: nn.Module | None = None, label: str = "the model"):
        self.et = require()
        options = RUNTIMES["executorch"].resolve(options)
        self.options, self.label = options, label
        self.threads = set_threads(options.cpu_threads)
        self.programs = {int(b): p for b, p in (programs or {}).items()}
        self.module = module
        self.quantized = options.precision != "int8"  # a module to run in int8 is quantized on first use
        self.methods: dict[int, tuple] = {}  # batch -> (program bytes or file, loaded program, its method)

    def _deployable(self, sample_shape) -> nn.Module:
        if not self.quantized:
            self.module, self.quantized = quantize(self.module, sample_shape, random_batches((2, *sample_shape))), True
        return self.module

    def _method(self, batch: int, sample_shape):
        if batch not in self.methods:
            if batch in self.programs:
                program = self.programs[batch]
            elif self.module is not None:
                program = lower(self._deployable(sample_shape), torch.zeros(batch, *sample_shape), self.label)
            else:
                raise LrexportError(f"{self.label} has ExecuTorch programs for batch {', '.join(map(str, sorted(self.programs)))}, "
                                    f"not {batch}: export with --batch {batch} or --batches including it")
            try:
                loaded = self.et.runtime.load_program(program)
                # the method reads its program's memory: the program (and its bytes) must outlive it
                self.methods[batch] = (program, loaded, loaded.load_method("forward"))
            except Exception as e:
                raise LrexportError(f"ExecuTorch cannot load {self.label} (batch {batch}): {first_line(e)}") from None
        return self.methods[batch][-1]

    @staticmethod
    def _tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.module is None and len(x) not in self.programs:  # stored programs: the largest batch, the last part padded
            return run_batched(self.run, x, max(self.programs))
        return self._method(len(x), x.shape[1:]).execute([self._tensor(x)])[0].numpy()

    def bind(self, x: np.ndarray) -> Callable[[], object]:
        self._method(len(x), x.shape[1:])
        loaded, inputs = self.methods[len(x)], [self._tensor(x)]
        # the call holds the loaded program, not just its method: a runner dropped after binding must not free it
        return lambda: loaded[-1].execute(inputs)

    def settings(self) -> dict:
        return {"runtime": "executorch", "version": self.et.version, "device": cpu_name(), "provider": "XNNPACK",
                "threads": self.threads, "precision": self.options.precision}


# -- the backend ---------------------------------------------------------------------------------------
def pte_file(model: str, batch: int) -> str:
    return f"{Path(FILES[model]).stem}_b{batch}.pte"


class ExecutorchBackend(Backend):
    def require(self) -> str:
        return require().version

    def open(self, source: ModelSource, options: RuntimeOptions) -> ExecutorchRunner:
        if source.files:
            return ExecutorchRunner(options, programs=source.files, label=source.label)
        if source.torch is None:
            raise LrexportError(f"{source.label} has no ExecuTorch program; export it with --runtime executorch")
        return ExecutorchRunner(options, module=source.torch(), label=source.label)

    def open_many(self, sources: dict, options: RuntimeOptions, progress: Progress = quiet) -> dict:
        """Sources with a module and one input shape lowered in bundles (``lower_bundle``) by worker processes; the
        others, and a bundle that does not lower to one delegate per module, one by one."""
        programs = prepare_candidates(lower_bundle, sources, options.precision == "int8", BUNDLE_SIZE, progress)
        return {k: ExecutorchRunner(options, programs={s.input_shape[0]: programs[k]}, label=s.label) if k in programs
                else self.open(s, options) for k, s in sources.items()}

    def own_files(self, path: Path, meta: dict, model: str):
        return {int(b): path / f for b, f in (meta.get("pte") or {}).get(model, {}).items()} or None

    def build(self, ctx: BuildContext) -> None:
        """Programs of both models at each deployment batch (``pt2e.build_per_batch``), in int8 quantized by XNNPACK's quantizer."""
        programs = pt2e.build_per_batch(
            ctx, self.name, "XNNPACK int8 (PT2E): activations int8 per tensor, weights int8 per channel, symmetric", quantize_checked,
            lambda module, batch, _, label: lower(module, torch.zeros(batch, *ctx.input_size), label),
            lambda files, label: ExecutorchRunner(ctx.options, programs=files, label=label), "the ExecuTorch programs do")
        ctx.files = {pte_file(m, b): blob for m, by_batch in programs.items() for b, blob in by_batch.items()}
        ctx.meta["pte"] = {m: {str(b): pte_file(m, b) for b in by_batch} for m, by_batch in programs.items()}
        ctx.versions["executorch"] = require().version


BACKEND = ExecutorchBackend(RUNTIMES["executorch"])
