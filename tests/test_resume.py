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
