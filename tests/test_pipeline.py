"""The whole recipe pipeline end to end on tiny synthetic data (seconds)."""

import json

import pytest
import torch

from lrexport.lowrank import energy_rank
from lrexport.recipe import load_recipe
from lrexport.train import load_model, run_recipe


# the shared tiny recipe with more validation images, two epochs of dense and of SVD training, e = 0.3
CHANGES = ("data.val_size=128", "data.batch_size=64", "prune.energy=0.3", "phases.dense.epochs=2", "phases.svd.epochs=2")


@pytest.fixture(scope="module")
def recipe(tiny_recipe):
    return tiny_recipe(*CHANGES)


@pytest.fixture(scope="module")
def runs(recipe, tmp_path_factory):
    """The same seed and data with λ_s = 0 and with a strong Hoyer term."""
    root = tmp_path_factory.mktemp("runs")
    return {decay: run_recipe(load_recipe(recipe, [f"reg.decay={decay}"]), root / f"decay{decay}") for decay in (0.0, 0.5)}


def surviving(spectrum: dict[str, list[float]], e: float) -> int:
    return sum(energy_rank(torch.tensor(s), e) for s in spectrum.values())


def test_hoyer_concentrates_the_spectrum(runs):
    plain = json.loads((runs[0.0].run_dir / "spectra.json").read_text())
    hoyer = json.loads((runs[0.5].run_dir / "spectra.json").read_text())
    assert plain["before"] == hoyer["before"]  # same seed, same starting point
    e = 0.05
    assert surviving(hoyer["after"], e) < surviving(plain["after"], e)
    assert runs[0.5].summary["ranks"] != runs[0.0].summary["ranks"]


def test_summary_has_every_field(runs):
    s = runs[0.5].summary
    assert list(s["phases"]) == ["dense", "decompose", "fullrank", "svd", "prune", "finetune"]
    assert s["phases"]["fullrank"] == {"epochs": 0, "macs": s["macs"]["dense_macs"]}  # skipped, and recorded as such
    for phase in ("dense", "decompose", "svd", "prune", "finetune"):
        assert 0 <= s["phases"][phase]["top1"] <= 100
    # exact SVD: decomposing does not change accuracy
    assert s["phases"]["decompose"]["top1"] == pytest.approx(s["phases"]["dense"]["top1"])
    assert s["best_finetune_top1"] == s["phases"]["finetune"]["best_top1"] >= s["phases"]["finetune"]["top1"]
    assert s["macs"]["dense_macs"] > s["macs"]["macs"] and s["macs_speedup"] == pytest.approx(s["macs"]["dense_macs"] / s["macs"]["macs"])
    assert s["accuracy_gain"] == pytest.approx(s["best_finetune_top1"] - s["base_top1"])
    on_disk = json.loads((runs[0.5].run_dir / "summary.json").read_text())
    assert on_disk["best_finetune_top1"] == s["best_finetune_top1"]
    lines = [json.loads(l) for l in (runs[0.5].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(l["phase"], l["epoch"]) for l in lines] == [("dense", 1), ("dense", 2), ("svd", 1), ("svd", 2), ("finetune", 1)]
    assert all(l["images_per_s"] > 0 and "sparsity" in l for l in lines)
    assert (runs[0.5].run_dir / "recipe.toml").read_text().count("decay = 0.5") == 1


def test_pruning_reduces_ranks_and_macs_as_recorded(runs):
    s = runs[0.5].summary
    pruned, ckpt = load_model(runs[0.5].run_dir / "checkpoints" / "pruned.pt")
    ranks = ckpt["arch"]["decomposition"]["ranks"]
    assert {k: v["pruned"] for k, v in s["ranks"].items()} == ranks
    assert all(v["pruned"] <= v["full"] for v in s["ranks"].values())
    assert sum(v["pruned"] for v in s["ranks"].values()) < sum(v["full"] for v in s["ranks"].values())
    assert s["phases"]["prune"]["macs"] == s["macs"]["macs"] < s["macs"]["dense_macs"]


def test_each_phase_records_its_macs_in_summary_json(runs):
    """The MACs of the model each phase leaves, as deployed: full rank costs what dense does; pruning cuts them."""
    on_disk = json.loads((runs[0.5].run_dir / "summary.json").read_text())
    macs = {phase: result["macs"] for phase, result in on_disk["phases"].items()}
    dense, pruned = on_disk["macs"]["dense_macs"], on_disk["macs"]["macs"]
    assert macs == {"dense": dense, "decompose": dense, "fullrank": dense, "svd": dense, "prune": pruned, "finetune": pruned}
    assert pruned < dense


def test_finetuning_leaves_ranks_unchanged(runs):
    d = runs[0.5].run_dir / "checkpoints"
    _, pruned = load_model(d / "pruned.pt")
    model, final = load_model(d / "finetune.pt")
    _, best = load_model(d / "finetune_best.pt")
    assert pruned["arch"]["decomposition"]["ranks"] == final["arch"]["decomposition"]["ranks"] == best["arch"]["decomposition"]["ranks"]
    assert not torch.equal(model.layer1[0].conv1.s, load_model(d / "pruned.pt")[0].layer1[0].conv1.s)  # it did train


def test_dense_checkpoint_is_the_starting_model(runs):
    model, ckpt = load_model(runs[0.5].run_dir / "checkpoints" / "dense.pt")
    assert ckpt["arch"]["decomposition"] is None and type(model.conv1) is torch.nn.Conv2d


def test_auto_energy_picks_largest_threshold_within_tolerance(recipe, tmp_path):
    auto = ["reg.decay=0.5", 'prune.energy="auto"', "prune.ladder=[1e-4, 1e-2, 0.1, 0.5, 0.9]", "prune.tolerance=2.0"]
    s = run_recipe(load_recipe(recipe, auto), tmp_path / "auto").summary
    search = s["energy_search"]
    assert [step["energy"] for step in search["ladder"]] == [1e-4, 1e-2, 0.1, 0.5, 0.9]
    assert search["base_top1"] == s["phases"]["svd"]["top1"]
    passing = [step["energy"] for step in search["ladder"] if search["base_top1"] - step["top1"] <= 2.0]
    assert search["energy"] == s["phases"]["prune"]["energy"] == max(passing)
    chosen = next(step for step in search["ladder"] if step["energy"] == search["energy"])
    assert chosen["top1"] == s["phases"]["prune"]["top1"] and chosen["ranks"] == {k: v["pruned"] for k, v in s["ranks"].items()}
