"""Runs survive interruption: SIGKILL mid-phase then --resume gives the same result; signals save."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from lrexport.progress import EpochEnd, Step
from lrexport.recipe import load_recipe
from lrexport.train import run_recipe
from lrexport.train.checkpoint import load_checkpoint
from lrexport.train.pipeline import Interrupted

# the shared tiny recipe, twice the data and more epochs: time to interrupt it mid-phase
CHANGES = ("data.train_size=512", "data.val_size=128", "phases.svd.epochs=3", "phases.svd.milestones=[2]", "phases.finetune.epochs=2")


def wait_for_line(metrics, predicate, proc, limit=300):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if metrics.exists():
            if any(predicate(json.loads(l)) for l in metrics.read_text().splitlines() if l.strip()):
                return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("training did not get there")


def comparable(summary):
    keep = ("ranks", "macs", "best_finetune_top1", "best_finetune_top5", "base_top1", "accuracy_gain")
    phases = {k: {m: v[m] for m in ("top1", "top5", "best_top1") if m in v} for k, v in summary["phases"].items()}
    return {k: summary[k] for k in keep} | {"phases": phases}


@pytest.fixture(scope="module")
def recipe(tiny_recipe):
    return tiny_recipe(*CHANGES)


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    """In-process: one torch thread here as in the subprocesses (OMP_NUM_THREADS=1), the same arithmetic."""
    return run_recipe(load_recipe(recipe), tmp_path_factory.mktemp("full") / "run").summary


def sigkill_then_resume(cli, recipe, out: Path, phase: str) -> dict:
    """`lrexport train` killed (SIGKILL) once ``phase`` logged its first epoch, then resumed: the finished summary."""
    proc = cli("train", recipe, "--output", out, wait=False)
    wait_for_line(out / "metrics.jsonl", lambda l: l["phase"] == phase and l["epoch"] == 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists() or "finished" not in json.loads((out / "summary.json").read_text())
    resumed = cli("train", recipe, "--output", out, "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    return json.loads((out / "summary.json").read_text())


def test_sigkill_in_svd_phase_then_resume_matches(recipe, uninterrupted, tmp_path, cli):
    assert comparable(sigkill_then_resume(cli, recipe, tmp_path / "run", "svd")) == comparable(uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_state_and_exits_cleanly(recipe, tmp_path, cli, sig):
    out = tmp_path / "run"
    proc = cli("train", recipe, "--output", out, wait=False)
    wait_for_line(out / "metrics.jsonl", lambda l: l["phase"] == "svd", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err and len(err.strip().splitlines()) == 1
    # the saved state is the resume point (resuming from it: the SIGKILL test, and in-process below)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["phase"] in ("svd", "finetune")


def test_sigterm_inside_an_epoch_resumes_from_that_read_and_matches(recipe, uninterrupted, tmp_path):
    """Reads every 3 steps: SIGTERM at the svd phase's second epoch, step 6, stops at that read.
    Resumed, the run ends as an uninterrupted one that read once per epoch (the cadence
    changes no arithmetic). In-process, so that the signal lands at a chosen step."""

    def kill_at(event):
        if isinstance(event, Step) and (event.phase, event.epoch, event.step) == ("svd", 2, 6):
            os.kill(os.getpid(), signal.SIGTERM)

    every3 = load_recipe(recipe, ["train.log_every=3"])
    with pytest.raises(Interrupted, match=r"signal 15 in the svd phase \(epoch 2, step 6\).*--resume"):
        run_recipe(every3, tmp_path / "run", kill_at)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["phase"], last["epoch"], last["epoch_state"]["step"]) == ("svd", 1, 6)
    resumed = run_recipe(every3, resume=tmp_path / "run").summary
    assert comparable(resumed) == comparable(uninterrupted)

    def svd_epoch2(run):  # its training means: the resumed half-epoch continued the saved sums
        lines = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        (line,) = [l for l in lines if (l["phase"], l["epoch"]) == ("svd", 2)]
        return {k: line[k] for k in ("loss", "ce", "ortho", "sparsity", "train_top1")}

    assert svd_epoch2(tmp_path / "run") == svd_epoch2(uninterrupted["run_dir"])


def test_resume_with_a_changed_recipe_warns(recipe, tmp_path, cli):
    def kill_after_svd_epoch_1(event):
        if isinstance(event, EpochEnd) and (event.phase, event.epoch) == ("svd", 1):
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_recipe(load_recipe(recipe), out, kill_after_svd_epoch_1)
    resumed = cli("train", recipe, "--output", out, "--resume", out, "--set", "phases.finetune.epochs=1")
    assert resumed.returncode == 0, resumed.stderr
    assert "warning: the recipe differs" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["phases"]["finetune"]["epochs"] == 1
