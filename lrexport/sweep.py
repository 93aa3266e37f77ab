"""Sweep a recipe over a grid of values, running each shared phase once.

The phases run in a fixed order (dense, decompose, fullrank, svd, prune, finetune) and each
recipe key affects a known first phase (both from the registry in ``lrexport.train.phases``). So the combinations of a grid form a
tree: one run does the phases no grid key touches and stops; one run per value of the keys of
the next affected phase branches from it (``run_recipe(start_from=..., stop_after=...)``); and
so on down to the leaves, one per combination, which finish the method. A 3 × 2 grid over
``reg.decay`` × ``prune.energy`` trains the dense and full-rank models once, SVD-trains three
times and prunes + finetunes six times.

A grid may span methods (``method=lowrank,channels,channels+lowrank``): a key of a phase that a
point's method skips (``prune.energy`` for "channels", ``channels.speedup`` for "lowrank") does
not multiply that method's points; they take its first value and leave it out of their names.
With ``runtime``, each leaf is exported for that runtime and verified on it as it finishes
(RUN/artifacts), so the report can put measured wall-clock speedups beside accuracy.

Layout of the output directory::

    sweep.json                      the plan: grid, runs, parents, which are leaves
    shared/stem/                    phases before the first one a grid key affects
    shared/reg.decay=0.01/          an inner node: branched, stopped at a phase boundary
    reg.decay=0.01,prune.energy=0.001/   a leaf: a complete run directory

Rerunning the same sweep into the same directory skips finished runs and resumes
interrupted ones. Progress goes to a callback (the CLI draws it): SweepStart, RunStart/RunEnd
around each run with the pipeline's own events in between (lrexport.progress); run_sweep returns the result.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomli_w

from . import rundir
from .errors import LrexportError, RecipeError
from .io import atomic_write_text
from .progress import Message, Progress, RunEnd, RunStart, SweepStart, quiet
from .recipe import Recipe, load_recipe, parse_override, read_recipe_dict, recipe_from_dict
# the phases' order and the recipe keys each is the first to depend on: one registry, the pipeline's
# (keys not listed there -- device, amp, eval.* ... -- are taken to affect everything: nothing is shared)
from .train.phases import PHASE_KEYS, PHASE_METHODS, PHASES

SWEEP_FILE = "sweep.json"

def first_phase(key: str) -> str:
    """The earliest phase that recipe key ``key`` (dotted) affects."""
    hits = [phase for phase, prefixes in PHASE_KEYS.items() for p in prefixes
            if key == p or key.startswith(p + ".") or p.startswith(key + ".")]
    return min(hits, key=PHASES.index) if hits else PHASES[0]


# -- the grid ------------------------------------------------------------------------------
def parse_grid(texts: Iterable[str]) -> dict[str, list]:
    """``key.path=v1,v2,...`` strings → {key: [values]}; values are TOML (bare words are strings)."""
    grid: dict[str, list] = {}
    for text in texts:
        key, sep, rest = text.partition("=")
        key = key.strip()
        if not sep or not key or not rest.strip():
            raise RecipeError(f"--grid {text!r}: expected key.path=value1,value2,...")
        try:  # TOML array syntax handles quoted strings and nested lists with commas
            values = tomllib.loads(f"v = [{rest}]")["v"]
        except tomllib.TOMLDecodeError:
            values = [parse_override(f"v={v}")[1] for v in rest.split(",")]
        if key in grid:
            raise RecipeError(f"--grid {key} is given twice; list all its values in one --grid")
        if len(set(map(repr, values))) != len(values):
            raise RecipeError(f"--grid {text!r}: a value is listed twice")
        grid[key] = values
    return grid


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _override(key: str, value: Any) -> str:
    return f"{key}={_toml_value(value)}"


def _label(values: Mapping[str, Any]) -> str:
    """A directory name for fixed grid values: ``reg.decay=0.01,prune.energy=0.001``, ``method=channels``."""
    text = ",".join(f"{k}={v if isinstance(v, str) and re.fullmatch(r'[A-Za-z0-9._+-]+', v) else _toml_value(v)}"
                    for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text) or "run"


# -- the plan ------------------------------------------------------------------------------
@dataclass
class SweepRun:
    """One run of the tree: the phases it executes, from its parent's boundary state."""

    name: str  # directory, relative to the sweep output
    values: dict[str, Any]  # the grid values fixed here (and in its ancestors)
    recipe: Recipe
    phases: tuple[str, ...]
    parent: int | None  # index into SweepPlan.runs; None: from scratch
    leaf: bool

    @property
    def ran_phases(self) -> tuple[str, ...]:
        """Its phases that its recipe's method runs (the others pass without a trace)."""
        return tuple(p for p in self.phases if self.recipe.method in PHASE_METHODS[p])

    @property
    def stop_after(self) -> str | None:
        return None if self.leaf else self.phases[-1]

    def to_dict(self) -> dict:
        return {"name": self.name, "values": self.values, "phases": list(self.phases), "parent": self.parent,
                "leaf": self.leaf, "recipe_hash": self.recipe.hash()}


@dataclass
class SweepPlan:
    grid: dict[str, list]
    runs: list[SweepRun]  # every parent before its children

    @property
    def leaves(self) -> list[SweepRun]:
        return [r for r in self.runs if r.leaf]

    def phase_runs(self) -> dict[str, int]:
        """How many times each phase runs in the whole sweep."""
        counts = {p: sum(p in r.ran_phases for r in self.runs) for p in PHASES}
        return {p: n for p, n in counts.items() if n}


def plan_sweep(raw: dict, grid: Mapping[str, list], overrides: Iterable[str] = (), where: str = "<recipe>") -> SweepPlan:
    """The tree of runs for ``grid`` over the recipe ``raw`` (+ ``overrides``); every recipe is validated."""
    overrides = list(overrides)
    fixed = {".".join(parse_override(o)[0]) for o in overrides}
    for key, values in grid.items():
        if not values:
            raise RecipeError(f"--grid {key}: no values")
        if key in fixed:
            raise RecipeError(f"{key} is given both with --set and with --grid")
    keys = sorted(grid, key=lambda k: PHASES.index(first_phase(k)))  # stable: the user's order within a phase
    levels = sorted({first_phase(k) for k in keys}, key=PHASES.index)

    def recipe(values: dict) -> Recipe:
        return recipe_from_dict(raw, where, [*overrides, *(_override(k, v) for k, v in values.items())])

    runs: list[SweepRun] = []
    stem_end = PHASES.index(levels[0]) if levels else len(PHASES)
    parent = None
    if stem_end > 0:
        runs.append(SweepRun("shared/stem" if levels else "run", {}, recipe({}), PHASES[:stem_end], None, not levels))
        parent = 0

    def expand(level: int, fixed_values: dict, parent: int | None) -> None:
        start = PHASES.index(levels[level])
        last = level + 1 == len(levels)
        end = len(PHASES) if last else PHASES.index(levels[level + 1])
        level_keys = [k for k in keys if first_phase(k) == levels[level]]
        for combo in itertools.product(*(grid[k] for k in level_keys)):
            values = fixed_values | dict(zip(level_keys, combo))
            method = recipe(values).method
            inert = [k for k in level_keys if k != "method" and method not in PHASE_METHODS[first_phase(k)]]
            if any(values[k] != grid[k][0] for k in inert):  # the same run as the one with the first value
                continue
            values = {k: v for k, v in values.items() if k not in inert}
            name = _label(values) if last else f"shared/{_label(values)}"
            runs.append(SweepRun(name, values, recipe(values), PHASES[start:end], parent, last))
            if not last:
                expand(level + 1, values, len(runs) - 1)

    if levels:
        expand(0, {}, parent)
    return SweepPlan({k: list(grid[k]) for k in keys}, runs)


# -- running -------------------------------------------------------------------------------
@dataclass
class SweepResult:
    output: Path
    plan: SweepPlan
    summaries: dict[str, dict] = field(default_factory=dict)  # leaf name -> its summary
    ran: list[str] = field(default_factory=list)  # runs executed now (not skipped as finished)

    @property
    def leaf_dirs(self) -> list[Path]:
        return [self.output / r.name for r in self.plan.leaves]


def _same_recipe(run_dir: Path, recipe: Recipe) -> bool:
    """Whether a run's recipe.toml has ``recipe``'s settings.

    Re-validated with today's defaults, so keys added to the recipe schema since that run
    (with their defaults) do not make it a different recipe.
    """
    try:
        return rundir.read_recipe(run_dir).hash() == recipe.hash()
    except LrexportError:  # unreadable, or no longer a valid recipe
        return False


def _state(run_dir: Path, run: SweepRun) -> str:
    """"done", "partial" (resume it) or "new"; a run dir of another recipe is an error."""
    if (run_dir / rundir.RECIPE).is_file() and not _same_recipe(run_dir, run.recipe):
        raise LrexportError(f"{run_dir} holds a run of a different recipe; sweep into a new --output")
    if rundir.has_summary(run_dir):
        summary = rundir.read_summary(run_dir)
        done = rundir.finished(summary) if run.leaf else all(p in summary.get("phases", {}) for p in run.ran_phases)
        if done:
            return "done"
    return "partial" if rundir.checkpoint_path(run_dir, rundir.LAST).is_file() else "new"


def default_output(recipe: Recipe) -> Path:
    return rundir.new_run_dir(recipe.output_dir, f"{recipe.name}-sweep")


def _verified_on(run_dir: Path, runtime: str) -> bool:
    """Whether the run's artifacts were verified on ``runtime`` after its training finished."""
    report = rundir.verify_path(run_dir)
    if not report.is_file():
        return False
    try:
        verified = json.loads(report.read_text()).get("runtime") == runtime
    except (OSError, json.JSONDecodeError):
        return False
    return verified and report.stat().st_mtime >= (run_dir / rundir.SUMMARY).stat().st_mtime


def deploy_leaf(run_dir: Path, runtime: str, progress: Progress = quiet) -> dict:
    """Export a finished run for ``runtime`` and verify it there; returns verify.json's content."""
    from .deploy import ExportConfig, export_run, verify_artifacts

    progress(Message(f"    exporting for {runtime} and verifying: {run_dir / rundir.ARTIFACTS}"))
    exported = export_run(run_dir, config=ExportConfig(runtime=runtime), progress=progress)
    return verify_artifacts(exported.out_dir, runtime).report


def run_sweep(
    recipe_path: str | Path,
    grid: Iterable[str] | Mapping[str, list],
    overrides: Iterable[str] = (),
    output: str | Path | None = None,
    progress: Progress = quiet,
    runtime: str | None = None,
) -> SweepResult:
    """Run every combination of ``grid`` (``key=v1,v2`` strings or a dict) over the recipe file.

    ``overrides`` are ``--set`` strings applied to every run. ``output`` defaults to
    ``<output_dir>/<name>-sweep-<time>``. ``runtime``: export each leaf for it and verify it
    there (a leaf already verified on it since it last trained is left as it is). Returns the
    leaves' summaries.
    """
    from .train import run_recipe

    if runtime is not None:
        from .deploy.backends import get_runtime

        get_runtime(runtime)  # unknown or not installed: one line before any training

    base = load_recipe(recipe_path, overrides)  # a bad file or --set fails before anything runs
    raw = read_recipe_dict(recipe_path)  # its base chain merged, as load_recipe reads it
    grid = parse_grid(grid) if not isinstance(grid, Mapping) else dict(grid)
    plan = plan_sweep(raw, grid, overrides, str(recipe_path))
    output = Path(output) if output is not None else default_output(base)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / SWEEP_FILE, json.dumps({
        "recipe": str(recipe_path), "overrides": list(overrides), "grid": plan.grid,
        "phase_runs": plan.phase_runs(), "runs": [r.to_dict() for r in plan.runs],
    }, indent=2))

    result = SweepResult(output, plan)
    progress(SweepStart(str(output), len(plan.runs), len(plan.leaves), plan.phase_runs()))
    for i, run in enumerate(plan.runs):
        run_dir = output / run.name
        state = _state(run_dir, run)
        progress(RunStart(i + 1, len(plan.runs), run.name, str(run_dir), run.ran_phases, run.values, state == "done"))
        if state == "partial":
            run_recipe(run.recipe, run_dir, progress, resume=run_dir, stop_after=run.stop_after)
        elif state == "new":
            parent = None if run.parent is None else output / plan.runs[run.parent].name
            run_recipe(run.recipe, run_dir, progress, start_from=parent, stop_after=run.stop_after)
        if state != "done":
            result.ran.append(run.name)
        if run.leaf and runtime is not None and not _verified_on(run_dir, runtime):
            deploy_leaf(run_dir, runtime, progress)
        if run.leaf:
            result.summaries[run.name] = rundir.read_summary(run_dir)
        progress(RunEnd(i + 1, len(plan.runs), run.name))
    return result


def sweep_leaves(path: str | Path) -> list[Path]:
    """The leaf run directories of the sweep in ``path`` (which holds sweep.json)."""
    path = Path(path)
    try:
        plan = json.loads((path / SWEEP_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LrexportError(f"{path / SWEEP_FILE} cannot be read: {e}") from None
    return [path / r["name"] for r in plan["runs"] if r["leaf"]]
