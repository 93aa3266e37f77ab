"""Filter pruning through Torch-Pruning (the real library): pruned models run and rebuild from data,
the channels phases train, resume after SIGKILL and reload, bad input is one line, sweeps span methods."""

from __future__ import annotations

import copy
import json
import re
import tomllib

import pytest
import tomli_w
import torch

from lrexport.channels import apply_structure, prune_channels
from lrexport.channels.prune import ChannelsError
from lrexport.errors import ModelError
from lrexport.lowrank import count_macs
from lrexport.models import create_model
from lrexport.recipe import load_recipe, read_recipe_dict
from lrexport.report import pareto_front
from lrexport.sweep import plan_sweep
from lrexport.train import run_recipe
from lrexport.train.checkpoint import load_model

from test_faults import one_error_line
from test_resume import comparable, sigkill_then_resume

# the combined method on the tiny recipe; twice the data and two recovery epochs: time to interrupt it there
COMBINED = ("method=channels+lowrank", "channels.speedup=2", "phases.recover.epochs=2", "phases.recover.lr=0.01",
            "data.train_size=512", "data.val_size=128")


@pytest.mark.parametrize("name, size", [("cifar_resnet20", 32), ("resnet18", 64)])
def test_pruned_model_runs_keeps_its_outputs_and_rebuilds_from_its_record(name, size):
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    dense_macs = count_macs(model, (3, size, size)).dense
    result = prune_channels(model, (3, size, size), speedup=2.0, round_to=4)
    assert model(x).shape == (2, 10)
    # the target, counted independently of the pruning
    assert dense_macs / count_macs(model, (3, size, size)).dense == pytest.approx(result.speedup) and result.speedup >= 2.0
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 4 == 0 for m in convs) and result.widths
    # the record is data (a checkpoint stores it with weights_only), and rebuilds the same network
    structure = json.loads(json.dumps(result.structure))
    rebuilt = apply_structure(create_model(name, num_classes=10), structure).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))


def test_a_timm_model_with_grouped_convs_and_wrapper_modules_rebuilds_from_its_record():
    # RegNetX: grouped convs whose groups shrink with their channels; timm's ConvNormAct exposes in_channels as a
    # read-only property, which the record must leave to the conv inside it
    pytest.importorskip("timm")
    model = create_model("timm/regnetx_002", num_classes=10).eval()
    result = prune_channels(model, (3, 64, 64), speedup=2.0)
    rebuilt = apply_structure(create_model("timm/regnetx_002", num_classes=10), json.loads(json.dumps(result.structure))).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(rebuilt(x), model(x)) and result.speedup >= 2.0


def test_ratio_removes_that_fraction_of_each_group():
    model = create_model("cifar_resnet20", num_classes=10)
    result = prune_channels(model, (3, 32, 32), ratio=0.5, round_to=1)
    assert (model.conv1.out_channels, model.layer3[0].conv1.out_channels, model.fc.out_features) == (8, 32, 10)
    assert result.widths["layer1.0.conv1"] == {"in": [16, 8], "out": [16, 8]}


def test_taylor_scores_channels_by_gradients():
    model = create_model("cifar_resnet20", num_classes=10)
    with pytest.raises(ChannelsError, match="needs gradients"):
        prune_channels(copy.deepcopy(model), (3, 32, 32), ratio=0.5, importance_name="taylor")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    calls = []

    def gradients(m):
        calls.append(1)
        torch.nn.functional.cross_entropy(m(x), y).backward()

    prune_channels(model, (3, 32, 32), ratio=0.5, importance_name="taylor", steps=2, round_to=1, gradients=gradients)
    assert len(calls) == 2 and model.conv1.out_channels == 8  # taken anew before each of the two rounds


def test_a_model_torch_pruning_cannot_keep_consistent_names_the_layer():
    # option A shortcuts zero-pad a fixed number of channels: a pruned residual stream no longer adds up
    model = create_model("cifar_resnet20", num_classes=10, shortcut="A")
    with pytest.raises(ModelError, match=r"after pruning, layer2\.0 \(BasicBlock\) fails"):
        prune_channels(model, (3, 32, 32), ratio=0.5)


def test_pareto_front_keeps_the_points_no_other_beats():
    points = [(2.0, 90.0), (3.0, 89.0), (2.5, 88.0), (None, 99.0), (1.5, 91.0), (3.0, 85.0)]
    assert pareto_front(points) == [1, 0, 4]


# -- the phases in a run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def combined_recipe(tiny_recipe):
    return tiny_recipe(*COMBINED)


@pytest.fixture(scope="module")
def combined_run(combined_recipe, tmp_path_factory):
    """In-process: one torch thread here as in the subprocesses (OMP_NUM_THREADS=1), the same arithmetic."""
    return run_recipe(load_recipe(combined_recipe), tmp_path_factory.mktemp("combined") / "run")


def test_combined_run_prunes_channels_then_ranks_and_reloads(combined_run):
    s = combined_run.summary
    assert list(s["phases"]) == ["dense", "channels", "recover", "decompose", "fullrank", "svd", "prune", "finetune"]
    assert s["method"] == "channels+lowrank" and s["phases"]["recover"]["epochs"] == 2
    widths = s["channels"]["layers"]
    assert widths and all(w["out"][1] <= w["out"][0] for w in widths.values())
    # MACs against the model before any channel was pruned, as the dense phase measured it
    assert s["macs"]["dense_macs"] == s["phases"]["dense"]["macs"] and s["macs_speedup"] >= s["channels"]["speedup"] >= 2
    assert s["base_top1"] == s["phases"]["dense"]["top1"]
    # the result rebuilds from data (narrowed, then decomposed at its ranks) and scores what the run measured
    model, ckpt = load_model(combined_run.run_dir / "checkpoints" / "finetune_best.pt")
    assert ckpt["arch"]["channels"] and ckpt["arch"]["decomposition"]["ranks"]
    from lrexport.data import build_datasets

    _, val, _ = build_datasets(load_recipe(combined_run.run_dir / "recipe.toml").data)
    x, y = val[:]
    with torch.no_grad():
        top1 = (model.eval()(x).argmax(1) == y).double().mean().item() * 100
    assert top1 == pytest.approx(s["best_finetune_top1"], abs=1e-6)


def test_channels_only_skips_the_low_rank_phases(tiny_recipe, tmp_path):
    s = run_recipe(load_recipe(tiny_recipe("method=channels", "channels.ratio=0.5", "phases.svd.epochs=0")), tmp_path / "run").summary
    assert list(s["phases"]) == ["dense", "channels", "recover", "finetune"]
    assert "ranks" not in s and s["macs_speedup"] == pytest.approx(s["channels"]["speedup"])
    model, ckpt = load_model(tmp_path / "run" / "checkpoints" / "finetune_best.pt")
    assert ckpt["arch"]["decomposition"] is None and model.conv1.out_channels == 8


def test_sigkill_in_the_recovery_then_resume_matches(combined_recipe, combined_run, tmp_path, cli):
    summary = sigkill_then_resume(cli, combined_recipe, tmp_path / "run", "recover")
    assert comparable(summary) == comparable(combined_run.summary)
    assert summary["channels"] == combined_run.summary["channels"]


@pytest.mark.parametrize("key, value, message", [
    ("channels.speedup", 1000, "channels.speedup = 1000 cannot be reached"),
    ("channels.importance", "hessian", "channels.importance must be one of l2, l1, group, taylor"),
    ("channels.exclude", ["nothing*"], r"channels.exclude pattern 'nothing\*' matches no conv or linear layer"),
    ("model.kwargs", {"shortcut": "A"}, r"after pruning, layer2\.0 \(BasicBlock\) fails"),
    ("channels.speedup", 0, "needs one target: channels.speedup"),
])
def test_bad_channel_settings_are_one_line_before_any_training(tiny_recipe, tmp_path, cli, key, value, message):
    raw = tomllib.loads(tiny_recipe("method=channels", "channels.speedup=2").read_text())
    table, _, name = key.rpartition(".")
    raw[table][name] = value  # written as a user would, past the validation tiny_recipe does
    recipe = tmp_path / "bad.toml"
    recipe.write_text(tomli_w.dumps(raw))
    proc = cli("train", recipe, "--output", tmp_path / "run")
    assert re.search(message, one_error_line(proc, 2))
    assert not (tmp_path / "run").exists()  # failed before the run directory was made


def test_a_target_out_of_reach_on_resume_loses_nothing(tiny_recipe, tmp_path, cli):
    """A run that finished its dense phase, resumed with a target no pruning reaches: one line, last.pt as it was."""
    recipe = tiny_recipe("method=channels", "channels.speedup=2")
    run_recipe(load_recipe(recipe), tmp_path / "run", stop_after="dense")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = cli("train", recipe, "--output", tmp_path / "run", "--resume", tmp_path / "run", "--set", "channels.speedup=1000")
    # a warning that the recipe changed since the run started, then the error
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: channels.speedup = 1000 cannot be reached")
    assert last.read_bytes() == before


def test_a_sweep_spans_methods_without_repeating_a_run(tiny_recipe):
    recipe = tiny_recipe()
    grid = {"method": ["lowrank", "channels", "channels+lowrank"], "channels.speedup": [2.0, 3.0], "prune.energy": [0.01, 0.1]}
    plan = plan_sweep(read_recipe_dict(recipe), grid, where=str(recipe))
    leaves = {r.name: r for r in plan.leaves}
    # low rank: one run per energy (no channel target); channels: one per target (no energy); both: every pair
    assert sorted(leaves) == sorted([
        "method=lowrank,prune.energy=0.01", "method=lowrank,prune.energy=0.1",
        "method=channels,channels.speedup=2.0", "method=channels,channels.speedup=3.0",
        *(f"method=channels+lowrank,channels.speedup={s},prune.energy={e}" for s in (2.0, 3.0) for e in (0.01, 0.1))])
    assert len({r.recipe.hash() for r in plan.leaves}) == 8
    assert plan.phase_runs() == {"dense": 1, "channels": 4, "recover": 4, "decompose": 3, "fullrank": 3, "svd": 3, "prune": 6,
                                 "finetune": 8}
