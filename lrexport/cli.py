"""Command line: parse, call one library function, print. Errors users cause exit non-zero."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console
from rich.markup import escape

from .errors import LrexportError

out = Console()
err = Console(stderr=True)


def reports_errors(fn):
    """Turn an LrexportError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LrexportError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(e.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrexport")
def main():
    """Learn low-rank CNNs (SVD training, energy pruning, finetuning) and deploy them."""


@main.command()
def models():
    """List the model names a recipe can use."""
    from .models import list_models

    for name in list_models():
        out.print(name, highlight=False)


# -- deployment: export, verify, infer -------------------------------------------------------
def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return sizes


@main.command()
@click.argument("run", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--format", "fmt", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Artifact directory (default: RUN/artifacts).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Fix the batch size (default: dynamic batch).")
@click.option("--multiple-of", type=click.IntRange(min=1), default=8, show_default=True, help="Align deployed ranks upward to this multiple (1: exact).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--check-images", type=click.IntRange(min=1), default=64, show_default=True, help="Validation images to compare runtimes on.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Largest relative error of the logits.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True, help="TensorRT only.")
@click.option("--trt-batch-sizes", default="1,8,32", show_default=True, callback=_int_list, help="TensorRT only, with a dynamic batch.")
@reports_errors
def export(run, fmt, out_dir, batch, multiple_of, opset, check_images, tolerance, precision, trt_batch_sizes):
    """Export RUN (default: newest under ./runs) to ONNX (and TensorRT): model.onnx, dense.onnx, meta.json."""
    from .deploy.export import export_run

    result = export_run(run, out_dir, fmt, batch, multiple_of, opset, check_images, tolerance, precision, trt_batch_sizes)
    out.print(_export_table(result.meta))
    for c in result.checks:
        out.print(f"  {c.what}: rel. error {c.rel_err:.1e}, max |diff| {c.max_abs:.1e}", highlight=False)
    out.print(f"artifacts: {result.out_dir}", highlight=False, soft_wrap=True)


def _export_table(meta: dict):
    from rich.table import Table

    table = Table(title=f"export of {meta['source']['name']} · batch {meta['batch'] or 'dynamic'} · ranks ×{meta['export']['multiple_of']}")
    for col in ("model", "file", "MACs", "deployed", "pairs", "dense", "convs"):
        table.add_column(col, justify="left" if col in ("model", "file") else "right")
    for name, m in meta["models"].items():
        layers = m.get("layers", [])
        pairs = sum(not layer["dense"] for layer in layers)
        table.add_row(
            name, m["file"], f"{m['macs'] / 1e6:.2f} M", f"{m['deployed_macs'] / 1e6:.2f} M", str(pairs),
            str(len(layers) - pairs) if layers else "all", str(m["ops"].get("Conv", 0)),
        )
    table.caption = f"MACs speedup {meta['macs_speedup']:.2f}x"
    return table


@main.command()
@click.argument("artifacts", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--runtime", type=click.Choice(["ort", "trt", "torch"]), default="ort", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: all CPUs).")
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_int_list, help="Batch sizes to time (dynamic-batch artifacts).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N validation images.")
@click.option("--tolerance", type=float, default=0.1, show_default=True, help="Accuracy points the runtime may differ from PyTorch.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), default=None, help="Source run (default: from meta.json).")
@reports_errors
def verify(artifacts, runtime, threads, batch_sizes, warmup, repeats, limit, tolerance, run_dir):
    """Accuracy and latency of ARTIFACTS (default: newest run's) through a runtime; writes verify.json."""
    from .deploy.verify import verify_artifacts

    result = verify_artifacts(artifacts, runtime, threads, batch_sizes, warmup, repeats, limit, tolerance, run_dir=run_dir)
    for table in _verify_tables(result.report):
        out.print(table)
    out.print(f"{result.artifacts_dir}/verify.json", highlight=False, soft_wrap=True)
    result.check()


def _verify_tables(r: dict):
    from rich.table import Table

    acc = r["accuracy"]
    k = acc["top5_k"]
    t1 = Table(title=f"accuracy through {r['runtime']} · {acc['images']} validation images")
    for col in ("model", "top-1 %", f"top-{k} %", "PyTorch top-1 %", f"PyTorch top-{k} %", "top-1 disagree"):
        t1.add_column(col, justify="left" if col == "model" else "right")
    for m in ("lowrank", "dense"):
        a = acc[m]
        t1.add_row(m, f"{a['top1']:.2f}", f"{a['top5']:.2f}", f"{a['torch_top1']:.2f}", f"{a['torch_top5']:.2f}", str(a["top1_disagree"]))
    t2 = Table(title=f"latency on {r['runtime']} · {r['threads']} threads · median of {r['timing']['repeats']} (p90)")
    for col in ("batch", "dense ms", "low-rank ms", "wall speedup", "MACs speedup", "ratio"):
        t2.add_column(col, justify="right")
    for row in r["latency"]:
        d, lr = row["dense"], row["lowrank"]
        t2.add_row(
            str(row["batch"]), f"{d['median_ms']:.3f} ({d['p90_ms']:.3f})", f"{lr['median_ms']:.3f} ({lr['p90_ms']:.3f})",
            f"{row['wall_speedup']:.2f}x", f"{r['macs']['speedup']:.2f}x", f"{row['ratio']:.2f}",
        )
    return t1, t2


@main.command()
@click.argument("artifacts", type=click.Path(file_okay=False, exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@reports_errors
def infer(artifacts, images, top_k, threads):
    """Classify IMAGES with the exported low-rank model (onnxruntime; no torch needed)."""
    from .deploy.runtime import infer as run_infer

    for pred in run_infer(artifacts, list(images), top_k, threads):
        out.print(pred.image, style="bold", highlight=False, soft_wrap=True)
        for name, prob in pred.top:
            out.print(f"  {100 * prob:6.2f}%  {name}", highlight=False)


if __name__ == "__main__":
    main()
