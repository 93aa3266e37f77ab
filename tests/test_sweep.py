"""A sweep runs each shared phase once and branches the rest (tiny synthetic runs, seconds)."""

import json
import tomllib
from collections import Counter

import pytest
import tomli_w
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.errors import LrexportError, RecipeError
from lrexport.progress import PhaseStart, RunStart
from lrexport.recipe import read_recipe_dict
from lrexport.sweep import PHASE_METHODS, PHASES, _same_recipe, first_phase, parse_grid, plan_sweep, run_sweep

# the shared tiny recipe with half its data and a full-rank phase: every phase branches or is shared
CHANGES = ("data.train_size=128", "data.batch_size=64", "phases.fullrank.epochs=1", "phases.fullrank.lr=0.05")
GRID = ["reg.decay=0.0,0.5", "prune.energy=0.01,0.3"]
DECAYS, ENERGIES = (0.0, 0.5), (0.01, 0.3)



@pytest.fixture(scope="module")
def recipe(tiny_recipe):
    return tiny_recipe(*CHANGES)


@pytest.fixture(scope="module")
def swept(recipe, tmp_path_factory):
    events = []
    out = tmp_path_factory.mktemp("sweep") / "out"
    result = run_sweep(recipe, GRID, output=out, progress=events.append)
    return result, events


def test_each_shared_phase_runs_once(swept):
    result, events = swept
    started = Counter(e.phase for e in events if isinstance(e, PhaseStart))
    assert started == {"dense": 1, "fullrank": 1, "svd": 2, "finetune": 4}
    # the run directories' own metrics say the same: one line per trained epoch, written where it ran
    trained = Counter()
    for metrics in result.output.rglob("metrics.jsonl"):
        trained.update(json.loads(line)["phase"] for line in metrics.read_text().splitlines())
    assert trained == started
    pruned = sorted(p.parent.parent.name for p in result.output.rglob("checkpoints/pruned.pt"))
    assert pruned == sorted(r.name for r in result.plan.leaves) and len(pruned) == 4
    assert result.plan.phase_runs() == {"dense": 1, "decompose": 1, "fullrank": 1, "svd": 2, "prune": 4, "finetune": 4}
    assert [e.index for e in events if isinstance(e, RunStart)] == list(range(1, 8))
    assert sorted(result.ran) == sorted(r.name for r in result.plan.runs)


def _leaf(result, decay, energy):
    return result.output / f"reg.decay={decay},prune.energy={energy}"


def test_leaves_carry_their_values(swept):
    result, _ = swept
    assert sorted(map(str, result.leaf_dirs)) == sorted(str(_leaf(result, d, e)) for d in DECAYS for e in ENERGIES)
    for d in DECAYS:
        for e in ENERGIES:
            run = _leaf(result, d, e)
            summary = json.loads((run / "summary.json").read_text())
            recipe = tomllib.loads((run / "recipe.toml").read_text())
            assert (recipe["reg"]["decay"], recipe["prune"]["energy"]) == (d, e)
            assert summary["phases"]["prune"]["energy"] == e
            assert result.summaries[run.name]["best_finetune_top1"] == summary["best_finetune_top1"]
            assert list(summary["phases"]) == [p for p in PHASES if "lowrank" in PHASE_METHODS[p]] and "finished" in summary
        # the two energies branch from one SVD-trained model
        low, high = (json.loads((_leaf(result, d, e) / "summary.json").read_text()) for e in ENERGIES)
        assert low["phases"]["svd"] == high["phases"]["svd"]
        assert sum(r["pruned"] for r in high["ranks"].values()) < sum(r["pruned"] for r in low["ranks"].values())
    spectra = {d: json.loads((_leaf(result, d, 0.01) / "spectra.json").read_text()) for d in DECAYS}
    assert spectra[0.0]["before"] == spectra[0.5]["before"] and spectra[0.0]["after"] != spectra[0.5]["after"]


def test_leaf_summaries_record_their_own_regularizer(swept):
    result, _ = swept
    for d in DECAYS:
        for e in ENERGIES:
            summary = json.loads((_leaf(result, d, e) / "summary.json").read_text())
            assert (summary["reg"]["decay"], summary["prune"]["energy"]) == (d, e)


def test_rerun_skips_finished_runs(swept, recipe):
    result, _ = swept
    cli = CliRunner().invoke(main, ["sweep", str(recipe), *[a for g in GRID for a in ("--grid", g)], "--output", str(result.output)])
    assert cli.exit_code == 0, cli.output
    assert "skipped 7 finished runs" in " ".join(cli.output.split())
    for d in DECAYS:
        assert f"reg.decay={d},prune.energy=0.3" in cli.output


def test_rerun_with_another_recipe_is_refused(swept, recipe):
    result, _ = swept
    with pytest.raises(LrexportError, match="shared/stem holds a run of a different recipe"):
        run_sweep(recipe, GRID, ["phases.finetune.lr=0.02"], output=result.output)


def test_recipe_keys_added_since_a_run_do_not_make_it_different(swept, tmp_path):
    result, _ = swept
    leaf = result.plan.leaves[0]
    stored = tomllib.loads((result.output / leaf.name / "recipe.toml").read_text())
    del stored["prune"]["tolerance"]  # as written by an lrexport that had no such key
    old = tmp_path / "recipe.toml"  # tmp_path stands for the run directory
    old.write_text(tomli_w.dumps(stored))
    assert _same_recipe(tmp_path, leaf.recipe)
    stored["prune"]["multiple_of"] = 8
    old.write_text(tomli_w.dumps(stored))
    assert not _same_recipe(tmp_path, leaf.recipe)


def test_plan_shapes():
    raw = {"model": {"name": "cifar_resnet20"}}
    only = plan_sweep(raw, {})
    assert [(r.name, r.phases, r.leaf) for r in only.runs] == [("run", PHASES, True)]
    ft = plan_sweep(raw, {"phases.finetune.lr": [0.1, 0.01]})
    assert [(r.name, r.parent, r.stop_after) for r in ft.runs] == [
        ("shared/stem", None, "prune"), ("phases.finetune.lr=0.1", 0, None), ("phases.finetune.lr=0.01", 0, None)]
    seeds = plan_sweep(raw, {"seed": [0, 1], "reg.decay": [0.1]})  # a dense key: nothing shared above it
    assert [r.parent for r in seeds.runs] == [None, 0, None, 2]
    assert [first_phase(k) for k in ("model.name", "data.image_size", "reg.ortho", "reg.type", "prune.multiple_of", "amp")] == [
        "dense", "dense", "fullrank", "svd", "prune", "dense"]


def test_sweep_plans_from_the_pipelines_phase_registry():
    """One definition: the order the pipeline runs and the keys each phase depends on are what the sweep plans with."""
    from lrexport import sweep
    from lrexport.train import phases

    assert sweep.PHASES is phases.PHASES == tuple(ph.name for ph in phases.REGISTRY)
    assert sweep.PHASE_KEYS is phases.PHASE_KEYS == {ph.name: ph.keys for ph in phases.REGISTRY}
    assert PHASES == ("dense", "channels", "recover", "decompose", "fullrank", "svd", "prune", "finetune")
    for ph in phases.REGISTRY:  # each declared key starts the sweep's branching at its own phase
        assert all(first_phase(key) == ph.name for key in ph.keys)


def test_grid_parsing():
    assert parse_grid(["reg.decay=0.001, 0.01", "reg.type=hoyer,l1", 'decompose.exclude=["conv1"],["conv1","fc"]']) == {
        "reg.decay": [0.001, 0.01], "reg.type": ["hoyer", "l1"], "decompose.exclude": [["conv1"], ["conv1", "fc"]]}


@pytest.mark.parametrize("grid, overrides, message", [
    (["reg.decay"], [], "expected key.path=value1,value2"),
    (["reg.decay=0.1", "reg.decay=0.2"], [], "given twice"),
    (["reg.decay=0.1,0.1"], [], "listed twice"),
    (["reg.decay=0.1,0.2"], ["reg.decay=0.3"], "both with --set and with --grid"),
    (["prune.energy=0.1,2"], [], "prune.energy must be < 1"),
])
def test_grid_errors_come_before_any_run(recipe, tmp_path, grid, overrides, message):
    with pytest.raises(RecipeError, match=message):
        run_sweep(recipe, grid, overrides, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sweep_plans_over_the_merged_base_chain(recipe, tmp_path):
    """The plan validates each run from the flattened recipe: ``base`` is resolved, not an unknown key."""
    child = tmp_path / "child.toml"
    child.write_text(f'base = "{recipe}"\n[reg]\ndecay = 0.5\n')
    with pytest.raises(RecipeError, match="prune.energy must be < 1"):  # the grid is judged, after the base merged
        run_sweep(child, ["prune.energy=0.1,2"], output=tmp_path / "out")
    plan = plan_sweep(read_recipe_dict(child), {"prune.energy": [0.1, 0.2]})
    assert {(r.recipe.name, r.recipe.reg.decay) for r in plan.leaves} == {("tiny", 0.5)}
