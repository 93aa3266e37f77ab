"""export --tune below the energy rank: proposed where faster, kept only where validation accuracy confirms it.

The accuracy checks are real (the run's model on its validation images); the latency table
is given, so that the proposals do not depend on this machine's timings.
"""

import json
import shutil

import pytest

from lrexport.deploy.planning import tune as T
from lrexport.deploy.planning.below import confirm_below, top1
from lrexport.deploy.export import ExportConfig, export_run
from lrexport.deploy.planning.plan import TuneConfig
from lrexport.deploy.backends import RuntimeOptions
from lrexport.rundir import open_run
from lrexport.deploy.verify import VerifyConfig, verify_artifacts
from lrexport.lowrank import count_macs, layer_ranks, truncated


def run_model_and_val(build):
    run, _ = build("channel")
    r = open_run(run)
    return run, r.load_models()[0], r.validation_set()


def test_confirm_below_keeps_only_what_holds_accuracy(build):
    _, model, val = run_model_and_val(build)
    proposed = {name: 1 for name, r in layer_ranks(model).items() if r > 1}  # rank 1 everywhere: far too deep
    lenient = confirm_below(model, proposed, val, tolerance=100.0)
    assert lenient.kept == proposed and lenient.reverted == [] and lenient.evaluations == 2
    reference = top1(model, val)
    strict = confirm_below(model, proposed, val, tolerance=0.0)
    assert strict.reverted, "rank 1 in every layer should cost accuracy"
    assert set(strict.kept) | set(strict.reverted) == set(proposed) and not set(strict.kept) & set(strict.reverted)
    # what is kept was evaluated and holds the reference accuracy
    assert strict.reference_top1 == reference
    assert strict.top1 == top1(truncated(model, strict.kept), val) >= reference
    # withdrawn first: the layers whose truncation drops the most energy
    d = strict.energy_dropped
    if strict.kept:
        assert min(d[n] for n in strict.reverted) >= max(d[n] for n in strict.kept)


def fake_time_candidates(shape, candidates, target, batch, **kw):
    """A given latency table: a pair costs its rank in ms, dense 1000 ms, each stand-in 1 ms."""
    per_context = 0.5 * len(T.contexts(shape))  # tune() takes half of each stand-in off every candidate
    ms = {c: 1.0 if c in (T.CONTEXT_IN, T.CONTEXT_OUT) else (1000.0 if c == T.DENSE else float(c)) + per_context
          for c in candidates}
    return {c: T.Stats.from_ms(batch, [ms[c]]) for c in candidates}


@pytest.fixture(scope="module", params=["strict", "lenient"])
def below_export(build, tmp_path_factory, request):
    """Exports with a given latency table: "strict" asks for it on the command line and keeps the
    default tolerance (1 point); "lenient" is a run whose recipe allows it with a tolerance of 100."""
    run, model, _ = run_model_and_val(build)
    below = True
    if request.param == "lenient":
        run = shutil.copytree(run, tmp_path_factory.mktemp("lenient") / "run")
        summary = json.loads((run / "summary.json").read_text())
        summary["prune"] = {"tune_below": True, "tolerance": 100.0}
        (run / "summary.json").write_text(json.dumps(summary))
        below = None  # from the run's recipe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "time_candidates", fake_time_candidates)
        tune = TuneConfig(batches=(2,), guard=False, below=below, below_images=64)
        result = export_run(run, tmp_path_factory.mktemp("below"), ExportConfig(check_images=16, options=RuntimeOptions(threads=1), tune=tune))
    return request.param, model, result


def test_export_keeps_confirmed_ranks_below_and_reverts_the_rest(below_export):
    kind, model, result = below_export
    meta, trained, tune = result.meta, layer_ranks(model), result.plan.tune
    check = tune["below_check"]
    # with this table the lowest rank wins wherever one below the energy rank is a candidate
    proposed = {c["name"] for c in tune["layers"] if c["fallback"] is not None or "reverted" in c["reason"]}
    assert proposed and set(check["kept"]) | set(check["reverted"]) == proposed
    if kind == "lenient":  # no truncation can cost more than 100 points: every proposal is kept
        assert check["reverted"] == [] and set(check["kept"]) == proposed
    assert meta["export"]["truncated"] == result.plan.truncated == check["kept"]
    for c in tune["layers"]:
        if c["name"] in check["kept"]:
            assert c["choice"] == check["kept"][c["name"]] < trained[c["name"]] and "accuracy" in c["reason"]
        else:
            assert c["choice"] == "dense" or c["choice"] >= trained[c["name"]]
        if c["name"] in check["reverted"]:
            assert "reverted: validation accuracy fell too far" in c["reason"]
    assert check["top1"] >= check["reference_top1"] - check["tolerance"]
    # MACs and the export's own checks are those of the model as deployed (truncated)
    size = tuple(meta["input"]["shape"][1:])
    assert meta["models"]["lowrank"]["macs"] == count_macs(truncated(model, check["kept"]), size).deployed
    if check["kept"]:
        assert meta["models"]["lowrank"]["macs"] < count_macs(model, size).deployed
    assert all(c.rel_err < 1e-4 for c in result.checks)


@pytest.mark.parametrize("runtime", ["ort", "torch"])
def test_verify_compares_the_runtime_with_the_truncated_model(below_export, runtime):
    _, _, result = below_export
    check = result.plan.tune["below_check"]
    config = VerifyConfig(batch_sizes=(1,), warmup=1, repeats=2)
    res = verify_artifacts(result.out_dir, runtime, RuntimeOptions(threads=1), config)
    assert res.passed, res.failures
    acc = res.report["accuracy"]
    assert acc["lowrank"]["top1_disagree"] == 0
    assert acc["lowrank"]["torch_top1"] == pytest.approx(check["top1"])  # the same 64 validation images


def test_cli_export_tune_below(build, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lrexport.cli import main

    run, _ = build("channel")
    monkeypatch.setattr(T, "time_candidates", fake_time_candidates)
    r = CliRunner().invoke(main, ["export", str(run), "--output", str(tmp_path / "cli"), "--tune-below", "--tune-images", "32",
                                  "--tune-batches", "2", "--threads", "1", "--check-images", "8"])
    assert r.exit_code == 0, r.output
    assert "below the energy rank:" in r.output and "32 validation images" in r.output
    assert "accuracy check of" in r.output and "as trained: top-1" in r.output  # each pass over the images is shown
    plan = json.loads((tmp_path / "cli" / "plan.json").read_text())
    assert plan["tune"]["below_check"]["images"] == 32
