"""Command line: parse, call one library function, print. Errors users cause exit non-zero."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from .errors import LrexportError
from .progress import (EnergyStep, EpochEnd, LayerTimed, LayerTuned, Message, PhaseEnd, PhaseStart, RunEnd, RunStart, Step,
                       SweepStart, Warn)

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


class _LiveBar:
    """A rich progress display that the library's progress callback draws into."""

    bar = None  # a rich Progress, set by the subclass

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


class TrainProgress(_LiveBar):
    """Draws the library's progress events with rich: one bar per phase, a line per epoch."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.fields[phase]:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=out, transient=False,
        )
        self.task = None

    def __call__(self, event) -> None:
        match event:
            case PhaseStart(epochs=epochs) if epochs:
                self.task = self.bar.add_task("", total=epochs * event.steps, phase=event.phase, info="")
            case Step() if self.task is not None:
                self.bar.update(self.task, advance=event.advance, info=f"epoch {event.epoch} loss {event.loss:.3f} ce {event.ce:.3f}")
            case EpochEnd(record=data):
                acc = f" val top-1 {data['top1']:.2f}%" if "top1" in data else ""
                extra = "".join(f" {k} {data[k]:.4g}" for k in ("ortho", "sparsity") if data.get(k))
                self.bar.console.print(
                    f"  {event.phase} epoch {event.epoch}: loss {data['loss']:.4f} (ce {data['ce']:.4f}{extra}){acc}"
                    f" · {data['images_per_s']:.0f} img/s", highlight=False, soft_wrap=True)
            case LayerTimed():
                self.bar.console.print(f"  {event.phase}: timed {event.layer} on the target runtime ({event.done}/{event.total})",
                                       highlight=False, soft_wrap=True)
            case Message():
                self.bar.console.print(event.text, highlight=False, soft_wrap=True)
            case Warn():
                err.print(f"[yellow]warning:[/] {escape(event.message)}", highlight=False, soft_wrap=True)
            case PhaseEnd():
                if self.task is not None:
                    self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
                self.task = None


def summary_table(summary: dict):
    from rich.table import Table

    table = Table(title=f"{summary['name']} · {summary['run_dir']}")
    # a phase that rolled back after a non-finite or diverged step (train.recoveries): how often, the lr it ended at
    recovered = any(res.get("recoveries") for res in summary["phases"].values())
    for col in ("phase", "epochs", "top-1 %", "top-5 %", "MACs", "speedup") + (("recoveries",) if recovered else ()):
        table.add_column(col, justify="right" if col != "phase" else "left")
    dense_macs = summary["macs"]["dense_macs"]
    for phase, res in summary["phases"].items():
        if "top1" not in res:  # a skipped phase
            continue
        macs = res.get("macs")  # recorded by the pipeline as each phase completed (older runs: not recorded)
        top1 = res.get("best_top1", res.get("top1"))
        rec = res.get("recoveries", [])
        table.add_row(
            phase + (" (best)" if "best_top1" in res else ""), str(res.get("epochs", "")), f"{top1:.2f}", f"{res.get('top5', 0):.2f}",
            f"{macs / 1e6:.2f} M" if macs else "-", f"{dense_macs / macs:.2f}x" if macs else "-",
            *((f"{len(rec)} (lr → {rec[-1]['lr']:.3g})" if rec else "0",) if recovered else ()),
        )
    return table


def channels_table(summary: dict):
    """What the channels phase removed: per layer whose width changed, its input and output channels before → after."""
    from rich.table import Table

    ch = summary["channels"]
    table = Table(title=f"channels · {ch['ratio']:.1%} of each prunable group asked (widths then rounded), "
                        f"{ch['speedup']:.2f}x fewer MACs")
    for col in ("layer", "in", "out"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, w in ch["layers"].items():
        table.add_row(name, *(f"{a} → {b}" if a != b else str(a) for a, b in (w["in"], w["out"])))
    return table


def layers_table(summary: dict):
    """Every conv and linear layer: its ranks (full → kept) where decomposed, else why it stayed dense."""
    from rich.table import Table

    table = Table(title="layers")
    for col in ("layer", "type", "shape", "rank", "left dense because"):
        table.add_column(col, justify="right" if col == "rank" else "left")
    for name, layer in summary.get("layers", {}).items():
        ranks = summary.get("ranks", {}).get(name)
        rank = f"{ranks['full']} → {ranks.get('final', ranks['pruned'])}" if layer["decomposed"] and ranks else "dense"
        table.add_row(name, layer["type"], layer["shape"], rank, layer["reason"])
    return table


def output_option(help: str, *old_names: str):
    """``--output DIR``: one name for the output directory in every command; ``old_names`` still work, unlisted."""
    aliases = {name: f"{name.lstrip('-').replace('-', '_')}_alias" for name in old_names}

    def decorate(fn):
        @functools.wraps(fn)  # keeps the options declared below (click keeps them on the function)
        def merged(*args, output=None, **kwargs):
            given = {name: v for name, param in aliases.items() if (v := kwargs.pop(param)) is not None}
            if output is not None:
                given["--output"] = output
            if len(set(given.values())) > 1:
                raise click.UsageError(f"{' and '.join(given)} are one option (the output directory); give it once")
            return fn(*args, output=next(iter(given.values()), None), **kwargs)

        for name, param in aliases.items():
            merged = click.option(name, param, type=click.Path(file_okay=False), default=None, hidden=True)(merged)
        return click.option("--output", type=click.Path(file_okay=False), default=None, help=help)(merged)

    return decorate


@main.command()
@click.argument("recipe", type=click.Path(path_type=str))  # load_recipe judges it: one line, exit 2
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. --set reg.decay=0.01 (repeatable).")
@output_option("Run directory (default: <output_dir>/<name>-<time>).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN]",
              help="Continue an interrupted run: the newest run of this recipe, or the run directory given.")
@click.option("--previous", is_flag=True, help="With --resume: use the checkpoint before the last one (if the last is corrupt).")
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Processes on this machine (runs torchrun for you).")
@reports_errors
def train(recipe, overrides, output, resume, previous, nproc):
    """Run a recipe: SVD training, energy pruning and low-rank finetuning."""
    if nproc and nproc > 1:
        sys.exit(_torchrun(nproc))
    from .recipe import load_recipe

    rec = load_recipe(recipe, overrides)  # before importing torch: a bad recipe fails in a blink
    from .train import run_recipe

    resume = True if resume == "latest" else resume
    with TrainProgress() as progress:
        result = run_recipe(rec, output, progress, resume=resume, previous=previous)
    from .rundir import SUMMARY

    s = result.summary
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    out.print(summary_table(s))
    if s.get("channels"):
        out.print(channels_table(s))
    if s.get("layers"):
        out.print(layers_table(s))
    out.print(
        f"base top-1 {s['base_top1']:.2f}% → best finetuned {s['best_finetune_top1']:.2f}% "
        f"(gain {s['accuracy_gain']:+.2f}), MACs speedup {s['macs_speedup']:.2f}x · {result.run_dir / SUMMARY}",
        highlight=False,
    )


def _torchrun(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lrexport", *args]
    import signal

    proc, stopped = subprocess.Popen(cmd), []

    def forward(signum, frame):  # torchrun hands a SIGTERM to the workers: they save last.pt and stop
        stopped.append(signum)
        proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached torchrun and the workers too: wait while they save
                stopped.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
    return 130 if stopped and code else code  # as one process exits when a signal stopped it (torchrun says 1)


@main.command()
def models():
    """List the model names a recipe can use."""
    from .models import list_models

    for name in list_models():
        out.print(name, highlight=False)
    out.print("and any timm model as timm/NAME (pip install \"lrexport[timm]\"), or your own as package.module:factory "
              "(docs/recipes.md, \"Your own model\")", highlight=False, markup=False, soft_wrap=True)


# -- deployment: export, verify, infer -------------------------------------------------------
class GroupedCommand(click.Command):
    """A command whose --help lists its options in sections: ``groups`` maps a title to parameter names."""

    def __init__(self, *args, groups: dict[str, tuple[str, ...]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups = groups or {}

    def format_options(self, ctx, formatter):
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        sections = {title: [records[n] for n in names if records.get(n)] for title, names in self.groups.items()}
        placed = {n for names in self.groups.values() for n in names}
        sections["Other options"] = [r for n, r in records.items() if r and n not in placed]
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def aliases(param: str, *old_names: str, callback=None):
    """Old spellings of option ``param`` (declared below this decorator): still accepted, not listed in --help."""
    hidden = {name: f"{name.lstrip('-').replace('-', '_')}_alias" for name in old_names}

    def decorate(fn):
        @functools.wraps(fn)
        def merged(*args, **kwargs):
            given = {name: v for name, p in hidden.items() if (v := kwargs.pop(p)) is not None}
            if kwargs[param] is not None:
                given[f"--{param.replace('_', '-')}"] = kwargs[param]
            if len(set(map(str, given.values()))) > 1:
                raise click.UsageError(f"{' and '.join(given)} are one option; give it once")
            kwargs[param] = next(iter(given.values()), None)
            return fn(*args, **kwargs)

        for name, p in hidden.items():
            merged = click.option(name, p, default=None, hidden=True, callback=callback)(merged)
        return merged

    return decorate


def _int_list(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return sizes


def _runtime_help() -> str:
    from .deploy.backends import RUNTIMES

    return "; ".join(f"{name}: {e.describe()}" for name, e in RUNTIMES.items())


def _given(*names: str) -> list[str]:
    """The options among ``names`` (parameter names) the user gave, as they are spelled."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}
    return [params[n].opts[0] for n in names if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]


def runtime_options(fn):
    """The options every command that runs a model shares: which runtime, and how it runs."""
    from .deploy.backends import DEFAULT_RUNTIME, RUNTIMES, all_devices, all_precisions

    for option in reversed([
        click.option("--runtime", default=None, metavar="|".join(RUNTIMES),
                     help=f"Runtime to deploy on / measure with (default: export: {DEFAULT_RUNTIME}; verify: the one exported for)."),
        click.option("--device", type=click.Choice(all_devices()), default=None,
                     help="Device (default: the runtime's first, as --precision lists them)."),
        click.option("--precision", type=click.Choice(all_precisions()), default=None,
                     help=f"Precision (default: the runtime's first here). {_runtime_help()}."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads of the runtime (default: all CPUs)."),
        click.option("--channels-last", is_flag=True, help="channels_last memory format (runtimes that run the module)."),
    ]):
        fn = option(fn)
    return fn


def _runtime_options(threads, device, precision, channels_last):
    from .deploy.backends import RuntimeOptions

    return RuntimeOptions(threads=threads, device=device, precision=precision, channels_last=channels_last)


EXPORT_GROUPS = {
    "Target": ("runtime", "device", "precision", "batch", "batches", "output"),
    "Planning": ("no_tune", "tune_cache", "tune_below", "tune_images", "multiple_of"),
    "Checks": ("check_images", "parity_tolerance", "opset"),
    "int8": ("calibration_images", "calibration_split", "max_layer_error"),
    "Runtime-specific": ("threads", "channels_last"),
}
TUNING, INT8 = EXPORT_GROUPS["Planning"][1:4], EXPORT_GROUPS["int8"]  # --no-tune asks for what such a runtime does anyway


def _format_alias(ctx, param, value):
    """``--format onnx|<runtime>``: the old spelling of the target ("onnx": the default runtime)."""
    return None if value == "onnx" else value


@main.command(cls=GroupedCommand, groups=EXPORT_GROUPS)
@click.argument("run", required=False, type=click.Path(file_okay=False, exists=True))
@aliases("runtime", "--format", callback=_format_alias)
@runtime_options
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Fix the input's batch size, and plan and build at it (default: dynamic).")
@aliases("batches", "--tune-batches", callback=_int_list)
@click.option("--batches", default=None, callback=_int_list,
              help="A dynamic batch's batches to plan (time) and build for (programs, engines); default 1,8.")
@output_option("Artifact directory (default: RUN/artifacts).", "--out")
@click.option("--no-tune", is_flag=True, help="Deploy the ranks of the MACs rule, timing nothing.")
@click.option("--tune-cache", type=click.Path(dir_okay=False), default=None, help="Layer timing cache (default: ~/.cache/lrexport/tune_cache.json).")
@click.option("--tune-below/--no-tune-below", default=None,
              help="Let tuning go below a layer's energy rank where faster and validation accuracy confirms it "
                   "(default: the run's prune.tune_below).")
@click.option("--tune-images", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Validation images for that accuracy check.")
@click.option("--multiple-of", type=click.IntRange(min=1), default=8, show_default=True, help="The MACs rule aligns ranks upward to this multiple (1: exact).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--check-images", type=click.IntRange(min=1), default=64, show_default=True, help="Validation images to compare runtimes on.")
@aliases("parity_tolerance", "--tolerance", callback=lambda c, p, v: None if v is None else float(v))
@click.option("--parity-tolerance", type=float, default=None,
              help="Largest relative error of the logits against PyTorch, in fp32 (default 1e-4).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=1024, show_default=True, help="int8: images to calibrate on.")
@click.option("--calibration-split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="int8: calibrate on the run's training images (validation transform) or validation images.")
@click.option("--max-layer-error", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="int8: a conv whose own relative output error in int8 exceeds this stays in float.")
@reports_errors
def export(run, runtime, device, precision, threads, channels_last, batch, batches, output, no_tune, tune_cache, tune_below,
           tune_images, multiple_of, opset, check_images, parity_tolerance, calibration_images, calibration_split, max_layer_error):
    """Export RUN (default: newest under ./runs) for a runtime: model.onnx, dense.onnx, plan.json, meta.json.

    Each decomposed layer is timed on the runtime, dense and as thin pairs, and deployed as
    the fastest; the whole model is then timed against every layer dense, so the artifact
    is not slower than the dense model on that runtime at the batches tuned for.
    """
    from .deploy.backends import DEFAULT_RUNTIME, UnsupportedOptionError, entry
    from .deploy.backends.base import QuantConfig
    from .deploy.export import ExportConfig, export_run
    from .deploy.planning.plan import TuneConfig

    target = entry(runtime or DEFAULT_RUNTIME)
    options = target.resolve(_runtime_options(threads, device, precision, channels_last))
    if not target.tunable(options.device) and (given := _given(*TUNING)):
        raise UnsupportedOptionError(f"{given[0]} does not apply: {target.name} times no layer alone on {options.device} "
                          "(its plan is the MACs rule's)")
    if options.precision != "int8" and (given := _given(*INT8)):
        raise UnsupportedOptionError(f"{given[0]} applies to --precision int8 only")
    if not target.int8_fallback and (given := _given("max_layer_error")):
        raise UnsupportedOptionError(f"{given[0]} does not apply: {target.name} keeps no conv in float by its int8 error")
    config = ExportConfig(
        runtime=target.name, batch=batch, multiple_of=multiple_of, opset=opset, check_images=check_images,
        tolerance=ExportConfig.tolerance if parity_tolerance is None else parity_tolerance, options=options,
        tune=TuneConfig(enabled=not no_tune, batches=batches, cache=tune_cache and Path(tune_cache), below=tune_below,
                        below_images=tune_images),
        quant=QuantConfig(images=calibration_images, split=calibration_split, max_layer_error=max_layer_error),
    )

    result = export_run(run, output, config, progress=_export_progress)
    out.print(_export_table(result.meta))
    _print_plan(result.plan)
    for c in result.checks:
        out.print(f"  {c.what}: rel. error {c.rel_err:.1e}, max |diff| {c.max_abs:.1e}", highlight=False)
    engines = result.meta.get("engines")
    if engines:
        out.print(f"  {target.title} {engines['precision']} engines for batches {engines['batch_sizes']}: "
                  f"{engines['lowrank']}, {engines['dense']}", highlight=False)
    out.print(f"artifacts: {result.out_dir}", highlight=False, soft_wrap=True)


def _export_progress(event) -> None:
    """Export's printer: a line per tuned layer and per pass of the accuracy check below the energy rank."""
    match event:
        case LayerTuned():
            out.print(f"  tuned {event.layer}: {event.choice.reason}", highlight=False, soft_wrap=True)
        case Message():
            out.print(event.text, highlight=False, soft_wrap=True)


def _print_plan(plan) -> None:
    say = functools.partial(out.print, highlight=False, soft_wrap=True)
    tuned = plan.tune
    if tuned:
        t = tuned["target"]
        # the device names the CPU and its vector extensions: a plan is this machine's, not a phone's
        where = ", ".join([t["device"]] + ([f"{t['threads']} threads"] if t["threads"] else []) + [f"batches {t['batches']}"])
        say(f"  tuned on {t['runtime']} {t['version']} ({where}) "
            f"in {tuned['seconds']:.1f} s, {tuned['cache_hits']} cached / {tuned['cache_misses']} timed")
        b = tuned.get("below_check")
        if b:
            say(f"  below the energy rank: {len(b['kept'])} kept, {len(b['reverted'])} reverted; top-1 on {b['images']} validation "
                f"images {b['top1']:.2f}% vs {b['reference_top1']:.2f}% as trained (tolerance {b['tolerance']:g} points)")
    for row in plan.guard:
        times = ", ".join(f"{n} {row[n]['median_ms']:.3f} ms ({row[n]['speedup_over_dense']:.2f}x)"
                          for n in ("allocated", "tuned", "untuned", "dense", "original") if n in row)
        say(f"  whole model at batch {row['batch']} ({row['rounds']} rounds): {times}")
    say(f"  deployed: {plan.deployed} plan for {plan.runtime}" + (f" · {plan.note}" if plan.note else ""))
    q = plan.quantization
    if q:
        for m in ("lowrank", "dense"):
            errors = q[m]["layer_errors"].values()
            worst = f", worst layer error {max(errors):.3f}" if errors else ""
            say(f"  {m} int8 on {q['calibration']['images']} {q['calibration']['split']} images: {len(q[m]['float_layers'])} layers "
                f"left in float{worst}; top-1 agrees with PyTorch on {100 * q[m]['check']['top1_agree']:.1f}% of the check images")


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


@main.command(cls=GroupedCommand, groups={"Target": ("runtime", "device", "precision", "batches"),
                                          "Timing": ("warmup", "repeats"), "Checks": ("limit", "accuracy_tolerance"),
                                          "Runtime-specific": ("threads", "channels_last")})
@click.argument("artifacts", required=False, type=click.Path(file_okay=False, exists=True))
@runtime_options
@aliases("batches", "--batch-sizes", callback=_int_list)
@click.option("--batches", default=None, callback=_int_list, help="Batch sizes to time (dynamic-batch artifacts); default 1,8.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N validation images.")
@aliases("accuracy_tolerance", "--tolerance", callback=lambda c, p, v: None if v is None else float(v))
@click.option("--accuracy-tolerance", type=float, default=None,
              help="Accuracy points the runtime may differ from PyTorch (default 0.1; int8/fp16: 0.5).")
@reports_errors
def verify(artifacts, runtime, device, precision, threads, channels_last, batches, warmup, repeats, limit, accuracy_tolerance):
    """Accuracy and latency of ARTIFACTS (default: newest run's) through a runtime; writes verify.json."""
    from .deploy.verify import VerifyConfig, verify_artifacts

    result = verify_artifacts(
        artifacts, runtime, _runtime_options(threads, device, precision, channels_last),
        VerifyConfig(batch_sizes=batches or VerifyConfig.batch_sizes, warmup=warmup, repeats=repeats, limit=limit,
                     tolerance=accuracy_tolerance),
    )
    for table in _verify_tables(result.report):
        out.print(table)
    for note in result.report["notes"]:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)
    out.print(f"{result.artifacts_dir}/verify.json", highlight=False, soft_wrap=True)
    result.check()


def _verify_tables(r: dict):
    from rich.table import Table

    acc = r["accuracy"]
    k = acc["top5_k"]
    t1 = Table(title=f"accuracy through {r['runtime']} ({r.get('precision', 'fp32')}) beside PyTorch (fp32) · {acc['images']} validation images")
    for col in ("model", "top-1 %", f"top-{k} %", "PyTorch top-1 %", f"PyTorch top-{k} %", "top-1 disagree"):
        t1.add_column(col, justify="left" if col == "model" else "right")
    for m in ("lowrank", "dense"):
        a = acc[m]
        t1.add_row(m, f"{a['top1']:.2f}", f"{a['top5']:.2f}", f"{a['torch_top1']:.2f}", f"{a['torch_top5']:.2f}", str(a["top1_disagree"]))
    st = r["settings"]
    how = f"{st['threads']} threads" if st.get("threads") else st["device"]
    t2 = Table(title=f"latency on {r['runtime']} {st['version']} · {how} · {r.get('precision', st['precision'])} · median of {r['timing']['repeats']} "
                     "interleaved rounds, ms (p10–p90)")
    fp32 = any("dense_fp32" in row for row in r["latency"])
    cols = ["batch", *(["dense fp32"] if fp32 else []), "dense", "low-rank", "wall x", "MACs x", "deployed", "ratio",
            *(["vs fp32"] if fp32 else [])]
    for col in cols:
        t2.add_column(col, justify="right")

    def ms(s: dict) -> str:
        return f"{s['median_ms']:.3f} ({s['p10_ms']:.3f}–{s['p90_ms']:.3f})"

    for row in r["latency"]:
        t2.add_row(
            str(row["batch"]), *([ms(row["dense_fp32"])] if fp32 else []), ms(row["dense"]), ms(row["lowrank"]),
            f"{row['wall_speedup']:.2f}x", f"{r['macs']['speedup']:.2f}x", f"{r['macs']['deployed_speedup']:.2f}x", f"{row['ratio']:.2f}",
            *([f"{row['speedup_over_fp32']:.2f}x"] if fp32 else []),
        )
    t2.caption = (f"wall x: median of per-round dense/low-rank ratios{'; vs fp32: of dense fp32/low-rank' if fp32 else ''}; "
                  "MACs x: at the trained ranks; deployed: of the graph that runs (padded ranks, layers deployed dense); "
                  "ratio: wall x / MACs x · "
                  f"plan: {r['plan']['deployed']} for {r['plan']['runtime']}")
    if not r.get("predicted"):
        return t1, t2
    t3 = Table(title="predicted (sums of tuned one-layer times, decomposed convs only) vs measured")
    for col in ("batch", "low-rank predicted ms", "measured ms", "dense predicted ms", "measured ms"):
        t3.add_column(col, justify="right")
    for p in r["predicted"]:
        t3.add_row(str(p["batch"]), f"{p['lowrank_ms']:.3f}", f"{p.get('measured_lowrank_ms', float('nan')):.3f}",
                   f"{p['dense_ms']:.3f}", f"{p.get('measured_dense_ms', float('nan')):.3f}")
    return t1, t2, t3


@main.command()
@click.argument("artifacts", type=click.Path(file_okay=False, exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@reports_errors
def infer(artifacts, images, top_k, threads):
    """Classify IMAGES with the exported low-rank model (its .tflite for a LiteRT export, else its ONNX graph; no torch needed)."""
    from .deploy.runtime import infer as run_infer

    for pred in run_infer(artifacts, list(images), top_k, threads):
        out.print(pred.image, style="bold", highlight=False, soft_wrap=True)
        for name, prob in pred.top:
            out.print(f"  {100 * prob:6.2f}%  {name}", highlight=False)


# -- exploring the trade-off: sweep, report ----------------------------------------------------
class SweepProgress(_LiveBar):
    """Draws a sweep: an overall bar of runs, and a bar for the phase being trained."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=out)
        self.overall = self.phase = None

    def __call__(self, event) -> None:
        say = functools.partial(self.bar.console.print, highlight=False, soft_wrap=True)
        match event:
            case SweepStart():
                counts = ", ".join(f"{p} {n}" for p, n in event.phase_runs.items() if n)
                say(f"sweep into {event.output}: {event.runs} runs, {event.leaves} results; phase runs: {counts}")
                self.overall = self.bar.add_task("runs", total=event.runs, info="")
            case RunStart():
                self.bar.update(self.overall, info=event.name)
                what = "finished, skipped" if event.skipped else " → ".join(event.phases)
                say(f"[{event.index}/{event.runs}] {event.name}: {what}")
            case RunEnd():
                self.bar.advance(self.overall)
            case PhaseStart(epochs=epochs) if epochs:
                self.phase = self.bar.add_task(event.phase, total=epochs * event.steps, info="")
            case Step() if self.phase is not None:
                self.bar.update(self.phase, advance=event.advance, info=f"epoch {event.epoch} loss {event.loss:.3f}")
            case Message():
                say(event.text)
            case EnergyStep():
                mark = "" if event.within else " (beyond tolerance)"
                say(f"    e = {event.energy:g}: top-1 {event.top1:.2f}%, MACs speedup {event.speedup:.2f}x{mark}")
            case PhaseEnd() if self.phase is not None:
                acc = f" · val top-1 {event.result['top1']:.2f}%" if "top1" in event.result else ""
                say(f"    {event.phase} done{acc}")
                self.bar.remove_task(self.phase)
                self.phase = None


@main.command()
@click.argument("recipe", type=click.Path(path_type=str))  # load_recipe judges it: one line, exit 2
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...", help="Values to sweep, e.g. --grid reg.decay=0.001,0.01 (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value in every run (repeatable).")
@output_option("Sweep directory (default: <output_dir>/<name>-sweep-<time>).")
@click.option("--runtime", default=None, metavar="RUNTIME",
              help="Export each result for this runtime and verify it there (accuracy and measured speedup in the report).")
@reports_errors
def sweep(recipe, grid, overrides, output, runtime):
    """Run RECIPE over a grid of values, training each shared phase once.

    A grid may span methods (--grid method=lowrank,channels,channels+lowrank): a key of a phase a
    method skips does not multiply that method's runs."""
    from .sweep import run_sweep

    with SweepProgress() as progress:
        result = run_sweep(recipe, grid, overrides, output, progress, runtime)
    out.print(_sweep_table(result))
    skipped = len(result.plan.runs) - len(result.ran)
    out.print(f"ran {len(result.ran)} runs, skipped {skipped} finished runs · lrexport report {result.output}", highlight=False, soft_wrap=True)


def _sweep_table(result):
    from rich.table import Table

    table = Table(title=f"sweep · {result.output}")
    keys = list(result.plan.grid) or ["run"]  # the grid values name each run
    for key in keys:
        table.add_column(key, justify="right", min_width=len(key))
    from .rundir import wall_speedups

    walls = {leaf.name: wall_speedups(result.output / leaf.name) for leaf in result.plan.leaves}
    batches = sorted({b for w in walls.values() for b in w})
    for col in ("base top-1 %", "best top-1 %", "gain", "MACs speedup", *(f"wall b{b}" for b in batches)):
        table.add_column(col, justify="right")
    for leaf in result.plan.leaves:
        s, wall = result.summaries[leaf.name], walls[leaf.name]
        table.add_row(*(str(leaf.values.get(k, "-")) for k in keys), f"{s['base_top1']:.2f}", f"{s['best_finetune_top1']:.2f}",
                      f"{s['accuracy_gain']:+.2f}", f"{s['macs_speedup']:.2f}x", *(f"{wall[b]:.2f}x" if b in wall else "-" for b in batches))
    return table



@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@output_option("Report directory (default: RUN/report for one run or sweep, ./report for several).")
@reports_errors
def report(runs, output):
    """Tables (Markdown, CSV) and plots of finished RUNS (run or sweep directories): accuracy gain vs speedup."""
    from .report import build_report, dense_layers_line

    result = build_report(runs, output)
    out.print(_report_table(result.rows))
    for line in filter(None, map(dense_layers_line, result.rows)):
        out.print(line, highlight=False, soft_wrap=True)
    for path in result.unfinished:
        out.print(f"not finished, left out: {path}", highlight=False, soft_wrap=True)
    out.print(f"{len(result.files)} files in {result.output}: report.md, report.csv, plots", highlight=False, soft_wrap=True)


def _report_table(rows):
    from rich.table import Table

    from .report import macs_cell

    cells = {
        "run": lambda r: r.run, "model": lambda r: r.model, "data": lambda r: r.dataset, "dec.": lambda r: r.decomposition,
        "reg.": lambda r: r.regularizer, "λ_s": lambda r: f"{r.decay:g}", "e": lambda r: f"{r.energy:.1e}",
        "base top-1 %": lambda r: f"{r.base_top1:.2f}", "gain": lambda r: f"{r.gain_top1:+.2f}",
        "MACs speedup": lambda r: macs_cell(r, "x"),
        "wall speedup": lambda r: ", ".join(f"{s:.2f}x (b{b})" for b, s in sorted(r.wall.items())) or "-",
    }
    # settings shared by every row go to the title, so the table fits a terminal
    shared = [c for c in ("model", "data", "dec.", "reg.", "λ_s", "e") if len(rows) > 1 and len({cells[c](r) for r in rows}) == 1]
    table = Table(title="accuracy gain vs speedup" + "".join(f" · {c} {cells[c](rows[0])}" for c in shared))
    columns = [c for c in cells if c not in shared]
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "model", "data", "dec.", "reg.") else "right")
    for r in rows:
        table.add_row(*(cells[c](r) for c in columns))
    return table

if __name__ == "__main__":
    main()
