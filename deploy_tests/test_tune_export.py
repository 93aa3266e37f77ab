"""export --tune: per-layer choices in meta.json, the ONNX as planned, the cache reused, verify's prediction.

Timings are real (onnxruntime on tiny 16×16 layers) but never asserted.
"""

import json

import onnx
import pytest
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.export import export_run
from lrexport.deploy.onnx_graph import conv_weight_shapes
from lrexport.deploy.verify import verify_artifacts

from test_export import expected_conv_shapes


@pytest.fixture(scope="module")
def tuned(build, tmp_path_factory):
    run, _ = build("channel")
    out = tmp_path_factory.mktemp("tuned")
    # no whole-model guard here, so that the export follows the per-layer choices (tested below)
    return run, export_run(run, out, tune=True, tune_batch=2, tune_threads=1, check_images=16, tune_guard=False)


def test_tuned_export_records_each_choice_and_follows_it(tuned):
    run, result = tuned
    meta = json.loads((result.out_dir / "meta.json").read_text())
    assert meta == result.meta
    tune = meta["tune"]
    assert tune["deployed"] == "tuned" and tune["end_to_end"] is None
    assert tune["target"]["runtime"] == "ort" and tune["target"]["batch"] == 2 and tune["target"]["threads"] == 1
    layers = meta["models"]["lowrank"]["layers"]
    by_name = {layer["name"]: layer for layer in layers}
    assert [c["name"] for c in tune["layers"]] == [layer["name"] for layer in layers]  # all convs (no SVD linear here)
    for c in tune["layers"]:
        layer = by_name[c["name"]]
        assert c["reason"] and c["ms"] == min(c["times_ms"].values()) or c["choice"] == c["default"]
        assert c["ms"] == c["times_ms"][str(c["choice"])]
        if c["choice"] == "dense":
            assert layer["dense"]
        else:
            assert layer["deployed_rank"] == c["choice"] >= layer["rank"]
        assert meta["export"]["plan"][c["name"]] == c["choice"]
    pred = tune["predicted"]
    assert pred["lowrank_ms"] == pytest.approx(sum(c["ms"] for c in tune["layers"]))
    # the exported graph holds the planned convs, and the export's checks passed on it
    proto = onnx.load(str(result.out_dir / "model.onnx"))
    assert sorted(conv_weight_shapes(proto)) == expected_conv_shapes(run, layers, "channel")
    assert all(c.rel_err < 1e-4 for c in result.checks)


def test_second_export_reuses_the_cache(tuned, tmp_path):
    run, first = tuned
    cache = first.out_dir / "tune_cache.json"
    assert cache.is_file()
    again = export_run(run, tmp_path / "again", tune=True, tune_batch=2, tune_threads=1, check_images=16, tune_cache=cache)
    t = again.meta["tune"]
    assert t["cache_misses"] == 0 and t["cache_hits"] == first.meta["tune"]["cache_hits"] + first.meta["tune"]["cache_misses"]
    assert again.meta["export"]["plan"] == first.meta["export"]["plan"]
    # another batch is another deployment: timed afresh
    other = export_run(run, tmp_path / "b4", batch=4, tune=True, tune_threads=1, check_images=16, tune_cache=cache)
    assert other.meta["tune"]["target"]["batch"] == 4 and other.meta["tune"]["cache_misses"] > 0


def test_whole_model_guard_keeps_the_untuned_model_when_it_is_faster(tuned, tmp_path, monkeypatch):
    from dataclasses import replace

    from lrexport.deploy import tune as T

    run, first = tuned
    real_choose = T.choose
    # every layer "chooses" dense, so the plan surely differs from the default one
    monkeypatch.setattr(T, "choose", lambda times, layer, margin=0.02, below=False: replace(
        real_choose(times, layer, margin), choice="dense", ms=times["dense"]))
    monkeypatch.setattr(T, "end_to_end", lambda *a, **k: T.EndToEnd(2.0, 1.0, 2.0, 1.0, 0.5, 3))
    res = export_run(run, tmp_path / "guard", tune=True, tune_batch=2, tune_threads=1, check_images=16,
                     tune_cache=first.out_dir / "tune_cache.json")
    t = res.meta["tune"]
    assert t["deployed"] == "untuned" and t["end_to_end"]["speedup"] == 0.5 and res.meta["export"]["plan"] is None
    assert all(c["choice"] == "dense" for c in t["layers"])
    assert t["predicted"]["lowrank_ms"] == t["predicted"]["untuned_ms"]
    untuned = export_run(run, tmp_path / "plain", check_images=16)
    assert res.meta["models"]["lowrank"]["layers"] == untuned.meta["models"]["lowrank"]["layers"]
    # a faster whole model is deployed as tuned
    monkeypatch.setattr(T, "end_to_end", lambda *a, **k: T.EndToEnd(1.0, 2.0, 1.0, 2.0, 2.0, 3))
    res = export_run(run, tmp_path / "guard2", tune=True, tune_batch=2, tune_threads=1, check_images=16,
                     tune_cache=first.out_dir / "tune_cache.json")
    assert res.meta["tune"]["deployed"] == "tuned"
    assert all(layer["dense"] for layer in res.meta["models"]["lowrank"]["layers"])


def test_verify_prints_predicted_beside_measured(tuned):
    _, result = tuned
    res = verify_artifacts(result.out_dir, runtime="ort", threads=1, batch_sizes=(1,), warmup=1, repeats=3)
    p = res.report["predicted"]
    assert [row["batch"] for row in res.report["latency"]] == [1, 2]  # the tuned batch is timed too
    measured = res.report["latency"][1]
    assert p["batch"] == 2 and p["measured_lowrank_ms"] == measured["lowrank"]["median_ms"]
    assert p["lowrank_ratio"] == pytest.approx(p["lowrank_ms"] / p["measured_lowrank_ms"])
    r = CliRunner().invoke(main, ["verify", str(result.out_dir), "--threads", "1", "--warmup", "1", "--repeats", "3",
                                  "--batch-sizes", "2"])
    assert r.exit_code == 0, r.output
    assert "predicted" in r.output and "measured" in r.output


def test_untuned_verify_has_no_prediction(channel_export):
    _, result = channel_export
    assert "tune" not in result.meta and result.meta["export"]["plan"] is None


def test_cli_export_tune(tuned, tmp_path):
    run, first = tuned
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "cli"), "--tune", "--tune-batch", "2",
                                  "--tune-threads", "1", "--tune-cache", str(first.out_dir / "tune_cache.json"),
                                  "--check-images", "8"])
    assert r.exit_code == 0, r.output
    assert "tuned layer1.0.conv1" in r.output and "0 timed" in r.output
    bad = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "bad"), "--batch", "2", "--tune", "--tune-batch", "3"])
    assert bad.exit_code == 1 and "differs from the fixed export batch" in bad.output
    trt = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "trt"), "--format", "trt", "--tune"])
    assert trt.exit_code == 2 and "onnxruntime only" in trt.output and not (tmp_path / "trt").exists()
