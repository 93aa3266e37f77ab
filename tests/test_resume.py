"""Runs survive interruption: SIGKILL mid-phase then --resume gives the same result; signals save."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = """
name = "tiny"
seed = 3
[model]
name = "cifar_resnet20"
[data]
dataset = "synthetic"
image_size = 8
train_size = 512
val_size = 128
batch_size = 32
[reg]
type = "hoyer"
decay = 0.3
[prune]
energy = 0.01
[phases.dense]
epochs = 1
lr = 0.05
[phases.svd]
epochs = 3
lr = 0.05
milestones = [2]
[phases.finetune]
epochs = 2
lr = 0.01
"""


def train(recipe, out, *extra, wait=True):
    cmd = [sys.executable, "-m", "lrexport", "train", str(recipe), "--output", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same threads in every process: identical arithmetic
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


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
def recipe(recipe_file):
    return recipe_file(TINY)


@pytest.fixture(scope="module")
def uninterrupted(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = train(recipe, out)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "summary.json").read_text())


def test_sigkill_in_svd_phase_then_resume_matches(recipe, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = train(recipe, out, wait=False)
    wait_for_line(out / "metrics.jsonl", lambda l: l["phase"] == "svd" and l["epoch"] == 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists() or "finished" not in json.loads((out / "summary.json").read_text())
    resumed = train(recipe, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert comparable(summary) == comparable(uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_state_and_exits_cleanly(recipe, uninterrupted, tmp_path, sig):
    out = tmp_path / "run"
    proc = train(recipe, out, wait=False)
    wait_for_line(out / "metrics.jsonl", lambda l: l["phase"] == "svd", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err and len(err.strip().splitlines()) == 1
    resumed = train(recipe, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(json.loads((out / "summary.json").read_text())) == comparable(uninterrupted)


def test_sigterm_inside_an_epoch_resumes_from_that_read_and_matches(recipe, tmp_path):
    """Reads every 3 steps: SIGTERM at the svd phase's second epoch, step 6, stops at that read.
    Resumed, the run ends as an uninterrupted one that read once per epoch (the cadence
    changes no arithmetic). In-process, so that the signal lands at a chosen step."""
    from lrexport.recipe import load_recipe
    from lrexport.train import run_recipe
    from lrexport.train.checkpoint import load_checkpoint
    from lrexport.train.pipeline import Interrupted

    from lrexport.progress import Step

    def kill_at(event):
        if isinstance(event, Step) and (event.phase, event.epoch, event.step) == ("svd", 2, 6):
            os.kill(os.getpid(), signal.SIGTERM)

    whole = run_recipe(load_recipe(recipe), tmp_path / "whole").summary
    every3 = load_recipe(recipe, ["train.log_every=3"])
    with pytest.raises(Interrupted, match=r"signal 15 in the svd phase \(epoch 2, step 6\).*--resume"):
        run_recipe(every3, tmp_path / "run", kill_at)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["phase"], last["epoch"], last["epoch_state"]["step"]) == ("svd", 1, 6)
    resumed = run_recipe(every3, resume=tmp_path / "run").summary
    assert comparable(resumed) == comparable(whole)

    def svd_epoch2(run):  # its training means: the resumed half-epoch continued the saved sums
        lines = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        (line,) = [l for l in lines if (l["phase"], l["epoch"]) == ("svd", 2)]
        return {k: line[k] for k in ("loss", "ce", "ortho", "sparsity", "train_top1")}

    assert svd_epoch2("run") == svd_epoch2("whole")


def test_resume_with_a_changed_recipe_warns(recipe, tmp_path):
    out = tmp_path / "run"
    proc = train(recipe, out, wait=False)
    wait_for_line(out / "metrics.jsonl", lambda l: l["phase"] == "svd", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    resumed = train(recipe, out, "--resume", str(out), "--set", "phases.finetune.epochs=1")
    assert resumed.returncode == 0, resumed.stderr
    assert "warning: the recipe differs" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["phases"]["finetune"]["epochs"] == 1
