"""From a recipe to torch-free inference: train (tiny), export, verify, infer."""

import subprocess
import sys

from click.testing import CliRunner

from lrexport.cli import main

from runs import no_torch_env, save_val_image


def test_recipe_run_exports_verifies_and_infers(quickstart_run, tmp_path):
    trained_run = quickstart_run
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
