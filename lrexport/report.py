"""Tables and figures of finished runs: the seed's Table 3 columns, plus wall-clock speedup.

Reads only what runs wrote, through ``lrexport.rundir``: the summary (measurements), the
typed recipe (method, model, data, decomposition, regularizer), the spectra, and the verify
report where ``lrexport verify`` has run. Writes report.md, report.csv, one trade-off plot per
model and data set (with the paper's own points and its baselines), one Pareto plot per model
and data set (top-1 against MACs and against measured wall-clock speedup per batch, each
method in its colour, the front marked), and per run its spectra, ranks and MACs (and the
energy ladder, if the energy was searched: summary "energy_search").
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir, seed_results
from .errors import LrexportError
from .sweep import SWEEP_FILE, sweep_leaves
from .io import atomic_write_bytes, atomic_write_text


@dataclass
class RunRow:
    """One finished run, as a row of the report."""

    run: str  # unique display name
    path: Path
    method: str  # "lowrank", "channels" or "channels+lowrank"
    model: str
    dataset: str
    decomposition: str
    regularizer: str
    decay: float
    energy: float
    base_top1: float
    best_top1: float
    gain_top1: float
    base_top5: float
    best_top5: float
    gain_top5: float
    dense_macs: int
    macs: int
    macs_speedup: float  # dense MACs over MACs as deployed (lrexport.lowrank.macs)
    paper_macs_speedup: float | None = None  # as the paper's code costs it (every factored pair at any rank); None in older summaries
    wall: dict[int, float] = field(default_factory=dict)  # batch size -> wall-clock speedup
    wall_runtime: str = ""
    deployed_macs_speedup: float | None = None  # with the ranks aligned at export
    dense_top1: float | None = None  # the dense model's (the dense phase's), where it was measured
    summary: dict = field(default_factory=dict, repr=False)

    @property
    def seed(self) -> tuple[str, str] | None:
        return seed_results.seed_model(self.model)

    @property
    def costings_differ(self) -> bool:
        """Whether the paper's costing gives a MACs speedup more than 0.5 % away from ours."""
        return self.paper_macs_speedup is not None and abs(self.paper_macs_speedup / self.macs_speedup - 1) > 0.005

    @property
    def metric(self) -> str:
        """The accuracy the paper's gains for this model measure (top-5 on ImageNet)."""
        return seed_results.METRIC[self.seed[1]] if self.seed else "top1"

    @property
    def gain(self) -> float:
        return self.gain_top5 if self.metric == "top5" else self.gain_top1


def read_run(path: str | Path) -> RunRow:
    """The report row of the finished run in ``path``."""
    path = Path(path)
    s = rundir.read_summary(path)
    if not rundir.finished(s):
        raise LrexportError(f"run {path} has not finished (its summary has no finetuning result)")
    recipe = rundir.read_recipe(path)
    # the energy the prune step used: the searched one where prune.energy = "auto"
    energy = s["phases"].get("prune", {}).get("energy", recipe.prune.energy)
    decay = float(recipe.reg.decay)
    lowrank = "lowrank" in recipe.method
    row = RunRow(
        run=path.name, path=path, method=recipe.method, model=s.get("model", {}).get("name", recipe.model.name),
        dataset=recipe.data.dataset, decomposition=recipe.decompose.mode if lowrank else "filters",
        # the paper's "None" rows are λ_s = 0; a Hoyer recipe with decay 0 is one of them
        regularizer=(recipe.reg.type if decay > 0 else "none") if lowrank else "filters", decay=decay if lowrank else float("nan"),
        energy=float(energy) if lowrank and isinstance(energy, (int, float)) else float("nan"),
        dense_top1=s["phases"].get("dense", {}).get("top1"),
        base_top1=s["base_top1"], best_top1=s["best_finetune_top1"], gain_top1=s["accuracy_gain"],
        base_top5=s["base_top5"], best_top5=s["best_finetune_top5"], gain_top5=s["best_finetune_top5"] - s["base_top5"],
        dense_macs=s["macs"]["dense_macs"], macs=s["macs"]["macs"], macs_speedup=s["macs_speedup"],
        paper_macs_speedup=s["macs"].get("paper_speedup"), summary=s,
    )
    verify = rundir.verify_path(path)
    if verify.is_file():
        v = rundir.read_json(verify, "verify report")
        row.wall = rundir.wall_speedups(path)
        row.wall_runtime = f"{v.get('runtime', '?')}, {v.get('threads', '?')} threads"
        row.deployed_macs_speedup = v.get("macs", {}).get("deployed_speedup")
    return row


def expand_runs(paths) -> tuple[list[Path], list[Path]]:
    """Run directories from ``paths`` (a sweep directory stands for its leaves); (runs, unfinished sweep leaves)."""
    runs, unfinished = [], []
    for p in map(Path, paths):
        if (p / SWEEP_FILE).is_file():
            for leaf in sweep_leaves(p):
                done = rundir.has_summary(leaf) and rundir.finished(rundir.read_summary(leaf))
                (runs if done else unfinished).append(leaf)
        else:
            runs.append(p)
    return runs, unfinished


def _unique_names(rows: list[RunRow]) -> None:
    seen: dict[str, int] = defaultdict(int)
    for row in rows:
        seen[row.run] += 1
        if seen[row.run] > 1:
            row.run = f"{row.run}-{seen[row.run]}"


# -- tables ------------------------------------------------------------------------------------
def _batches(rows: list[RunRow]) -> list[int]:
    return sorted({b for r in rows for b in r.wall})


def csv_text(rows: list[RunRow]) -> str:
    batches = _batches(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "path", "method", "model", "dataset", "decomposition", "regularizer", "decay", "energy", "base_top1", "best_top1",
                "accuracy_gain", "base_top5", "best_top5", "top5_gain", "dense_macs", "macs", "macs_speedup",
                "paper_macs_speedup", "deployed_macs_speedup", "wall_runtime", *(f"wall_speedup_b{b}" for b in batches)])
    for r in rows:
        w.writerow([r.run, str(r.path), r.method, r.model, r.dataset, r.decomposition, r.regularizer, repr(r.decay), repr(r.energy),
                    repr(r.base_top1), repr(r.best_top1), repr(r.gain_top1), repr(r.base_top5), repr(r.best_top5), repr(r.gain_top5),
                    r.dense_macs, r.macs, repr(r.macs_speedup),
                    *("" if v is None else repr(v) for v in (r.paper_macs_speedup, r.deployed_macs_speedup)),
                    r.wall_runtime, *("" if b not in r.wall else repr(r.wall[b]) for b in batches)])
    return buf.getvalue()


def macs_cell(r: RunRow, times: str = "×") -> str:
    """The MACs speedup, with the paper's costing beside it where the two differ."""
    cell = f"{r.macs_speedup:.2f}{times}"
    return cell + f" (paper's costing {r.paper_macs_speedup:.2f}{times})" if r.costings_differ else cell


def _wall_cell(r: RunRow) -> str:
    if not r.wall:
        return "–"
    return ", ".join(f"{s:.2f}× (b{b})" for b, s in sorted(r.wall.items())) + f" · {r.wall_runtime}"


def _model_label(model: str) -> str:
    seed = seed_results.seed_model(model)
    return seed[0] if seed else model


def markdown_text(rows: list[RunRow], figures: dict[str, list[str]], unfinished: list[Path]) -> str:
    methods = any(r.method != "lowrank" for r in rows)  # the paper's own runs keep its Table 3 columns
    lines = ["# lrexport report", "",
             "Accuracy gain is best finetuned accuracy minus the full-rank decomposed model's (the paper's *base*; the dense "
             "model's where channels were pruned), in points. "
             "MACs speedup is dense MACs over low-rank MACs as deployed, a layer at or above its break-even rank counted as one "
             "dense conv, whereas the paper's code counts every decomposed layer as its factored pair at any rank (in brackets "
             "where the two differ by more than 0.5 %). Wall-clock speedup is measured by `lrexport verify` through the runtime, "
             "per batch size.", "",
             f"| run |{' method |' * methods} model | data | decomposition | regularizer | λ_s | e | base top-1 % | best top-1 % | gain | "
             "top-5 gain | MACs speedup | wall-clock speedup |",
             "|---|" + "---|" * (12 + methods)]
    for r in rows:
        lines.append(f"| {r.run} |{f' {r.method} |' * methods} {_model_label(r.model)} | {r.dataset} | {r.decomposition} | {r.regularizer} | {_num(r.decay, 'g')} | "
                     f"{_num(r.energy, '.1e')} | "
                     f"{r.base_top1:.2f} | {r.best_top1:.2f} | {r.gain_top1:+.2f} | {r.gain_top5:+.2f} | {macs_cell(r)} | {_wall_cell(r)} |")
    if unfinished:
        lines += ["", "Not finished (left out): " + ", ".join(f"`{p}`" for p in unfinished)]
    lines += pareto_lines(rows)
    dense = [line for line in map(dense_layers_line, rows) if line]
    if dense:
        lines += [""] + [f"- {line}" for line in dense]
    for title, files in figures.items():
        lines += ["", f"## {title}", ""] + [f"![{Path(f).stem}]({f})" for f in files]
    for r in rows:
        lines += latency_lines(r)
    return "\n".join(lines) + "\n"


def _num(value: float, fmt: str) -> str:
    """A number as ``fmt``; a setting the run's method has no use for (NaN) as a dash."""
    return "–" if value != value else format(value, fmt)


def pareto_front(values: list[tuple[float | None, float]]) -> list[int]:
    """Indices of the (speedup, accuracy) points no other point beats in both, fastest first (None: not measured)."""
    order = sorted((i for i, (x, _) in enumerate(values) if x is not None), key=lambda i: (-values[i][0], -values[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if values[i][1] > best:
            front.append(i)
            best = values[i][1]
    return front


def speedup_panels(rows: list[RunRow]) -> list[tuple[str, str]]:
    """The speedup measures of a Pareto plot or table: MACs, then wall-clock at each verified batch."""
    return [("macs", "MACs speedup (×)")] + [(f"b{b}", f"wall-clock speedup, batch {b} (×)") for b in _batches(rows)]


def _speedup(r: RunRow, key: str) -> float | None:
    return r.macs_speedup if key == "macs" else r.wall.get(int(key[1:]))


def has_front(group: list[RunRow]) -> bool:
    """Whether runs of one model and data set have a Pareto front to show beyond the trade-off plot:
    several runs, and more than one method among them or a wall-clock speedup measured."""
    return len(group) > 1 and (len({r.method for r in group}) > 1 or any(r.wall for r in group))


def pareto_lines(rows: list[RunRow]) -> list[str]:
    """Per model and data set worth a front (``has_front``): the Pareto front of each speedup measure."""
    lines = []
    for (model, dataset), group in _groups(rows).items():
        if not has_front(group):
            continue
        lines += ["", f"## Pareto front: {_model_label(model)} on {dataset}", "",
                  "Runs no other run beats in both top-1 and speedup, fastest first"
                  + (f" (dense top-1 {group[0].dense_top1:.2f} %)." if group[0].dense_top1 is not None else "."), "",
                  "| speedup measure | run | method | top-1 % | speedup |", "|---|---|---|---|---|"]
        for key, label in speedup_panels(group):
            for i in pareto_front([(_speedup(r, key), r.best_top1) for r in group]):
                r = group[i]
                lines.append(f"| {label.replace(' (×)', '')} | {r.run} | {r.method} | {r.best_top1:.2f} | {_speedup(r, key):.2f}× |")
    return lines


def dense_layers_line(row: RunRow) -> str | None:
    """The conv and linear layers a run left dense, each with why (summary "layers")."""
    dense = [f"{name} ({s['reason']})" for name, s in (row.summary.get("layers") or {}).items() if not s["decomposed"]]
    return f"{row.run}: left dense: " + ", ".join(dense) if dense else None


def latency_lines(row: RunRow) -> list[str]:
    """The ranks a run's prune step allocated by measured latency (summary "latency_ranks"), as a table."""
    rec = row.summary.get("latency_ranks")
    if not rec:
        return []
    t = rec["target"]
    lines = ["", f"## Latency-allocated ranks: {row.run}", "",
             f"Measured on {rec['runtime']} {t.get('version', '')} ({t.get('threads')} threads, {t.get('precision')}, batches "
             f"{', '.join(map(str, t.get('batches', [])))}); mean discarded energy {rec['mean_discarded']:.3g} "
             f"(budget {rec['budget']:.3g}, per-layer cap {rec['cap']:.3g}); predicted {rec['predicted_ms']:.3f} ms "
             f"against {rec['energy_rule_ms']:.3f} ms for the energy rule's ranks"
             + (f" and {rec['dense_ms']:.3f} ms all dense ({rec['dense_ms'] / rec['predicted_ms']:.2f}× predicted)" if rec.get("dense_ms") else "")
             + f" ({rec['method']}; {rec['note']}).", "",
             "| layer | energy rank | allocated | discarded energy | energy rule discards | predicted ms |",
             "|---|---|---|---|---|---|"]
    for name, layer in rec["layers"].items():
        lines.append(f"| {name} | {layer['energy_rank']} | {layer['allocated']} | {layer['discarded']:.3g} | "
                     f"{layer['energy_discarded']:.3g} | {layer['predicted_ms']:.4f} |")
    return lines


# -- figures -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def tradeoff_figure(rows: list[RunRow]) -> bytes:
    """One model on one data set: its runs, with the paper's points and baselines for that model."""
    from .plots import tradeoff_png

    first = rows[0]
    seed = first.seed
    paper = [vars(p) for p in seed_results.paper_points(seed[0])] if seed else []
    base = [vars(b) for b in seed_results.baselines(seed[0])] if seed else []
    runs = []
    for r in rows:
        batch = min(r.wall) if r.wall else None
        label = f"λ {r.decay:g}, e {r.energy:.0e}" if "lowrank" in r.method else ""
        if "channels" in r.method:
            label = f"channels {r.summary.get('channels', {}).get('speedup', float('nan')):.1f}×" + (f", {label}" if label else "")
        runs.append({"label": label, "decomposition": r.decomposition, "regularizer": r.regularizer,
                     "gain": r.gain, "macs_speedup": r.macs_speedup, "wall_speedup": r.wall.get(batch) if batch else None})
    metric = "top-5" if first.metric == "top5" else "top-1"
    note = ""
    if seed:
        note = f"faint: the paper's {seed[0]} on {seed[1]} (seed Tables 3–5); grey: baselines (Tables 6–8)."
        if first.dataset.lower().replace("-", "") not in seed[1].lower().replace("-", ""):
            note += f" These runs are on {first.dataset} data: compare the shape, not the values."
        if any(r.costings_differ for r in rows):
            note += " Ours are MACs as deployed; the paper's code costs factored pairs even above break-even."
    if any(r["wall_speedup"] for r in runs):
        note += " Hollow: wall-clock speedup at the smallest batch verified."
    return tradeoff_png(f"{_model_label(first.model)} on {first.dataset}: {metric} gain vs speedup", runs, paper, base,
                        f"{metric} accuracy gain (points)", note.strip())


def pareto_figure(rows: list[RunRow]) -> bytes:
    """One model on one data set: top-1 against MACs and against each verified batch's wall-clock speedup."""
    from .plots import pareto_png

    panels = speedup_panels(rows)
    points = [{"method": r.method, "top1": r.best_top1, **{key: _speedup(r, key) for key, _ in panels}} for r in rows]
    fronts = {key: pareto_front([(p[key], p["top1"]) for p in points]) for key, _ in panels}
    walls = {r.wall_runtime for r in rows if r.wall}
    measured = f"; wall-clock on {', '.join(sorted(walls))}" if walls else "; no run verified: MACs only"
    return pareto_png(f"{_model_label(rows[0].model)} on {rows[0].dataset}: top-1 against speedup{measured}", points, panels, fronts,
                      rows[0].dense_top1)


def _groups(rows: list[RunRow]) -> dict[tuple[str, str], list[RunRow]]:
    groups: dict[tuple[str, str], list[RunRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.dataset)].append(r)
    return groups


def run_figures(row: RunRow) -> dict[str, bytes]:
    """The pictures of one run: spectra, ranks, MACs, and the energy ladder if it was searched."""
    from . import plots

    s, figs = row.summary, {}
    spectra = rundir.read_spectra(row.path)
    if spectra:
        figs["spectra.png"] = plots.spectra_png(spectra.get("before", {}), spectra.get("after", {}), s.get("ranks"))
    if s.get("ranks"):
        figs["ranks.png"] = plots.ranks_png(s["ranks"])
    if s.get("macs", {}).get("layers"):
        figs["macs.png"] = plots.macs_png(s["macs"]["layers"])
    search = s.get("energy_search")  # prune.energy = "auto": the line search's ladder
    if search:
        figs["energy.png"] = plots.ladder_png(search)
    return figs


# -- the whole report --------------------------------------------------------------------------
@dataclass
class Report:
    output: Path
    rows: list[RunRow]
    files: list[Path]  # everything written
    unfinished: list[Path] = field(default_factory=list)


def default_output(paths) -> Path:
    """One run or sweep: ``<it>/report``; several: ``./report``."""
    paths = [Path(p) for p in paths]
    return paths[0] / "report" if len(paths) == 1 else Path("report")


def build_report(paths, output: str | Path | None = None) -> Report:
    """Read the runs (or sweeps) in ``paths`` and write report.md, report.csv and the PNGs into ``output``."""
    paths = list(paths)
    if not paths:
        raise LrexportError("name at least one run or sweep directory")
    run_dirs, unfinished = expand_runs(paths)
    if not run_dirs:
        raise LrexportError(f"no finished run in {', '.join(map(str, paths))}")
    rows = sorted((read_run(p) for p in run_dirs), key=lambda r: (r.model, r.dataset, r.method, r.decomposition, r.regularizer,
                                                                    r.macs_speedup))
    _unique_names(rows)
    output = Path(output) if output is not None else default_output(paths)
    files: list[Path] = []

    def write(rel: str, data: bytes) -> str:
        atomic_write_bytes(output / rel, data)
        files.append(output / rel)
        return rel

    figures: dict[str, list[str]] = {"Accuracy gain against speedup": []}
    for (model, dataset), group in _groups(rows).items():
        figures["Accuracy gain against speedup"].append(write(f"tradeoff-{_slug(model)}-{_slug(dataset)}.png", tradeoff_figure(group)))
        if has_front(group):
            figures.setdefault("Top-1 against MACs and wall-clock speedup", []).append(
                write(f"pareto-{_slug(model)}-{_slug(dataset)}.png", pareto_figure(group)))
    for r in rows:
        figures[f"Run {r.run}"] = [write(f"runs/{_slug(r.run)}/{name}", png) for name, png in run_figures(r).items()]
    atomic_write_text(output / "report.csv", csv_text(rows))
    atomic_write_text(output / "report.md", markdown_text(rows, figures, unfinished))
    files = [output / "report.md", output / "report.csv", *files]
    return Report(output, rows, files, unfinished)
