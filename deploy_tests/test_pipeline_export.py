"""From a recipe to torch-free inference: train (tiny), export, verify, infer."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.recipe import load_recipe
from lrexport.train import run_recipe

from test_runtime import REPO, no_torch_env, save_val_image


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The quickstart recipe, shrunk to seconds: the same phases and run-directory layout."""
    overrides = [
        "data.train_size=256", "data.val_size=64", "data.batch_size=64", "data.eval_batch_size=64",
        "phases.dense.epochs=2", "phases.svd.epochs=1", "phases.finetune.epochs=1", "device=cpu",
    ]
    recipe = load_recipe(REPO / "recipes/quickstart.toml", overrides)
    return run_recipe(recipe, tmp_path_factory.mktemp("runs") / "quickstart").run_dir


def test_recipe_run_exports_verifies_and_infers(trained_run, tmp_path):
    res = CliRunner().invoke(main, ["export", str(trained_run), "--threads", "1"])  # tuned: the default
    assert res.exit_code == 0, res.output
    art = trained_run / "artifacts"
    assert {"model.onnx", "dense.onnx", "model.pt2", "dense.pt2", "plan.json", "reference.npz", "meta.json"} <= {
        p.name for p in art.iterdir()}
    args = ["verify", str(art), "--threads", "1", "--warmup", "1", "--repeats", "3", "--batch-sizes", "1,4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    image = tmp_path / "val0.png"
    save_val_image(trained_run, 0, image)
    proc = subprocess.run(
        [sys.executable, "-m", "lrexport", "infer", str(art), str(image), "--top-k", "1"],
        env=no_torch_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[-1].startswith("class")
