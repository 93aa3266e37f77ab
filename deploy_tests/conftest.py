import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # runs.py, the helpers beside the tests

from runs import TINY_RUN, UNTUNED  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _timing_cache(tmp_path_factory):
    """Layer times go to a cache of the test session's own, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def trained_run(tiny_recipe, runs_root):
    """mode -> a tiny low-rank ResNet-20 run (decompose.mode = mode) written by the training pipeline, once per session.

    The modes share the dense phase: each run branches from it, as a sweep does (the same weights as a whole run).
    """
    from lrexport.recipe import load_recipe
    from lrexport.train import run_recipe

    cache = {}

    def get(mode: str) -> Path:
        if mode not in cache:
            recipe = load_recipe(tiny_recipe(*TINY_RUN, f"decompose.mode={mode}"))
            if "dense" not in cache:
                cache["dense"] = run_recipe(recipe, runs_root / "tiny-dense", stop_after="dense").run_dir
            cache[mode] = run_recipe(recipe, runs_root / f"tiny-{mode}", start_from=cache["dense"]).run_dir
        return cache[mode]

    return get


@pytest.fixture(scope="session")
def build(trained_run):
    """mode -> (run dir, export result), each trained and exported once per session."""
    from lrexport.deploy.export import export_run

    cache = {}

    def get(mode: str):
        if mode not in cache:
            run = trained_run(mode)
            cache[mode] = (run, export_run(run, config=UNTUNED))
        return cache[mode]

    return get


@pytest.fixture(params=["channel", "spatial"])
def exported(request, build):
    """A small finetuned low-rank ResNet-20 run and its MACs-rule export, in each mode."""
    return build(request.param)


@pytest.fixture
def channel_export(build):
    return build("channel")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The quickstart recipe, shrunk to seconds but trained to ~97 % top-1: a run the real pipeline wrote."""
    from lrexport.recipe import load_recipe
    from lrexport.train import run_recipe

    overrides = [
        "data.train_size=2000", "data.val_size=500", "data.batch_size=64", "data.eval_batch_size=250",
        "phases.dense.epochs=6", "phases.svd.epochs=3", "phases.finetune.epochs=2", "prune.energy=0.01", "device=cpu",
    ]
    recipe = load_recipe(Path(__file__).parents[1] / "recipes/quickstart.toml", overrides)
    return run_recipe(recipe, tmp_path_factory.mktemp("runs") / "quickstart").run_dir
