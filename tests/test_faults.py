"""Faults never lose work, and bad input is one line: corrupt checkpoints, NaN losses, failed writes,
checkpoints or data that do not fit the model, files that are not ONNX models.

Each case runs where a user would meet it, mostly through `lrexport` in a subprocess. Covered
elsewhere: SIGINT/SIGTERM save and exit cleanly (tests/test_resume.py); an image that is not
one is one line from `lrexport infer` (deploy_tests/test_runtime.py::test_infer_rejects_a_non_image_in_one_line).
"""

from __future__ import annotations

import json
import math
import os
import resource  # POSIX: the file-size limit that makes a real failed write
import shutil
import signal
import subprocess

import pytest
import torch

from lrexport.errors import CheckpointError, WriteError
from lrexport.recipe import load_recipe
from lrexport.train import run_recipe
from lrexport.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from lrexport.train.loop import NonFiniteLoss
from lrexport.progress import EpochEnd
from lrexport.train.pipeline import Interrupted


def one_error_line(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The user's view of a failure: exit ``code``, one `error:` line on stderr, no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def finite_and_good(path, recipe_path) -> dict:
    """A checkpoint that loads, has finite weights, and gives a finite validation loss."""
    from lrexport.data import build_datasets

    model, ckpt = load_model(path)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    _, val, _ = build_datasets(load_recipe(recipe_path).data)
    x, y = val[:64]
    with torch.no_grad():
        assert math.isfinite(torch.nn.functional.cross_entropy(model.eval()(x), y).item())
    return ckpt



@pytest.fixture(scope="module")
def recipe(tiny_recipe):
    return tiny_recipe("phases.svd.epochs=3", "phases.svd.milestones=[2]", "phases.finetune.epochs=2")


@pytest.fixture(scope="module")
def interrupted(recipe, tmp_path_factory):
    """A run stopped by SIGTERM inside the SVD phase: last.pt mid-phase, last.prev.pt the state before it."""

    def sigterm_after_svd_epoch_1(event):
        if isinstance(event, EpochEnd) and (event.phase, event.epoch) == ("svd", 1):
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Interrupted):
        run_recipe(load_recipe(recipe), out, sigterm_after_svd_epoch_1)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "last.prev.pt").is_file()
    return out


@pytest.fixture
def run_copy(interrupted, tmp_path):
    """A private copy of the interrupted run for a test to damage."""
    return shutil.copytree(interrupted, tmp_path / "run")


@pytest.fixture(scope="module")
def recovered(recipe, interrupted, cli, tmp_path_factory):
    """The interrupted run with a truncated last.pt: resumed (refused), then resumed with --previous."""
    run = shutil.copytree(interrupted, tmp_path_factory.mktemp("recovered") / "run")
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    prev = load_checkpoint(run / "checkpoints" / "last.prev.pt")
    lines_before = len((run / "metrics.jsonl").read_text().splitlines())
    refused = cli("train", recipe, "--resume", run)
    resumed = cli("train", recipe, "--resume", run, "--previous")
    return run, prev, lines_before, refused, resumed


# -- corrupt and truncated checkpoints --------------------------------------------------------------
def test_truncated_last_checkpoint_is_one_line_that_points_to_previous(recovered):
    run, _, _, refused, _ = recovered
    line = one_error_line(refused)
    assert "last.pt" in line and "corrupt" in line and "--previous" in line


def test_previous_checkpoint_continues_the_run_to_the_end(recipe, recovered):
    run, prev, lines_before, _, resumed = recovered
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert "finished" in summary and summary["ranks"]
    # training picked up where last.prev.pt stood: the first new epoch is the one after it
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    phase_epochs = prev["phase"] and getattr(load_recipe(recipe).phases, prev["phase"]).epochs
    if prev["phase"] is not None and prev["epoch"] < phase_epochs:
        first_new = lines[lines_before]
        assert (first_new["phase"], first_new["epoch"]) == (prev["phase"], prev["epoch"] + 1)
    assert (lines[-1]["phase"], lines[-1]["epoch"]) == ("finetune", 2)


def test_garbled_bytes_inside_a_checkpoint_are_caught(recipe, run_copy):
    """torch.load reads flipped tensor bytes silently; the zip checksums must catch them."""
    last = run_copy / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 32):  # the middle of the file: tensor data
        data[i] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*checksum"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="--previous"):
        run_recipe(load_recipe(recipe), resume=run_copy)


def test_previous_without_a_previous_checkpoint_is_one_line(recipe, run_copy):
    (run_copy / "checkpoints" / "last.prev.pt").unlink()
    with pytest.raises(CheckpointError, match="not found: .*last.prev.pt"):
        run_recipe(load_recipe(recipe), resume=run_copy, previous=True)


# -- checkpoints and data that do not fit the model -------------------------------------------------
def test_resume_checkpoint_with_a_wrong_shape_is_one_error(recipe, run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["model"]["fc.weight"] = torch.zeros(3, 64)  # a whole file, but not this model's
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"last.pt does not match its model: .*fc.weight.*--previous"):
        run_recipe(load_recipe(recipe), resume=run_copy)


def test_weights_from_another_model_are_one_error(recipe, interrupted, tmp_path):
    """model.weights naming a ResNet-20 checkpoint in a ResNet-32 recipe (in-process: the CLI path is the one above)."""
    other = interrupted / "checkpoints" / "dense.pt"
    r = load_recipe(recipe, ["model.name=cifar_resnet32", f'model.weights="{other}"'])
    with pytest.raises(CheckpointError, match="dense.pt does not match the model: .*Missing key") as info:
        run_recipe(r, tmp_path / "r")
    assert "\n" not in str(info.value)


def test_num_classes_that_do_not_match_the_data_are_one_line(recipe, tmp_path, cli):
    line = one_error_line(cli("train", recipe, "--output", tmp_path / "r", "--set", "model.num_classes=7"))
    assert "model.num_classes = 7 but the synthetic data has 10 classes" in line


# -- NaN / inf losses -------------------------------------------------------------------------------
def test_nan_loss_stops_naming_phase_epoch_step_and_keeps_a_good_checkpoint(recipe, tmp_path, cli):
    out = tmp_path / "r"
    # recoveries off: each would print a warning line first (tests/test_stability.py covers them)
    proc = cli("train", recipe, "--output", out, "--set", "phases.dense.epochs=0", "--set", "phases.svd.lr=1e30", "--set", "train.recoveries=0")
    line = one_error_line(proc)
    assert "svd phase, epoch 1" in line and "at step 2" in line and "nan" in line and "last.pt" in line
    ckpt = finite_and_good(out / "checkpoints" / "last.pt", recipe)
    assert ckpt["completed"] == ["dense", "decompose", "fullrank"]


def test_weights_that_overflow_after_finite_losses_do_not_become_the_checkpoint(recipe, tmp_path):
    """One step per epoch: every training loss is finite, the weights after it are not usable.

    The validation after the epoch sees it; last.pt stays the state before the phase.
    """
    r = load_recipe(recipe, ["data.train_size=32", "phases.dense.epochs=0", "phases.svd.lr=1e30"])
    with pytest.raises(NonFiniteLoss, match="svd phase, epoch 1: validation loss became nan"):
        run_recipe(r, tmp_path / "r")
    ckpt = finite_and_good(tmp_path / "r" / "checkpoints" / "last.pt", recipe)
    assert ckpt["phase"] is None and ckpt["completed"] == ["dense", "decompose", "fullrank"]


# -- failed writes ------------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    """A real failed write: past RLIMIT_FSIZE, write() fails with EFBIG (SIGXFSZ ignored, as Python does)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def test_failed_checkpoint_write_keeps_the_previous_one(interrupted, tmp_path):
    model, ckpt = load_model(interrupted / "checkpoints" / "dense.pt")
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, ckpt["arch"], tag="old")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(WriteError, match=r"cannot write .*c.pt: File too large; nothing was overwritten"):
            save_checkpoint(path, model, ckpt["arch"], tag="new")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and load_checkpoint(path)["tag"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_disk_full_during_training_is_one_line_and_last_checkpoint_survives(recipe, run_copy, cli):
    """Resume under a 256 KiB file-size limit: the small files are written, the next checkpoint is not."""
    ckpts = run_copy / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    line = one_error_line(cli("train", recipe, "--resume", run_copy, preexec_fn=_file_size_limit(256 << 10)))
    assert "cannot write" in line and "File too large" in line and "the previous checkpoints are intact" in line
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before
    load_checkpoint(ckpts / "last.pt")


# -- files that are not ONNX models ------------------------------------------------------------------
@pytest.fixture(scope="module")
def garbage_artifacts(recovered, tmp_path_factory):
    """A real export of the recovered run whose model.onnx is then overwritten with garbage."""
    from lrexport.deploy.export import ExportConfig, export_run
    from lrexport.deploy.planning.plan import TuneConfig

    run = recovered[0]
    config = ExportConfig(check_images=4, tune=TuneConfig(enabled=False))
    art = export_run(run, tmp_path_factory.mktemp("art") / "artifacts", config).out_dir
    (art / "model.onnx").write_bytes(b"\x08\x07not an onnx model\xff" * 20)
    return art


def test_infer_with_a_model_file_that_is_not_onnx_is_one_line(garbage_artifacts, tmp_path, cli):
    from PIL import Image

    image = tmp_path / "grey.png"
    Image.new("RGB", (8, 8), (128, 128, 128)).save(image)
    line = one_error_line(cli("infer", garbage_artifacts, image))
    assert "model.onnx" in line and "cannot load" in line


def test_verify_with_a_model_file_that_is_not_onnx_is_one_error(garbage_artifacts):
    """In-process (torch is loaded already); the CLI prints LrexportErrors as infer's test shows."""
    from lrexport.deploy.verify import VerifyConfig, verify_artifacts
    from lrexport.errors import LrexportError

    with pytest.raises(LrexportError, match="cannot load .*model.onnx") as info:
        verify_artifacts(garbage_artifacts, config=VerifyConfig(warmup=0, repeats=1, batch_sizes=(1,)))
    assert "\n" not in str(info.value)
