"""Read a run directory as the training pipeline leaves it (summary, checkpoints, data).

Only the documented contract is read: summary.json ("name", "recipe_hash", "data_config",
"data_info") and checkpoints/dense.pt, checkpoints/finetune_best.pt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LrexportError

DENSE_CKPT = "checkpoints/dense.pt"
LOWRANK_CKPT = "checkpoints/finetune_best.pt"


def newest_run(root: str | Path = "runs") -> Path:
    """The run under ``root`` whose summary.json was written last."""
    root = Path(root)
    runs = [p.parent for p in root.glob("*/summary.json")] if root.is_dir() else []
    if not runs:
        raise LrexportError(f"no run directory (with a summary.json) under {root}/; name one explicitly")
    return max(runs, key=lambda p: (p / "summary.json").stat().st_mtime)


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
        path = self.path / (DENSE_CKPT if which == "dense" else LOWRANK_CKPT)
        if not path.is_file():
            raise LrexportError(f"run {self.path} has no {path.relative_to(self.path)}; has its finetuning finished?")
        return path

    def load_models(self):
        """(low-rank model, dense model), both in eval mode on the CPU."""
        from ..train.checkpoint import load_model

        lowrank, _ = load_model(self.checkpoint("lowrank"))
        dense, _ = load_model(self.checkpoint("dense"))
        return lowrank.eval(), dense.eval()

    def validation_set(self):
        """The run's validation set, rebuilt from its data config (no augmentation)."""
        from ..data import recorded_validation_set

        return recorded_validation_set(self.summary["data_config"], f"{self.path}/summary.json")

    def calibration_set(self, split: str):
        """Images to calibrate int8 ranges on: the "train" split without augmentation, or "val"."""
        from ..data import recorded_datasets

        train, val, _ = recorded_datasets(self.summary["data_config"], f"{self.path}/summary.json", augment=False)
        return train if split == "train" else val


def open_run(path: str | Path) -> Run:
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise LrexportError(f"{path} is not a run directory (no summary.json)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as e:
        raise LrexportError(f"{summary_path} is not valid JSON: {e}") from None
    missing = [k for k in ("data_config", "data_info") if k not in summary]
    if missing:
        raise LrexportError(f"{summary_path} lacks {', '.join(missing)}; was it written by lrexport train?")
    return Run(path, summary)
