"""The paper's numbers live in lrexport/seed_results.py only: recipes name their seed row, the doc is rendered."""

import re
from pathlib import Path

import pytest

from lrexport.recipe import load_recipe, merge_tables, recipe_from_dict
from lrexport.seed_results import PAPER_POINTS, SEED_MODELS, paper_point, render_paper_tables

ROOT = Path(__file__).parents[1]
SEED_RECIPES = sorted({p.recipe for p in PAPER_POINTS})
FIRST_ROWS = [p for p in PAPER_POINTS if p.table == 3 and p.row == 1]

# What every CIFAR-10 recipe was before they shared recipes/cifar10_base.toml (seed Appendix A;
# shortcut B and training from scratch in SVD form as in the paper's public code).
CIFAR_SCHEDULE = {"fullrank": 0.1, "svd": 0.001, "finetune": 0.001}
CIFAR_SHARED = {
    "output_dir": "runs", "seed": 0, "device": "auto",
    "model": {"kwargs": {"shortcut": "B"}},
    "data": {"dataset": "cifar10", "root": "data/cifar10", "download": True, "batch_size": 100, "workers": 4},
    "decompose": {"init": "scratch"},
    "reg": {"ortho": 1.0},
    "phases": {phase: {"epochs": 164, "lr": lr, "weight_decay": 5e-4, "milestones": [81, 122]} for phase, lr in CIFAR_SCHEDULE.items()},
}


def test_paper_tables_doc_is_rendered_from_seed_results():
    """Regenerate with: python -m lrexport.seed_results > docs/paper-tables.md"""
    assert (ROOT / "docs" / "paper-tables.md").read_text(encoding="utf-8") == render_paper_tables()


def test_seed_row_names_are_unique():
    assert len({p.name for p in PAPER_POINTS}) == len(PAPER_POINTS) == 90


@pytest.mark.parametrize("path", SEED_RECIPES)
def test_recipe_names_its_blocks_first_row_and_holds_no_paper_numbers(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    names = re.findall(r'seed row "([^"]+)"', text)
    point = paper_point(names[0])
    assert names == [point.name] and (point.recipe, point.row) == (path, 1)
    r = load_recipe(ROOT / path)
    assert SEED_MODELS[r.model.name][0] == point.model
    assert (r.decompose.mode, r.reg.type, r.reg.decay, r.prune.energy) == (point.decomposition, point.regularizer, point.decay, point.energy)
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    block = [q for q in PAPER_POINTS if q.recipe == path]
    numbers = {f"{q.speedup:.2f}" for q in block} | {f"{q.gain:+.2f}" for q in block} | {f"{point.base:.2f}"}
    assert not [n for n in numbers if n in comments]  # they are in seed_results.py and docs/paper-tables.md


@pytest.mark.parametrize("point", FIRST_ROWS, ids=lambda p: Path(p.recipe).stem)
def test_cifar_recipe_is_the_shared_schedule_at_its_seed_row(point):
    """Each of the 24 CIFAR recipes loads (through its base) to exactly the recipe it was as one file."""
    stem = Path(point.recipe).stem
    own = {"name": stem, "model": {"name": "cifar_" + point.model.lower().replace("-", "")},
           "decompose": {"mode": point.decomposition}, "reg": {"type": point.regularizer, "decay": point.decay},
           "prune": {"energy": point.energy}}
    expected = recipe_from_dict(merge_tables(CIFAR_SHARED, own))
    assert load_recipe(ROOT / point.recipe).to_dict() == expected.to_dict()
    assert len(FIRST_ROWS) == 24
