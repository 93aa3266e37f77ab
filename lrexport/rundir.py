"""The run directory: every name in it, and reading and writing it, without torch.

``lrexport train`` (rank 0) writes it; export, verify, sweep and report read it through
here, so the layout is spelled out once::

    summary.json     the measurements so far; "finished" once finetuning is done
    metrics.jsonl    one record per trained epoch
    recipe.toml      the effective recipe (after --set)
    spectra.json     each SVD layer's singular values before and after SVD training
    checkpoints/     <phase>.pt; dense.pt (export's baseline), finetune_best.pt (the result),
                     last.pt (the resume point), last.prev.pt, last.next.pt
    artifacts/       `lrexport export`'s output; artifacts/verify.json from `lrexport verify`

Model and data loading (``Run.load_models`` and the data sets) import torch on first use.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import CheckpointError, LrexportError
from .io import atomic_write_text
from .recipe import Recipe, recipe_from_dict

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
RECIPE = "recipe.toml"
SPECTRA = "spectra.json"
CHECKPOINTS = "checkpoints"
ARTIFACTS = "artifacts"
VERIFY = "verify.json"  # inside artifacts/
# checkpoint names (checkpoints/<name>.pt)
DENSE, LOWRANK = "dense", "finetune_best"  # LOWRANK: the finetune phase's best epoch, which the pipeline saves as <phase>_best
LAST, LAST_PREV, LAST_NEXT = "last", "last.prev", "last.next"


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{name}.pt"


def artifacts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ARTIFACTS


def verify_path(run_dir: str | Path) -> Path:
    return artifacts_dir(run_dir) / VERIFY


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/<name>-<timestamp>``, never one that exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


# -- finding runs -----------------------------------------------------------------------------
def _newest(root: Path, pattern: str, marker: str) -> Path | None:
    found = sorted(root.glob(f"{pattern}/{marker}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1].parents[len(Path(marker).parts) - 1] if found else None  # the run holding the marker


def newest_run(root: str | Path = "runs") -> Path:
    """The run under ``root`` whose summary.json was written last (export's, verify's default)."""
    run = _newest(Path(root), "*", SUMMARY)
    if run is None:
        raise LrexportError(f"no run directory (with a {SUMMARY}) under {root}/; name one explicitly")
    return run


def resumable_run(root: str | Path, name: str) -> Path:
    """The run of recipe ``name`` under ``root`` whose resume point was written last (``--resume``)."""
    marker = f"{CHECKPOINTS}/{LAST}.pt"
    run = _newest(Path(root), f"{name}-*", marker)
    if run is None:
        raise CheckpointError(f"nothing to resume: no {root}/{name}-*/{marker}")
    return run


# -- files ------------------------------------------------------------------------------------
def wall_speedups(run_dir: str | Path) -> dict[int, float]:
    """batch → wall-clock speedup over dense that ``lrexport verify`` measured (empty where it has not run)."""
    path = verify_path(run_dir)
    if not path.is_file():
        return {}
    return {int(r["batch"]): float(r["wall_speedup"]) for r in read_json(path, "verify report").get("latency", [])}


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LrexportError(f"{path} ({what}) is not valid JSON: {e}") from None
    except OSError as e:
        raise LrexportError(f"{path} ({what}) cannot be read: {e.strerror or e}") from None


def has_summary(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SUMMARY).is_file()


def read_summary(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not has_summary(run_dir):
        raise LrexportError(f"{run_dir} is not a run directory (no {SUMMARY})")
    return read_json(run_dir / SUMMARY, "run summary")


def write_summary(run_dir: str | Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2))


def finished(summary: dict) -> bool:
    """Whether the run's finetuning is done (``Pipeline._finish`` wrote the final numbers)."""
    return "finished" in summary


def append_metrics(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_recipe(run_dir: str | Path, recipe: Recipe) -> None:
    atomic_write_text(Path(run_dir) / RECIPE, recipe.to_toml())


def read_recipe(run_dir: str | Path) -> Recipe:
    """The run's recipe, validated with today's defaults (keys added since the run take them)."""
    path = Path(run_dir) / RECIPE
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LrexportError(f"{path} cannot be read: {e}") from None
    return recipe_from_dict(raw, str(path))


def read_spectra(run_dir: str | Path) -> dict:
    """{"before": {layer: singular values}, "after": ...}; empty before SVD training."""
    path = Path(run_dir) / SPECTRA
    return read_json(path, "spectra") if path.is_file() else {}


def write_spectra(run_dir: str | Path, spectra: dict) -> None:
    atomic_write_text(Path(run_dir) / SPECTRA, json.dumps(spectra))


def copy_branch(source: str | Path, run_dir: str | Path) -> None:
    """Give a branched run its source's phase checkpoints and spectra (not its resume points)."""
    source, run_dir = Path(source), Path(run_dir)
    shutil.copytree(source / CHECKPOINTS, run_dir / CHECKPOINTS, dirs_exist_ok=True, ignore=shutil.ignore_patterns(f"{LAST}*.pt"))
    if (source / SPECTRA).exists():
        shutil.copy2(source / SPECTRA, run_dir / SPECTRA)


# -- a finished run, for export and verify ------------------------------------------------------
@dataclass
class Run:
    path: Path
    summary: dict

    @property
    def name(self) -> str:
        return str(self.summary.get("name", self.path.name))

    @property
    def data_info(self) -> dict:
        return self.summary["data_info"]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.data_info["input_size"])

    def checkpoint(self, which: str) -> Path:
        """Path of the "dense" or "lowrank" checkpoint; a missing file is a clear error."""
        path = checkpoint_path(self.path, DENSE if which == "dense" else LOWRANK)
        if not path.is_file():
            raise LrexportError(f"run {self.path} has no {path.relative_to(self.path)}; has its finetuning finished?")
        return path

    def load_models(self, base=None):
        """(low-rank model, dense model), both in eval mode on the CPU; ``base``: the module a run
        whose model was passed in from Python started from."""
        from .train.checkpoint import load_model

        lowrank, _ = load_model(self.checkpoint("lowrank"), base)
        dense, _ = load_model(self.checkpoint("dense"), base)
        return lowrank.eval(), dense.eval()

    def validation_set(self):
        """The run's validation set, rebuilt from its data config (no augmentation)."""
        from .data import recorded_validation_set

        return recorded_validation_set(self.summary["data_config"], f"{self.path}/{SUMMARY}")

    def calibration_set(self, split: str):
        """Images to calibrate int8 ranges on: the "train" split without augmentation, or "val"."""
        from .data import recorded_datasets

        train, val, _ = recorded_datasets(self.summary["data_config"], f"{self.path}/{SUMMARY}", augment=False)
        return train if split == "train" else val


def open_run(path: str | Path) -> Run:
    """The run in ``path``, checked to hold what export needs (its data config and info)."""
    path = Path(path)
    summary = read_summary(path)
    missing = [k for k in ("data_config", "data_info") if k not in summary]
    if missing:
        raise LrexportError(f"{path / SUMMARY} lacks {', '.join(missing)}; was it written by lrexport train?")
    return Run(path, summary)
