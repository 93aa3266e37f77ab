"""The run directory contract: finders, layers left dense, one --output, and readers without torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

from lrexport import rundir
from lrexport.cli import main
from lrexport.errors import CheckpointError, LrexportError
from lrexport.lowrank import layer_status
from lrexport.models.registry import register_model
from lrexport.recipe import recipe_from_dict
from lrexport.report import build_report
from lrexport.train import run_recipe

REPO = Path(__file__).resolve().parents[1]


def _mixed_convs(num_classes: int = 10) -> nn.Module:
    """One plain conv and three the SVD form cannot express."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


register_model("test_mixed_convs")(lambda num_classes=10: _mixed_convs(num_classes))

RAW = {
    "name": "mixed",
    "model": {"name": "test_mixed_convs"},
    "data": {"dataset": "synthetic", "image_size": 8, "train_size": 64, "val_size": 32, "batch_size": 32},
    "prune": {"energy": 0.01},
    "phases": {"dense": {"epochs": 0}, "svd": {"epochs": 1, "lr": 0.05}, "finetune": {"epochs": 0}},
}
LEFT_DENSE = {"2": "grouped, groups=4", "4": "padding_mode='reflect'", "6": "padding='same'", "10": "Linear, decompose.linear = false"}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    return run_recipe(recipe_from_dict(RAW), tmp_path_factory.mktemp("runs") / "mixed").run_dir


def no_torch_env(tmp_path) -> dict:
    """An environment in which `import torch` fails, as on an edge device without it."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))


def test_readers_import_no_torch(tmp_path):
    code = ("import sys, lrexport.report, lrexport.rundir, lrexport.sweep, lrexport.io, lrexport.train, "
            "lrexport.deploy.runtime, lrexport.cli; assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], env=no_torch_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_layers_left_dense_are_named(mixed_run, tmp_path):
    status = {s.name: s.reason for s in layer_status(_mixed_convs(), include=["*"], exclude=["0"])}
    assert status == {**LEFT_DENSE, "0": "excluded by decompose.exclude"}
    summary = rundir.read_summary(mixed_run)
    assert {name: s["reason"] for name, s in summary["layers"].items() if not s["decomposed"]} == LEFT_DENSE
    assert set(summary["ranks"]) == {"0"}  # only the plain conv was decomposed
    md = (build_report([mixed_run], tmp_path / "r").output / "report.md").read_text()
    assert ("mixed: left dense: 2 (grouped, groups=4), 4 (padding_mode='reflect'), 6 (padding='same'), "
            "10 (Linear, decompose.linear = false)") in md


def test_report_runs_without_torch(mixed_run, tmp_path):
    """`lrexport report` on a real run where torch cannot be imported: the same CSV as in-process."""
    proc = subprocess.run([sys.executable, "-m", "lrexport", "report", str(mixed_run), "--output", str(tmp_path / "a")],
                          env=no_torch_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "left dense: 2 (grouped" in " ".join(proc.stdout.split())
    build_report([mixed_run], tmp_path / "b")
    assert (tmp_path / "a" / "report.csv").read_text() == (tmp_path / "b" / "report.csv").read_text()


def _touch(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    os.utime(path, (mtime, mtime))


def test_newest_and_resumable_runs(tmp_path):
    now = 1_700_000_000.0  # fixed modification times: the finders order runs by them
    _touch(tmp_path / "a-1" / rundir.SUMMARY, now - 30)
    _touch(tmp_path / "a-1" / rundir.CHECKPOINTS / "last.pt", now - 5)
    _touch(tmp_path / "b-1" / rundir.SUMMARY, now - 10)
    _touch(tmp_path / "b-1" / rundir.CHECKPOINTS / "last.pt", now - 1)
    _touch(tmp_path / "a-2" / rundir.SUMMARY, now - 20)  # newer summary than a-1, but no resume point
    assert rundir.newest_run(tmp_path) == tmp_path / "b-1"
    assert rundir.resumable_run(tmp_path, "a") == tmp_path / "a-1"  # of that recipe only, with a last.pt
    with pytest.raises(CheckpointError, match="nothing to resume"):
        rundir.resumable_run(tmp_path, "c")
    with pytest.raises(LrexportError, match="no run directory"):
        rundir.newest_run(tmp_path / "missing")


def test_read_recipe_is_typed_and_a_damaged_one_is_one_error(mixed_run, tmp_path):
    recipe = rundir.read_recipe(mixed_run)
    assert (recipe.model.name, recipe.prune.energy) == ("test_mixed_convs", 0.01)
    (tmp_path / rundir.RECIPE).write_text("name = [")
    with pytest.raises(LrexportError, match="cannot be read"):
        rundir.read_recipe(tmp_path)


def test_output_is_one_option_name(tmp_path):
    for command in ("train", "sweep", "report", "export"):
        help_text = CliRunner().invoke(main, [command, "--help"]).output
        assert "--output" in help_text and "--out " not in help_text, command
    both = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "a"), "--output", str(tmp_path / "b")])
    assert both.exit_code == 2 and "--out and --output are one option" in both.output
