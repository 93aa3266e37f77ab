"""One GPU check, under 5 minutes on one H100-class GPU; prints one Markdown report.

1. Training throughput: ResNet-18, 224×224 synthetic batches already on the GPU, dense vs
   full-rank SVD training (channel and spatial; orthogonality + Hoyer terms), AMP bf16,
   channels_last, cudnn.benchmark; interleaved rounds, images/s from CUDA events.
2. Inference latency, dense vs low-rank ResNet-18 and ResNet-50: the low-rank model is the
   channel-wise decomposition truncated to ~2× fewer MACs (ranks multiples of 8); both are
   rewritten to plain convs with BatchNorm folded. Timed in PyTorch (fp16, channels_last,
   CUDA graph replay), through TensorRT (fp16 engine) and onnxruntime-gpu when present.

    python benchmarks/gpu/gpu_check.py [--json out.json]
    python benchmarks/gpu/gpu_check.py --dry-run        # CPU, tiny sizes: checks the code paths

Weights are random: latency and throughput do not depend on them. Nothing is asserted;
the targets are printed beside the numbers (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import lrexport
from lrexport.deploy.backends.pytorch import RuntimeOptions, TorchRunner
from lrexport.deploy.timing import Stats, interleave
from lrexport.deploy.onnx_graph import to_onnx
from lrexport.errors import LrexportError, RuntimeMissingError
from lrexport.lowrank import count_macs, decompose, round_rank, svd_layers, truncate
from lrexport.lowrank.rewrite import to_plain as rewrite
from lrexport.train.loop import Loss

TRAIN_TARGET = 0.9  # SVD-training images/s ≥ 0.9 × dense
LATENCY_TARGET = 1.5  # low-rank ResNet-50 at 2× fewer MACs ≥ 1.5× faster, fp16, batch 64


@dataclass
class Settings:
    device: str
    image_size: int
    train_batch: int
    train_steps: int
    train_rounds: int
    latency_batches: tuple[int, ...]
    repeats: int
    warmup: int
    models: tuple[str, ...]
    train_model: str
    macs_speedup: float
    amp: bool
    half: bool
    cuda_graphs: bool
    compile_regularizers: bool
    trt: bool
    ort: bool
    trt_opt_level: int | None
    budget_s: float
    workdir: Path
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# -- environment -----------------------------------------------------------------------------
def environment(s: Settings) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": s.device}
    if s.cuda:
        env |= {
            "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        }
    else:
        env |= {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception:
        env["tensorrt"] = None
    import onnxruntime as ort

    env["onnxruntime"] = ort.__version__
    env["ort_providers"] = ort.get_available_providers()
    return env


# -- 1. training throughput ------------------------------------------------------------------
def train_step_fn(model: nn.Module, s: Settings, loss: Loss):
    """One training step as lrexport's loop does it (regularizers outside autocast), minus its per-step host syncs."""
    x = torch.randn(s.train_batch, 3, s.image_size, s.image_size, device=s.device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(1000, (s.train_batch,), device=s.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    amp = torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.amp)

    def step() -> None:
        with amp:
            logits = model(x)
        total = loss.total(loss.terms(model, logits.float(), y))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def training_throughput(s: Settings) -> dict:
    torch.manual_seed(0)
    dense = lrexport.create_model(s.train_model, num_classes=1000).to(s.device)
    models, losses = {"dense": dense}, {"dense": Loss()}
    svd_loss = Loss(ortho=5.0, sparsity_type="hoyer", decay=1e-3)  # λ_o as the paper's ImageNet ResNet-18
    for mode in ("channel", "spatial"):
        # full rank, as SVD training runs; the float64 SVDs run on the device (much faster than a CPU)
        models[f"svd-{mode}"] = decompose(copy.deepcopy(dense), mode)
        losses[f"svd-{mode}"] = svd_loss.compiled() if s.compile_regularizers else svd_loss
        if s.compile_regularizers:  # what compiling saves: the same step with eager regularizers
            models[f"svd-{mode} (eager regularizers)"], losses[f"svd-{mode} (eager regularizers)"] = models[f"svd-{mode}"], svd_loss
    steps = {}
    for name, model in models.items():
        model.to(s.device, memory_format=torch.channels_last).train()
        steps[name] = train_step_fn(model, s, losses[name])
    for name, step in steps.items():  # cudnn.benchmark picks its kernels here
        for _ in range(3):
            step()
    per_round = max(1, s.train_steps // s.train_rounds)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(s.train_rounds):
        names = list(steps)
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            t = interleave({name: lambda: [steps[name]() for _ in range(per_round)]}, warmup=0, repeats=1, cuda=s.cuda)
            rates[name].append(per_round * s.train_batch / (t.times_ms[name][0] / 1e3))
    out = {"model": s.train_model, "batch": s.train_batch, "image_size": s.image_size, "steps_per_round": per_round, "rounds": s.train_rounds, "modes": {}}
    base = statistics.median(rates["dense"])
    for name, r in rates.items():
        out["modes"][name] = {"images_per_s": statistics.median(r), "min": min(r), "max": max(r), "ratio": statistics.median(r) / base}
    for model in models.values():
        model.cpu()
    if s.cuda:
        torch.cuda.empty_cache()
    return out


# -- 2. low-rank models ------------------------------------------------------------------------
def _layer_inputs(model: nn.Module, input_size) -> dict[str, tuple[int, int]]:
    sizes, hooks = {}, []
    for name, layer in svd_layers(model):
        hooks.append(layer.register_forward_pre_hook(lambda m, inp, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def ranks_for_speedup(model: nn.Module, input_size, target: float, multiple_of: int = 8) -> tuple[dict[str, int], float]:
    """Per-layer ranks (one fraction of each full rank, rounded to ``multiple_of``) for ≈ ``target``× fewer MACs.

    ``model`` is decomposed at full rank. Returns (ranks, MACs speedup they give). A layer
    at or above its break-even rank is costed dense, as it will be deployed.
    """
    layers = dict(svd_layers(model))
    sizes = _layer_inputs(model, input_size)
    total_dense = count_macs(model, tuple(input_size)).dense
    svd_dense = sum(layers[n].macs(sizes[n])[0] for n in layers)
    fixed = total_dense - svd_dense  # layers left dense (fc, …)

    def ranks_at(f: float) -> dict[str, int]:
        return {n: round_rank(max(1, round(f * l.full_rank)), multiple_of, l.full_rank) for n, l in layers.items()}

    def speedup(ranks: dict[str, int]) -> float:
        cost = fixed + sum(min(layers[n].macs(sizes[n], r)) for n, r in ranks.items())
        return total_dense / cost

    lo, hi = 0.0, 1.0  # speedup falls as f grows: keep the largest f that still reaches target
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(ranks_at(mid)) >= target else (lo, mid)
    ranks = ranks_at(lo if lo > 0 else 1.0 / 64)
    return ranks, speedup(ranks)


def to_plain(model: nn.Module, input_size) -> nn.Module:
    return rewrite(model, input_size, multiple_of=8)[0]


def model_pair(name: str, s: Settings) -> dict:
    """Dense and low-rank plain models (CPU, fp32, eval) with their MACs."""
    input_size = (3, s.image_size, s.image_size)
    torch.manual_seed(0)
    dense = lrexport.create_model(name, num_classes=1000).eval()
    lowrank = decompose(copy.deepcopy(dense).to(s.device), "channel").cpu()  # SVDs on the device, the rest on the CPU
    ranks, predicted = ranks_for_speedup(lowrank, input_size, s.macs_speedup)
    for layer_name, layer in svd_layers(lowrank):
        if ranks[layer_name] < layer.rank:
            truncate(layer, ranks[layer_name])
    dense_macs, lowrank_macs = count_macs(dense, input_size).deployed, count_macs(lowrank, input_size).deployed
    return {
        "dense": to_plain(dense, input_size), "lowrank": to_plain(lowrank, input_size),
        "macs": {"dense": dense_macs, "lowrank": lowrank_macs, "speedup": dense_macs / lowrank_macs, "predicted": predicted},
    }


# -- 3. runtimes -------------------------------------------------------------------------------
def torch_latency(model: nn.Module, batch: int, s: Settings) -> Stats:
    """lrexport's torch runtime: fp16 channels_last replayed as a CUDA graph on the GPU; fp32 eager on the CPU."""
    options = RuntimeOptions(device="cuda" if s.cuda else "cpu", precision="fp16" if s.half else "fp32",
                             channels_last=True, cuda_graph=s.cuda_graphs)
    runner = TorchRunner(copy.deepcopy(model).eval(), options)
    x = np.random.default_rng(0).standard_normal((batch, 3, s.image_size, s.image_size), dtype=np.float32)
    return interleave({"torch": runner.bind(x)}, s.warmup, s.repeats, cuda=s.cuda).stats("torch", batch)


def export_onnx(model: nn.Module, path: Path, input_size) -> Path:
    onnx.save(to_onnx(model, input_size, batch=None), str(path))
    return path


def trt_latency(onnx_path: Path, batches, s: Settings) -> dict[int, Stats]:
    from lrexport.deploy.backends.trt import TrtRunner, build_engine

    # one folder for all engines: the builds share its timing cache
    engine = build_engine(onnx_path, s.workdir / "trt", precision="fp16", batch_sizes=batches,
                          engine_name=f"{onnx_path.stem}.engine", optimization_level=s.trt_opt_level)
    runner = TrtRunner(engine)
    x = np.random.default_rng(0).standard_normal((max(batches), 3, s.image_size, s.image_size), dtype=np.float32)
    return {b: interleave({"trt": runner.bind(x[:b])}, s.warmup, s.repeats, cuda=True).stats("trt", b) for b in batches}


def ort_latency(onnx_path: Path, batches, s: Settings) -> tuple[str, dict[int, Stats]]:
    """onnxruntime with the provider ort_providers() picks; on CUDA, I/O bound on the device."""
    import onnxruntime as ort

    from lrexport.deploy.backends.ort import CUDA, ort_providers, session_provider

    providers = ort_providers(prefer_gpu=s.cuda)
    if s.cuda and CUDA not in providers:
        raise RuntimeMissingError("onnxruntime-gpu is not installed (no CUDAExecutionProvider)")
    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    ran = session_provider(sess)
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    result = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, 3, s.image_size, s.image_size), dtype=np.float32)
        if ran == CUDA:
            binding = sess.io_binding()
            binding.bind_ortvalue_input(inp, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            binding.bind_output(out, "cuda")
            fn = lambda binding=binding: sess.run_with_iobinding(binding)  # noqa: E731  (returns after the GPU is done)
        else:
            fn = lambda x=x: sess.run([out], {inp: x})  # noqa: E731
        result[b] = interleave({"ort": fn}, s.warmup, s.repeats).stats("ort", b)
    return ran, result


# -- report ------------------------------------------------------------------------------------
def fmt(t: Stats | None) -> str:
    return "–" if t is None else f"{t.median_ms:.3f} ({t.p10_ms:.3f}–{t.p90_ms:.3f})"


def markdown(report: dict, s: Settings) -> str:
    env = report["environment"]
    where = env.get("gpu") or f"CPU {env.get('cpu')} ({env.get('threads')} threads)"
    lines = [
        f"## gpu_check{' (dry run: tiny sizes on the CPU, numbers mean nothing)' if not s.cuda else ''}",
        "",
        f"{where}; torch {env['torch']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, TensorRT {env['tensorrt']}, "
        f"onnxruntime {env['onnxruntime']}; image {s.image_size}×{s.image_size}, {report['seconds']:.0f} s in all.",
        "",
    ]
    tr = report.get("training")
    if tr:
        lines += [
            f"Training, {tr['model']}, batch {tr['batch']}, {tr['rounds']} interleaved rounds of {tr['steps_per_round']} steps, "
            f"{'AMP bf16' if s.amp else 'fp32'}, channels_last:",
            "",
            "| mode | images/s (median) | min–max over rounds | ratio to dense |",
            "|---|---|---|---|",
        ]
        for name, m in tr["modes"].items():
            lines.append(f"| {name} | {m['images_per_s']:.0f} | {m['min']:.0f}–{m['max']:.0f} | {m['ratio']:.3f} |")
        lines.append("")
    lines += [
        "Latency, ms per batch: median (p10–p90); low-rank = channel-wise, ranks multiples of 8, BN folded.",
        "",
        "| model | batch | runtime | precision | dense | low-rank | wall-clock speedup | MACs speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["latency"]:
        d, l = row.get("dense"), row.get("lowrank")
        speed = f"{d.median_ms / l.median_ms:.2f}×" if d and l else row.get("note", "–")
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['runtime']} | {row['precision']} | {fmt(d)} | {fmt(l)} | {speed} | {row['macs_speedup']:.2f}× |"
        )
    lines += ["", "Targets (docs/gpu.md):"]
    for line in report["targets"]:
        lines.append(f"- {line}")
    return "\n".join(lines)


def targets(report: dict, s: Settings) -> list[str]:
    if not s.cuda:
        return ["dry run on the CPU: targets not evaluated"]
    out = []
    tr = report.get("training")
    if tr:
        for name, m in tr["modes"].items():
            if name != "dense":
                out.append(f"{name} training images/s ≥ {TRAIN_TARGET}× dense: {m['ratio']:.3f} → {'met' if m['ratio'] >= TRAIN_TARGET else 'NOT met'}")
    big = max(s.latency_batches)
    for row in report["latency"]:
        if row["model"] == "resnet50" and row["batch"] == big and row.get("dense") and row.get("lowrank"):
            if row["runtime"] in ("pytorch", "tensorrt"):
                r = row["dense"].median_ms / row["lowrank"].median_ms
                out.append(f"resnet50 {row['runtime']} {row['precision']} batch {big}: low-rank ≥ {LATENCY_TARGET}× faster: {r:.2f}× → {'met' if r >= LATENCY_TARGET else 'NOT met'}")
    return out


def run(s: Settings) -> dict:
    torch.backends.cudnn.benchmark = True
    report = {"environment": environment(s), "latency": []}
    log(f"environment: {report['environment']}")
    log("training throughput…")
    report["training"] = training_throughput(s)
    input_size = (3, s.image_size, s.image_size)
    pairs = {}
    for name in s.models:
        log(f"{name}: choosing ranks, rewriting to plain convs…")
        pairs[name] = model_pair(name, s)
        for b in s.latency_batches:
            row = {"model": name, "batch": b, "runtime": "pytorch", "precision": "fp16" if s.half else "fp32",
                   "macs_speedup": pairs[name]["macs"]["speedup"]}
            for variant in ("dense", "lowrank"):
                row[variant] = torch_latency(pairs[name][variant], b, s)
            report["latency"].append(row)
    # exported runtimes: ResNet-50 first, since the latency target is about it
    for name in sorted(s.models, key=lambda n: n != "resnet50"):
        paths = {v: export_onnx(pairs[name][v], s.workdir / f"{name}-{v}.onnx", input_size) for v in ("dense", "lowrank")}
        macs = pairs[name]["macs"]["speedup"]
        for runtime, enabled in (("tensorrt", s.trt), ("onnxruntime", s.ort)):
            if not enabled:
                continue
            rows = {b: {"model": name, "batch": b, "runtime": runtime, "precision": "fp16" if runtime == "tensorrt" else "fp32",
                        "macs_speedup": macs} for b in s.latency_batches}
            if s.over_budget():
                note = "skipped: time budget"
            else:
                note = ""
                try:
                    for v, path in paths.items():
                        log(f"{name} {v}: {runtime}…")
                        if runtime == "tensorrt":
                            timings = trt_latency(path, s.latency_batches, s)
                        else:
                            provider, timings = ort_latency(path, s.latency_batches, s)
                            for b in rows:
                                rows[b]["runtime"] = f"onnxruntime ({provider.removesuffix('ExecutionProvider')})"
                        for b, t in timings.items():
                            rows[b][v] = t
                except LrexportError as e:  # RuntimeMissingError above all: TensorRT or onnxruntime-gpu absent
                    note = f"n/a: {e}"
            for row in rows.values():
                if note:
                    row["note"] = note
                report["latency"].append(row)
    report["macs"] = {name: p["macs"] for name, p in pairs.items()}
    report["seconds"] = time.perf_counter() - s.started
    report["targets"] = targets(report, s)
    return report


def parse(argv=None) -> tuple[Settings, str | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the code paths, measures nothing")
    p.add_argument("--image-size", type=int)
    p.add_argument("--train-batch", type=int)
    p.add_argument("--train-steps", type=int, help="timed steps per mode, split over the rounds")
    p.add_argument("--train-rounds", type=int, default=3)
    p.add_argument("--latency-batches", help="comma-separated, e.g. 1,64")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--models", help="comma-separated model names for latency (default resnet18,resnet50; dry run cifar_resnet20)")
    p.add_argument("--train-model", help="model for training throughput (default resnet18; dry run cifar_resnet20)")
    p.add_argument("--macs-speedup", type=float, default=2.0, help="low-rank model's MACs reduction")
    p.add_argument("--eager-regularizers", action="store_true", help="do not torch.compile the regularizer terms (lrexport compiles them on CUDA)")
    p.add_argument("--no-trt", action="store_true")
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--trt-opt-level", type=int, help="TensorRT builder optimization level 0…5 (default: TensorRT's own, 3)")
    p.add_argument("--budget-s", type=float, default=200, help="start no further exported-runtime run after this many seconds")
    p.add_argument("--workdir", help="where ONNX files and engines go (default: a temporary folder)")
    p.add_argument("--json", help="also write the full report here")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        p.exit(2, "gpu_check: no CUDA GPU visible; run with --dry-run to check the code paths on the CPU\n")
    dry = a.dry_run
    pick = lambda v, gpu, cpu: v if v is not None else (cpu if dry else gpu)  # noqa: E731
    return Settings(
        device="cpu" if dry else "cuda",
        image_size=pick(a.image_size, 224, 32),
        train_batch=pick(a.train_batch, 128, 4),
        train_steps=pick(a.train_steps, 240, 3),
        train_rounds=a.train_rounds if not dry else 1,
        latency_batches=tuple(int(b) for b in pick(a.latency_batches, "1,64", "1,2").split(",")),
        repeats=pick(a.repeats, 200, 3),
        warmup=pick(a.warmup, 30, 1),
        # the dry run uses a CIFAR ResNet: decomposing torchvision ResNets takes minutes on a small CPU
        models=tuple(m for m in pick(a.models, "resnet18,resnet50", "cifar_resnet20").split(",") if m),  # "": training only
        train_model=pick(a.train_model, "resnet18", "cifar_resnet20"),
        macs_speedup=a.macs_speedup,
        amp=not dry, half=not dry, cuda_graphs=not dry, compile_regularizers=not dry and not a.eager_regularizers,
        trt=not a.no_trt, ort=not a.no_ort, trt_opt_level=a.trt_opt_level, budget_s=a.budget_s,
        workdir=Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="lrexport-gpu-check-")),
    ), a.json


def main(argv=None) -> dict:
    s, json_path = parse(argv)
    s.workdir.mkdir(parents=True, exist_ok=True)
    report = run(s)
    print(markdown(report, s))
    if json_path:
        serial = copy.deepcopy(report)
        for row in serial["latency"]:
            for v in ("dense", "lowrank"):
                if row.get(v) is not None:
                    row[v] = row[v].to_dict()
        Path(json_path).write_text(json.dumps(serial, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
