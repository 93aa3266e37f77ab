"""What tests/ and deploy_tests/ share: one tiny recipe, and `lrexport` run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models on a 2-core machine: a second intra-op thread only adds contention (under load it
# made tiny runs many times slower), and in-process runs compare exactly with the subprocesses
# below only at the same thread count. The subprocesses get one thread through CLI_ENV.
torch.set_num_threads(1)

# CIFAR ResNet-20 on 8×8 synthetic images: a whole run (dense, SVD training, pruning,
# finetuning) in a few seconds on one core. Tests change what they need with `key.path=value`.
TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {"name": "cifar_resnet20"},
    "data": {"dataset": "synthetic", "image_size": 8, "train_size": 256, "val_size": 64, "batch_size": 32},
    "reg": {"type": "hoyer", "decay": 0.3},
    "prune": {"energy": 0.01},
    "phases": {
        "dense": {"epochs": 1, "lr": 0.05},
        "svd": {"epochs": 1, "lr": 0.05},
        "finetune": {"epochs": 1, "lr": 0.01},
    },
}

# one thread in every process the tests start, as in this one
CLI_ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80")


# Under pytest-xdist (--dist loadgroup, in pyproject.toml) each worker builds its own copy of a
# fixture, so tests run grouped, a group on one worker: those that use a session fixture that
# trains (shared across modules) by that fixture, the GPU tests together (they time the one GPU),
# every other test with its module (module fixtures train runs, too).
SHARED_RUNS = ("quickstart_run", "trained_run")
GPU_TESTS = Path(__file__).parent / "deploy_tests" / "gpu"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        group = next((name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())), None)
        if GPU_TESTS in Path(item.path).parents:
            group = "gpu"
        item.add_marker(pytest.mark.xdist_group(group or item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    """``tiny_recipe(*changes)``: the tiny recipe with ``key.path=value`` changes, as a recipe file."""
    from lrexport.recipe import recipe_from_dict

    def write(*changes: str) -> Path:
        path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
        path.write_text(recipe_from_dict(TINY, overrides=changes).to_toml())
        return path

    return write


@pytest.fixture(scope="session")
def cli():
    """``cli(*args)``: `python -m lrexport ARGS` in a subprocess, finished (or started, ``wait=False``)."""

    def run(*args, wait: bool = True, env: dict | None = None, **kwargs):
        cmd = [sys.executable, "-m", "lrexport", *map(str, args)]
        env = CLI_ENV | (env or {})
        if wait:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kwargs)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, **kwargs)

    return run
