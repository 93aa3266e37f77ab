"""The paper's own results (seed Tables 3–5) and the baselines it compares with (Tables 6–8), as data.

Accuracy gains are in percentage points over the paper's uncompressed model: top-1 on
CIFAR-10 (Tables 3, 6), top-5 on ImageNet (Tables 4, 5, 7, 8). Speedups are MACs ratios.
Table 3 reaches us flattened, with some "L1"/"None" labels displaced by a row; rows were
assigned by their values (a tiny e with a non-zero λ_s is a Hoyer row; λ_s = 0 is a None row).
Table 6's unlabeled row under CNN-FCF is CNN-FCF's second operating point.

This module is the one place for these numbers: recipe headers name a row (``PaperPoint.name``)
and docs/paper-tables.md is rendered from here (``python -m lrexport.seed_results``).
"""

from __future__ import annotations

from dataclasses import dataclass

# lrexport model name -> the paper's model and data set
SEED_MODELS = {
    "cifar_resnet20": ("ResNet-20", "CIFAR-10"), "cifar_resnet32": ("ResNet-32", "CIFAR-10"),
    "cifar_resnet56": ("ResNet-56", "CIFAR-10"), "cifar_resnet110": ("ResNet-110", "CIFAR-10"),
    "resnet18": ("ResNet-18", "ImageNet"), "resnet50": ("ResNet-50", "ImageNet"),
}
METRIC = {"CIFAR-10": "top1", "ImageNet": "top5"}  # what the paper's gains measure


@dataclass(frozen=True)
class PaperPoint:
    """One row of Tables 3–5: the proposed method at one (λ_s, e)."""

    table: int
    model: str
    decomposition: str  # channel | spatial
    regularizer: str  # hoyer | l1 | none
    base: float  # the paper's uncompressed accuracy (%)
    decay: float  # λ_s
    energy: float  # e
    gain: float  # accuracy points
    speedup: float  # MACs
    row: int = 1  # its place in its block (model, decomposition, regularizer), from 1

    @property
    def name(self) -> str:
        """What a recipe's header calls this row (the numbers live here only)."""
        return f"Table {self.table}, {self.model} {self.decomposition} {self.regularizer}, row {self.row}"

    @property
    def recipe(self) -> str:
        """The recipe file whose block this row is in (its defaults are the block's row 1)."""
        model = self.model.lower().replace("-", "")
        if self.table == 3:
            return f"recipes/cifar10_{model}_{self.decomposition}_{self.regularizer}.toml"
        return f"recipes/{model}_imagenet{'_spatial' if self.decomposition == 'spatial' else ''}.toml"


@dataclass(frozen=True)
class Baseline:
    """One row of Tables 6–8: a previous method at one operating point."""

    table: int
    model: str
    method: str  # as the table names it
    family: str  # the method, for one marker per method in plots
    gain: float
    speedup: float
    decomposition: str = ""  # Table 7 splits channel- and spatial-wise methods


# (model, decomposition, regularizer, base top-1, [(λ_s, e, gain, speedup), ...])
_TABLE3 = [
    ("ResNet-20", "channel", "hoyer", 90.93, [(0.03, 1.5e-5, +0.04, 2.20), (0.07, 6.0e-6, -0.27, 2.66), (0.1, 3.0e-6, -0.54, 2.94)]),
    ("ResNet-20", "channel", "l1", 90.93, [(0.01, 7.0e-2, +1.13, 1.43), (0.001, 2.7e-2, +0.63, 1.59), (0.1, 1.0e-1, +0.32, 2.10), (0.3, 1.0e-1, -0.48, 2.84)]),
    ("ResNet-20", "channel", "none", 90.93, [(0.0, 1.9e-1, -0.37, 2.03), (0.0, 2.8e-1, -0.52, 2.54)]),
    ("ResNet-20", "spatial", "hoyer", 90.99, [(0.01, 1.0e-3, +0.40, 3.26), (0.03, 2.0e-5, -0.10, 3.87), (0.1, 4.0e-6, -0.86, 4.77), (0.01, 7.0e-3, -1.03, 5.16)]),
    ("ResNet-20", "spatial", "l1", 90.99, [(0.01, 6.0e-2, +0.58, 2.26), (0.1, 1.0e-1, -0.52, 3.55), (0.3, 1.0e-1, -0.83, 4.79)]),
    ("ResNet-20", "spatial", "none", 90.99, [(0.0, 2.9e-1, +0.59, 2.44), (0.0, 3.9e-1, -0.78, 3.15)]),
    ("ResNet-32", "channel", "hoyer", 92.12, [(0.003, 3.0e-3, +0.04, 2.22), (0.01, 1.0e-4, -0.10, 2.44), (0.03, 2.0e-6, -0.86, 2.56)]),
    ("ResNet-32", "channel", "l1", 92.12, [(0.03, 2.0e-2, +0.22, 1.58), (0.1, 1.0e-1, -0.21, 2.84), (0.3, 5.0e-2, -0.96, 3.08)]),
    ("ResNet-32", "channel", "none", 92.12, [(0.0, 1.8e-1, -0.30, 2.23), (0.0, 2.1e-1, -0.11, 2.41), (0.0, 2.3e-1, -0.27, 2.51)]),
    ("ResNet-32", "spatial", "hoyer", 92.14, [(0.001, 5.0e-2, +0.52, 2.56), (0.005, 5.0e-3, -0.38, 3.93), (0.01, 8.0e-4, -0.62, 4.57), (0.03, 8.0e-6, -1.12, 5.30)]),
    ("ResNet-32", "spatial", "l1", 92.14, [(0.03, 7.0e-2, +0.13, 2.60), (0.1, 2.5e-2, -0.34, 4.20), (0.1, 1.5e-1, -0.96, 5.32)]),
    ("ResNet-32", "spatial", "none", 92.14, [(0.0, 3.8e-1, -0.60, 3.62), (0.0, 4.8e-1, -1.76, 4.71)]),
    ("ResNet-56", "channel", "hoyer", 93.28, [(0.001, 2.0e-2, +0.39, 2.70), (0.003, 1.0e-3, -0.29, 3.49), (0.01, 7.0e-6, -0.41, 4.35), (0.01, 2.0e-5, -0.68, 4.94), (0.03, 3.0e-7, -1.20, 5.16)]),
    ("ResNet-56", "channel", "l1", 93.28, [(0.1, 3.0e-2, -0.30, 4.25), (0.1, 1.5e-1, -0.59, 4.86)]),
    ("ResNet-56", "channel", "none", 93.28, [(0.0, 2.8e-1, -0.16, 2.91), (0.0, 3.8e-1, -0.98, 3.71), (0.0, 4.7e-1, -1.78, 4.70)]),
    ("ResNet-56", "spatial", "hoyer", 93.36, [(0.001, 3.0e-2, +0.17, 3.07), (0.003, 1.0e-3, -0.09, 3.75), (0.01, 1.0e-4, -0.70, 5.43), (0.03, 1.0e-6, -1.37, 6.90)]),
    ("ResNet-56", "spatial", "l1", 93.36, [(0.03, 5.0e-3, -0.24, 3.19), (0.03, 5.0e-2, -0.90, 5.61), (0.03, 2.5e-1, -1.38, 6.76)]),
    ("ResNet-56", "spatial", "none", 93.36, [(0.0, 2.8e-1, -0.18, 2.96), (0.0, 4.7e-1, -0.47, 4.76), (0.0, 5.2e-1, -2.22, 5.43)]),
    ("ResNet-110", "channel", "hoyer", 93.58, [(0.001, 5.0e-3, +0.38, 3.85), (0.003, 3.0e-4, -0.34, 5.00), (0.01, 3.0e-7, -0.60, 6.66), (0.03, 1.0e-6, -1.27, 8.76)]),
    ("ResNet-110", "channel", "l1", 93.58, [(0.03, 1.0e-1, -0.28, 5.02), (0.03, 3.0e-1, -1.27, 7.44)]),
    ("ResNet-110", "channel", "none", 93.58, [(0.0, 3.7e-1, -0.32, 4.26), (0.0, 4.6e-1, -1.86, 5.44), (0.0, 5.5e-1, -2.59, 7.03)]),
    ("ResNet-110", "spatial", "hoyer", 93.93, [(0.001, 1.3e-2, +0.10, 4.75), (0.003, 7.0e-4, -0.46, 6.42), (0.01, 2.0e-5, -1.28, 8.76), (0.03, 2.0e-8, -2.03, 10.06)]),
    ("ResNet-110", "spatial", "l1", 93.93, [(0.03, 3.0e-2, -0.42, 5.02), (0.03, 1.0e-1, -0.67, 6.45), (0.03, 1.5e-1, -1.01, 7.21), (0.03, 2.5e-1, -1.36, 8.66)]),
    ("ResNet-110", "spatial", "none", 93.93, [(0.0, 4.7e-1, -1.56, 5.69), (0.0, 5.6e-1, -2.27, 7.55), (0.0, 6.1e-1, -3.44, 8.87)]),
]

# Tables 4 (ResNet-18) and 5 (ResNet-50), Hoyer: (model, decomposition, base top-5, rows)
_TABLES45 = [
    (4, "ResNet-18", "channel", 88.54, [(0.002, 5.0e-4, +0.94, 1.45), (0.003, 1.0e-4, -1.28, 2.03), (0.005, 1.0e-4, -2.47, 2.98),
                                        (0.01, 1.0e-5, -4.20, 4.21)]),
    (4, "ResNet-18", "spatial", 88.54, [(0.002, 1.0e-4, +0.67, 1.61), (0.005, 1.0e-4, -0.84, 2.98), (0.01, 1.0e-4, -3.13, 6.36)]),
    (5, "ResNet-50", "channel", 91.72, [(0.001, 1.0e-4, +0.02, 1.37), (0.002, 1.0e-4, -0.12, 1.92), (0.003, 5.0e-5, -0.54, 2.51),
                                        (0.005, 5.0e-5, -1.56, 4.17)]),
    (5, "ResNet-50", "spatial", 91.91, [(0.0005, 1.0e-3, +0.06, 1.44), (0.001, 1.0e-4, -0.10, 1.79), (0.002, 2.0e-4, -1.09, 3.05)]),
]

# Table 6, CIFAR-10 top-1: method, family, {model: (gain, speedup)}
_TABLE6 = [
    ("Zhang et al.", "Zhang et al.", {"ResNet-20": (-3.61, 1.41), "ResNet-32": (-2.76, 1.41)}),
    ("Jaderberg et al.", "Jaderberg et al.", {"ResNet-20": (-2.25, 1.66), "ResNet-32": (-2.29, 1.68)}),
    ("TRP-Ch", "TRP-Ch", {"ResNet-20": (-0.43, 2.17), "ResNet-32": (-0.72, 2.20)}),
    ("TRP-Sp", "TRP-Sp", {"ResNet-20": (-0.37, 2.84), "ResNet-32": (-0.75, 3.40)}),
    ("SFP", "SFP", {"ResNet-20": (-1.37, 1.79), "ResNet-32": (-0.55, 1.71), "ResNet-56": (0.19, 1.70), "ResNet-110": (0.18, 1.69)}),
    ("CNN-FCF", "CNN-FCF", {"ResNet-20": (-1.07, 1.71), "ResNet-32": (-0.25, 1.73), "ResNet-56": (0.24, 1.75), "ResNet-110": (0.09, 1.76)}),
    ("CNN-FCF", "CNN-FCF", {"ResNet-20": (-2.67, 3.17), "ResNet-32": (-1.69, 3.36), "ResNet-56": (-1.22, 3.44), "ResNet-110": (-0.62, 2.55)}),
    ("C-SGD-5/8", "C-SGD", {"ResNet-56": (0.23, 2.55), "ResNet-110": (0.03, 2.56)}),
    ("NISP", "NISP", {"ResNet-56": (-0.03, 1.77), "ResNet-110": (-0.18, 1.78)}),
]

# Table 7, ResNet-18 top-5: (decomposition, method, family, gain, speedup)
_TABLE7 = [
    ("channel", "Zhang et al.", "Zhang et al.", -4.85, 1.39), ("channel", "Zhang et al.", "Zhang et al.", -4.10, 1.41),
    ("channel", "TRP-Ch", "TRP-Ch", -2.06, 1.81), ("channel", "TRP-Ch", "TRP-Ch", -2.91, 2.20), ("channel", "TRP-Ch", "TRP-Ch", -3.02, 2.50),
    ("spatial", "Jaderberg et al.", "Jaderberg et al.", -4.82, 2.00), ("spatial", "TRP-Sp", "TRP-Sp", -1.80, 2.60),
    ("spatial", "TRP-Sp", "TRP-Sp", -2.71, 3.20), ("spatial", "TRP-Sp", "TRP-Sp", -3.24, 3.68),
]

# Table 8, ResNet-50 top-5: (method, family, gain, speedup)
_TABLE8 = [
    ("SFP", "SFP", -0.81, 1.72), ("CNN-FCF-A", "CNN-FCF", 0.26, 1.41), ("CNN-FCF-B", "CNN-FCF", -0.19, 1.85),
    ("CNN-FCF-C", "CNN-FCF", -0.69, 2.33), ("CNN-FCF-D", "CNN-FCF", -1.37, 2.96), ("NISP-50-A", "NISP", -0.21, 1.38),
    ("NISP-50-B", "NISP", -0.89, 1.79), ("C-SGD-70", "C-SGD", -0.10, 1.58), ("C-SGD-50", "C-SGD", -0.29, 1.86),
    ("C-SGD-30", "C-SGD", -0.47, 2.26),
]

PAPER_POINTS: tuple[PaperPoint, ...] = (
    *(PaperPoint(3, m, d, r, base, *row, i) for m, d, r, base, rows in _TABLE3 for i, row in enumerate(rows, 1)),
    *(PaperPoint(t, m, d, "hoyer", base, *row, i) for t, m, d, base, rows in _TABLES45 for i, row in enumerate(rows, 1)),
)

BASELINES: tuple[Baseline, ...] = (
    *(Baseline(6, model, method, family, *point) for method, family, points in _TABLE6 for model, point in points.items()),
    *(Baseline(7, "ResNet-18", method, family, gain, speedup, dec) for dec, method, family, gain, speedup in _TABLE7),
    *(Baseline(8, "ResNet-50", method, family, gain, speedup) for method, family, gain, speedup in _TABLE8),
)


def seed_model(model_name: str) -> tuple[str, str] | None:
    """(paper model, data set) for an lrexport model name, or None if the paper has no results for it."""
    return SEED_MODELS.get(model_name)


def paper_point(name: str) -> PaperPoint:
    """The row a recipe header names, e.g. "Table 3, ResNet-20 channel hoyer, row 1"."""
    for point in PAPER_POINTS:
        if point.name == name:
            return point
    raise KeyError(f"no seed row named {name!r}")


def paper_points(model: str) -> list[PaperPoint]:
    return [p for p in PAPER_POINTS if p.model == model]


def baselines(model: str) -> list[Baseline]:
    return [b for b in BASELINES if b.model == model]


_TITLES = {3: "Table 3: CIFAR-10, top-1", 4: "Table 4: ImageNet ResNet-18, top-5", 5: "Table 5: ImageNet ResNet-50, top-5"}
_DOC_INTRO = """\
# The paper's tables

Generated from `lrexport/seed_results.py` by `python -m lrexport.seed_results > docs/paper-tables.md`
(a test keeps this file equal to that output): edit the numbers there, not here.

Accuracy gains are percentage points over the paper's uncompressed model (its base accuracy);
speedups are MACs ratios. Each block (model, decomposition, regularizer) has a recipe whose
defaults are the block's row 1 and whose header names that row; reach the other rows with
`lrexport train RECIPE --set reg.decay=λ_s --set prune.energy=e`. Table 3 reaches us flattened,
with some "L1"/"None" labels displaced by a row: rows were assigned by their values (a tiny e
with a non-zero λ_s is a Hoyer row; λ_s = 0 is a None row).
"""


def _points_table(table: int) -> list[str]:
    lines = [f"## {_TITLES[table]}", "", "| seed row | recipe | base acc. (%) | λ_s | e | gain (points) | MACs speedup |",
             "|---|---|---|---|---|---|---|"]
    for p in PAPER_POINTS:
        if p.table == table:
            lines.append(f"| {p.name} | `{p.recipe}` | {p.base:.2f} | {p.decay:g} | {p.energy:.1e} | {p.gain:+.2f} | {p.speedup:.2f}× |")
    return [*lines, ""]


def _baselines_table() -> list[str]:
    lines = ["## Tables 6–8: the baselines the paper compares with", "",
             "| table | model | method | decomposition | gain (points) | MACs speedup |", "|---|---|---|---|---|---|"]
    for b in BASELINES:
        lines.append(f"| {b.table} | {b.model} | {b.method} | {b.decomposition or '—'} | {b.gain:+.2f} | {b.speedup:.2f}× |")
    return [*lines, ""]


def render_paper_tables() -> str:
    """docs/paper-tables.md: every row above as Markdown, one table per seed table."""
    parts = [_DOC_INTRO]
    for table in sorted(_TITLES):
        parts.append("\n".join(_points_table(table)))
    parts.append("\n".join(_baselines_table()))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_paper_tables(), end="")
