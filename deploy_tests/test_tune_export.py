"""export --tune: per-layer choices in meta.json, the ONNX as planned, the cache reused, verify's prediction.

Timings are real (onnxruntime on tiny 16×16 layers) but never asserted.
"""

import json

import onnx
import pytest
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.export import ExportConfig, export_run
from lrexport.deploy.planning.plan import TuneConfig
from lrexport.deploy.backends import RuntimeOptions
from lrexport.deploy.timing import Timed
from lrexport.deploy.onnx_graph import conv_weight_shapes
from lrexport.deploy.verify import VerifyConfig, verify_artifacts

from runs import expected_conv_shapes


def tuned_config(cache, guard=False, **kw) -> ExportConfig:
    tune = TuneConfig(batches=kw.pop("batches", (2,)), cache=cache, guard=guard, guard_budget_ms=50)
    return ExportConfig(check_images=16, options=RuntimeOptions(threads=1), tune=tune, **kw)


@pytest.fixture(scope="module")
def tuned(build, tmp_path_factory):
    run, _ = build("channel")
    out = tmp_path_factory.mktemp("tuned")
    # no whole-model guard here, so that the export follows the per-layer choices (tested below)
    return run, export_run(run, out / "art", tuned_config(out / "cache.json"))


def test_tuned_export_records_each_choice_and_follows_it(tuned):
    run, result = tuned
    meta = json.loads((result.out_dir / "meta.json").read_text())
    plan = json.loads((result.out_dir / "plan.json").read_text())
    assert meta == result.meta and plan == json.loads(json.dumps(result.plan.to_dict()))
    tune = plan["tune"]
    assert plan["deployed"] == "tuned" and plan["guard"] == [] and meta["plan"]["deployed"] == "tuned"
    assert tune["target"]["runtime"] == "ort" and tune["target"]["batches"] == [2] and tune["target"]["threads"] == 1
    layers = meta["models"]["lowrank"]["layers"]
    by_name = {layer["name"]: layer for layer in layers}
    assert [c["name"] for c in tune["layers"]] == [layer["name"] for layer in layers]  # all convs (no SVD linear here)
    for c in tune["layers"]:
        layer = by_name[c["name"]]
        assert c["reason"] and c["ms"] == min(c["times_ms"].values()) or c["choice"] == c["default"]
        assert c["ms"] == c["times_ms"][str(c["choice"])] == c["batch_ms"]["2"][str(c["choice"])]
        if c["choice"] == "dense":
            assert layer["dense"]
        else:
            assert layer["deployed_rank"] == c["choice"] >= layer["rank"]
        assert plan["layers"][c["name"]] == meta["export"]["plan"][c["name"]] == c["choice"]
    [pred] = tune["predicted"]
    assert pred["batch"] == 2 and pred["tuned_ms"] == pytest.approx(sum(c["ms"] for c in tune["layers"]))
    # the exported graph holds the planned convs, and the export's checks passed on it
    proto = onnx.load(str(result.out_dir / "model.onnx"))
    assert sorted(conv_weight_shapes(proto)) == expected_conv_shapes(run, layers, "channel")
    assert all(c.rel_err < 1e-4 for c in result.checks)


def test_second_export_reuses_the_cache(tuned, tmp_path):
    run, first = tuned
    cache = first.out_dir.parent / "cache.json"
    assert cache.is_file()
    again = export_run(run, tmp_path / "again", tuned_config(cache))
    t, t0 = again.plan.tune, first.plan.tune
    assert t["cache_misses"] == 0 and t["cache_hits"] == t0["cache_hits"] + t0["cache_misses"]
    assert again.plan.layers == first.plan.layers
    # another batch is another deployment: timed afresh
    other = export_run(run, tmp_path / "b4", tuned_config(cache, batch=4, batches=None))
    assert other.plan.tune["target"]["batches"] == [4] and other.plan.tune["cache_misses"] > 0




@pytest.mark.parametrize("times, deployed", [
    ({"tuned": 1.0, "untuned": 3.0, "dense": 2.0}, "tuned"),
    ({"tuned": 3.0, "untuned": 1.0, "dense": 2.0}, "untuned"),
    ({"tuned": 3.0, "untuned": 2.5, "dense": 2.0}, "dense"),
])
def test_whole_model_guard_deploys_the_fastest_and_never_slower_than_dense(tuned, tmp_path, monkeypatch, times, deployed):
    from lrexport.deploy.planning import plan as P
    from lrexport.deploy.planning import tune as T

    run, first = tuned
    real_choose = T.choose

    def largest_pair(times_, layer, margin=0.02, below=False):
        """Every layer deploys its largest candidate pair: a plan unlike both the untuned and the all-dense one."""
        pairs = [k for k in times_ if k != "dense"]
        return real_choose({max(pairs, key=int): 1.0} if pairs else times_, layer, margin)

    monkeypatch.setattr(T, "choose", largest_pair)
    monkeypatch.setattr(P, "interleave_within", lambda calls, *a, **k: Timed({n: [times[n]] * 5 for n in calls}, "wall", 0))
    res = export_run(run, tmp_path / "guard", tuned_config(first.out_dir.parent / "cache.json", guard=True, batches=(1, 2)))
    plan = res.plan
    assert plan.deployed == deployed and [row["batch"] for row in plan.guard] == [1, 2]
    for row in plan.guard:
        assert row["dense"]["speedup_over_dense"] == 1.0
        assert row["tuned"]["speedup_over_dense"] == pytest.approx(times["dense"] / times["tuned"])
    layers = res.meta["models"]["lowrank"]["layers"]
    if deployed == "dense":
        assert all(layer["dense"] for layer in layers) and "deployed dense" in plan.note
    elif deployed == "untuned":
        untuned = export_run(run, tmp_path / "plain", ExportConfig(check_images=16, tune=TuneConfig(enabled=False)))
        assert layers == untuned.meta["models"]["lowrank"]["layers"] and plan.layers is None
    else:
        assert plan.layers == {c["name"]: c["choice"] for c in plan.tune["layers"]}


def test_verify_prints_predicted_beside_measured(tuned):
    _, result = tuned
    config = VerifyConfig(batch_sizes=(1, 2), warmup=1, repeats=3)
    res = verify_artifacts(result.out_dir, "ort", RuntimeOptions(threads=1), config)
    [p] = res.report["predicted"]
    measured = res.report["latency"][1]
    assert p["batch"] == measured["batch"] == 2 and p["measured_lowrank_ms"] == measured["lowrank"]["median_ms"]
    assert p["lowrank_ms"] == result.plan.tune["predicted"][0]["tuned_ms"]
    r = CliRunner().invoke(main, ["verify", str(result.out_dir), "--threads", "1", "--warmup", "1", "--repeats", "3",
                                  "--batch-sizes", "2"])
    assert r.exit_code == 0, r.output
    assert "predicted" in r.output and "measured" in r.output


def test_untuned_export_has_no_prediction(channel_export):
    _, result = channel_export
    assert result.plan.tune is None and result.meta["export"]["plan"] is None and result.plan.deployed == "untuned"


@pytest.mark.parametrize("runtime", ["ort", "openvino", "torch"])
def test_cli_export_for_a_runtime_then_verify_on_it(tuned, tmp_path, runtime):
    """What a user types: tuned by default, for the runtime named, then verified on it."""
    run, first = tuned
    art = tmp_path / "cli"
    r = CliRunner().invoke(main, ["export", str(run), "--output", str(art), "--runtime", runtime, "--threads", "1",
                                  "--tune-batches", "2", "--tune-cache", str(tmp_path / "cache.json"), "--check-images", "8"])
    assert r.exit_code == 0, r.output
    assert "tuned layer1.0.conv1" in r.output and f"plan for {runtime}" in r.output
    plan = json.loads((art / "plan.json").read_text())
    assert plan["runtime"] == runtime and plan["target"]["runtime"] == runtime and len(plan["guard"]) == 1
    assert f"({plan['target']['device']}, 1 threads, batches [2])" in r.output  # the plan says which CPU it is for
    v = CliRunner().invoke(main, ["verify", str(art), "--threads", "1", "--warmup", "1", "--repeats", "5", "--batch-sizes", "2"])
    assert v.exit_code == 0, v.output
    report = json.loads((art / "verify.json").read_text())
    assert report["runtime"] == runtime and report["passed"] and f"latency on {runtime}" in v.output
    assert all(report["accuracy"][m]["top1_disagree"] == 0 for m in ("lowrank", "dense"))


def test_cli_export_errors(tuned, tmp_path):
    run, _ = tuned
    bad = CliRunner().invoke(main, ["export", str(run), "--output", str(tmp_path / "bad"), "--batch", "2", "--tune-batches", "3"])
    assert bad.exit_code == 1 and "differ from the fixed export batch" in bad.output
    unknown = CliRunner().invoke(main, ["export", str(run), "--output", str(tmp_path / "x"), "--runtime", "tflite"])
    assert unknown.exit_code == 2 and "unknown runtime 'tflite'" in unknown.output and not (tmp_path / "x").exists()
    # --runtime names the target once (issue 31): an option the runtime does not take is refused, not ignored
    for args in (["--channels-last"], ["--precision", "int8", "--runtime", "torch"], ["--tune-images", "5", "--runtime", "trt"],
                 ["--max-layer-error", "0.2"]):
        refused = CliRunner().invoke(main, ["export", str(run), "--output", str(tmp_path / "refused"), *args])
        assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, (args, refused.output)
        assert not (tmp_path / "refused").exists()


def test_a_plan_of_dense_layers_is_deployed_dense_without_timing_it_twice(tuned, tmp_path, monkeypatch):
    from lrexport.deploy.planning import plan as P
    from lrexport.deploy.planning import tune as T

    run, first = tuned
    real_choose = T.choose
    monkeypatch.setattr(T, "choose", lambda times_, layer, margin=0.02, below=False: real_choose({"dense": times_["dense"]}, layer))
    calls = []
    monkeypatch.setattr(P, "interleave_within", lambda calls_, *a, **k: calls.append(set(calls_)) or Timed(
        {n: [1.0 if n == "dense" else 2.0] * 3 for n in calls_}, "wall", 0))
    res = export_run(run, tmp_path / "dense", tuned_config(first.out_dir.parent / "cache.json", guard=True))
    # the tuned plan is the all-dense model: only the untuned one is timed against it
    assert calls == [{"dense", "untuned"}] and res.plan.deployed == "dense"
    assert all(layer["dense"] for layer in res.meta["models"]["lowrank"]["layers"])
