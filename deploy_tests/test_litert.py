"""LiteRT (XNNPACK) as a deployment target, on the real converter (litert-torch) and interpreter (ai-edge-litert):
.tflite models that reproduce PyTorch, verify on the runtime, int8 through litert-torch's PT2E quantizer with the
per-layer float fallback, candidates converted together and split, `lrexport infer` without torch, and a machine
without LiteRT as one line."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lrexport.deploy.backends import RuntimeOptions
from lrexport.deploy.backends import litert as lt
from lrexport.deploy.backends.base import QuantConfig
from lrexport.deploy.backends.pt2e import Bundle
from lrexport.deploy.export import ExportConfig, export_run
from lrexport.deploy.planning.tune import DENSE, TuneCache, layer_times, make_target, tune_layers_of
from lrexport.deploy.runtime import Classifier
from lrexport.deploy.verify import VerifyConfig, verify_artifacts
from lrexport.errors import LrexportError
from lrexport.lowrank import decompose
from lrexport.lowrank.rewrite import relative_error, to_plain
from lrexport.recipe import load_recipe
from lrexport.train import run_recipe
from lrexport.train.checkpoint import load_model
from runs import IMAGE_SIZE, NO_TUNE, REPO, TINY_RUN, no_torch_env, save_val_image

ONE_THREAD = RuntimeOptions(threads=1)
QUICK = VerifyConfig(warmup=1, repeats=3)
SIZE = (3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.fixture(scope="module")
def run(tiny_recipe, tmp_path_factory):
    """A tiny low-rank ResNet-20 run of this module's own (16×16, channel mode)."""
    return run_recipe(load_recipe(tiny_recipe(*TINY_RUN)), tmp_path_factory.mktemp("runs") / "litert").run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """Its untuned fp32 export for LiteRT: models at batches 1 and 8."""
    return export_run(run, tmp_path_factory.mktemp("art") / "litert", ExportConfig(runtime="litert", tune=NO_TUNE, options=ONE_THREAD))


def test_models_reproduce_pytorch_and_verify_through_litert(exported):
    meta = exported.meta
    assert meta["runtime"] == "litert" and meta["versions"]["litert-torch"] and meta["versions"]["ai-edge-litert"]
    assert meta["litert"] == {"layout": "NHWC", "files": {m: {"1": f"{stem}_b1.tflite", "8": f"{stem}_b8.tflite"}
                                                          for m, stem in (("lowrank", "model"), ("dense", "dense"))}}
    assert all((exported.out_dir / f).is_file() for files in meta["litert"]["files"].values() for f in files.values())
    parity = {c.what: c.rel_err for c in exported.checks if "litert" in c.what}
    assert set(parity) == {"lowrank: litert vs original", "dense: litert vs original"} and max(parity.values()) < 1e-4
    # NHWC input: the converter put no transpose in front of the first conv
    ops = lt.TfliteModel(exported.out_dir / "model_b1.tflite", 1, "m").interpreter._get_ops_details()
    assert ops[0]["op_name"] != "TRANSPOSE" and "TRANSPOSE" not in {op["op_name"] for op in ops}
    checked = verify_artifacts(exported.out_dir, options=ONE_THREAD, config=QUICK)  # on the runtime it was exported for
    report = checked.report
    assert checked.passed and report["runtime"] == "litert" and report["settings"]["provider"] == "XNNPACK"
    assert report["accuracy"]["lowrank"]["top1_disagree"] == report["accuracy"]["dense"]["top1_disagree"] == 0
    assert [row["batch"] for row in report["latency"]] == [1, 8]


def test_stored_models_run_any_batch_and_name_the_ones_they_lack(exported, run):
    runner = lt.LiteRTRunner(ONE_THREAD, models=lt.BACKEND.own_files(exported.out_dir, exported.meta, "lowrank"))
    x = torch.randn(5, *SIZE)
    model, _ = load_model(run / "checkpoints/finetune_best.pt")
    with torch.no_grad():
        assert relative_error(torch.from_numpy(runner.run(x.numpy())), model.eval()(x)) < 1e-4  # batch 8's model, padded
    with pytest.raises(LrexportError, match="LiteRT models for batch 1, 8, not 4"):
        runner.bind(np.zeros((4, *SIZE), np.float32))


def test_infer_runs_the_tflite_where_torch_cannot_be_imported(exported, run, tmp_path):
    images = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for i, path in enumerate(images):
        save_val_image(run, i, path)
    classifier = Classifier(exported.out_dir, threads=1)
    assert isinstance(classifier.runner, lt.LiteRTRunner)  # the .tflite, not model.onnx
    expected = classifier.predict(images, top_k=2)
    code = ("import sys; from lrexport.deploy.runtime import infer; "
            f"preds = infer({str(exported.out_dir)!r}, {list(map(str, images))!r}, top_k=2, threads=1); "
            "assert 'torch' not in sys.modules; print([[n for n, _ in p.top] for p in preds])")
    proc = subprocess.run([sys.executable, "-c", code], env=no_torch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str([[n for n, _ in p.top] for p in expected])
    # and the same classes as PyTorch's model
    from lrexport.deploy.runtime import preprocess

    x = torch.from_numpy(np.stack([preprocess(p, exported.meta) for p in images]))
    with torch.no_grad():
        top = load_model(run / "checkpoints/finetune_best.pt")[0].eval()(x).topk(2).indices
    assert [[n for n, _ in p.top] for p in expected] == [[exported.meta["class_names"][i] for i in row] for row in top]


def test_candidates_converted_together_equal_one_by_one():
    torch.manual_seed(0)
    pair = nn.Sequential(nn.Conv2d(16, 4, 3, padding=1, bias=False), nn.Conv2d(4, 16, 1)).eval()
    # the last a copy of the pair: the converter stores their equal weights once, which must not join them
    modules = [nn.Conv2d(16, 16, 3, padding=1).eval(), pair, nn.Sequential(nn.Conv2d(8, 12, 3, stride=2), nn.ReLU()).eval(),
               copy.deepcopy(pair)]
    shapes = [(2, 16, 8, 8), (2, 16, 8, 8), (1, 8, 9, 9), (2, 16, 8, 8)]
    bundle = lt._convert(Bundle(modules).eval(), tuple(torch.zeros(*s) for s in shapes), False, "the bundle")
    assert lt.split_components(bundle, len(modules)) is not None  # split, not converted one by one after a failed split
    together = lt.convert_many(modules, shapes)
    for module, shape, model in zip(modules, shapes, together):
        x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        alone = lt.TfliteModel(lt.convert(module, shape[0], shape[1:]), 1, "alone").run(x)
        split = lt.TfliteModel(model, 1, "split").run(x)
        assert split.shape == alone.shape == tuple(module(torch.from_numpy(x)).shape)
        np.testing.assert_allclose(split, alone, rtol=0, atol=1e-6)
    # int8: quantized together, each part takes int8 and stays near its float module
    for module, shape, model in zip(modules, shapes, lt.convert_many(modules, shapes, int8=True)):
        x = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
        part = lt.TfliteModel(model, 1, "int8")
        assert part.input["dtype"] == np.int8
        with torch.no_grad():
            assert relative_error(torch.from_numpy(part.run(x)), module(torch.from_numpy(x))) < 0.05


def test_candidates_converted_by_workers_are_the_models_converted_here(monkeypatch):
    """More candidates than one bundle holds: the bundles are converted by worker processes, into the very models
    converting them here gives."""
    from lrexport.deploy.backends import open_runners
    from lrexport.deploy.backends.workers import deal
    from lrexport.deploy.planning.tune import LayerShape, layer_source

    monkeypatch.setattr(lt, "BUNDLE_SIZE", 2)
    shape = LayerShape("channel", 16, 16, 3, 3, (1, 1), (1, 1), (1, 1), (8, 8))
    sources = {c: layer_source(shape, c, 2, "litert", "int8") for c in (DENSE, 4, 8, "context-in")}
    runners = open_runners("litert", sources, RuntimeOptions(threads=1, precision="int8"))
    for chunk in deal(list(sources), 2):
        here = lt.convert_many([sources[k].torch() for k in chunk], [sources[k].input_shape for k in chunk], int8=True)
        assert [runners[k].models[2] for k in chunk] == here


def test_a_bundle_whose_graphs_join_is_not_split():
    class Joined(nn.Module):
        def forward(self, a, b):
            return a + b, b * 2

    model = lt._convert(Joined(), (torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3)), False, "joined")
    assert lt.split_components(model, 2) is None


def test_layer_times_on_litert_are_measured_then_cached(tmp_path):
    target = make_target("litert", ONE_THREAD, (1,))
    assert target.settings["runtime"] == "litert" and target.settings["threads"] == 1 and target.settings["layout"] == "NHWC"
    layer = next(t for t in tune_layers_of(decompose(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval()), (16, 8, 8)))
    timing = {"warmup": 1, "budget_ms": 20.0, "min_repeats": 3, "max_repeats": 5}
    times, timed = layer_times(layer, [DENSE, 8], target, 1, TuneCache(tmp_path / "cache.json"), **timing)
    assert timed == 2 and set(times) == {DENSE, 8} and min(times.values()) > 0
    again, timed = layer_times(layer, [DENSE, 8], target, 1, TuneCache(tmp_path / "cache.json"), **timing)
    assert timed == 0 and again == times
    assert load_recipe(REPO / "recipes/quickstart.toml", ["prune.latency=litert"]).prune.latency == "litert"


@torch.no_grad()
def test_int8_keeps_the_convs_beyond_the_error_bound_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    plain, _ = to_plain(model, (3, 8, 8))
    batches = [np.random.default_rng(i).standard_normal((8, 3, 8, 8)).astype(np.float32) for i in range(3)]
    q_all, all_int8 = lt.quantize_checked(plain, (3, 8, 8), batches, max_layer_error=1.0)
    q_none, none_int8 = lt.quantize_checked(plain, (3, 8, 8), batches, max_layer_error=0.0)
    errors = all_int8["layer_errors"]
    assert set(errors) == {"0", "2"} and all(0 < e < 0.1 for e in errors.values()) and errors == none_int8["layer_errors"]
    assert all_int8["float_layers"] == [] and none_int8["float_layers"] == ["0", "2"]
    x = batches[0]
    models = {name: lt.TfliteModel(lt.convert(q, 8, (3, 8, 8), int8=True), 1, name) for name, q in (("all", q_all), ("none", q_none))}
    # with both convs in float the model's input is float, the int8 part starting after them
    assert models["all"].input["dtype"] == np.int8 and models["none"].input["dtype"] == np.float32
    error = {name: relative_error(torch.from_numpy(m.run(x)), plain(torch.from_numpy(x))) for name, m in models.items()}
    assert 0 < error["none"] < error["all"] < 0.1


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


def test_int8_residual_add_runs_in_int8():
    # litert-torch's quantizer finds adds by their source function, which only a strict export records: without it
    # the add ran in float between DEQUANTIZE and QUANTIZE ops
    torch.manual_seed(0)
    plain, _ = to_plain(Residual().eval(), (8, 8, 8))
    batches = [np.random.default_rng(i).standard_normal((4, 8, 8, 8)).astype(np.float32) for i in range(3)]
    model = lt.TfliteModel(lt.convert(lt.quantize(plain, (8, 8, 8), batches), 4, (8, 8, 8), int8=True), 1, "residual")
    ops = [op["op_name"] for op in model.interpreter._get_ops_details()]
    assert "ADD" in ops and not {"QUANTIZE", "DEQUANTIZE"} & set(ops) and model.input["dtype"] == np.int8
    x = batches[0]
    assert relative_error(torch.from_numpy(model.run(x)), plain(torch.from_numpy(x))) < 0.05


def test_int8_export_of_the_quickstart_holds_accuracy_on_litert(quickstart_run, tmp_path):
    config = ExportConfig(runtime="litert", tune=NO_TUNE, options=RuntimeOptions(threads=1, precision="int8"),
                          quant=QuantConfig(images=256))
    result = export_run(quickstart_run, tmp_path / "art", config)
    q = result.meta["quantization"]
    assert q["runtime"] == "litert" and q["reference"] == {"dense_fp32": "dense.onnx"}
    assert set(result.meta["litert"]["files"]) == {"lowrank", "dense", "dense_fp32"}
    for m in ("lowrank", "dense"):
        evidence = result.plan.quantization[m]
        assert evidence["float_layers"] == sorted(n for n, e in evidence["layer_errors"].items() if e > 0.1)
        assert evidence["check"]["top1_agree"] > 0.9
    checked = verify_artifacts(tmp_path / "art", options=ONE_THREAD, config=QUICK)  # tolerance 0.5 points in int8
    assert checked.passed, checked.failures
    assert all("speedup_over_fp32" in row for row in checked.report["latency"])
    with pytest.raises(LrexportError, match="holds int8 models as LiteRT"):
        verify_artifacts(tmp_path / "art", runtime="ort")
    # infer feeds the int8 model int8 images, quantized with the model's own scale and zero point
    images = [tmp_path / f"{i}.png" for i in range(8)]
    for i, path in enumerate(images):
        save_val_image(quickstart_run, i, path)
    classifier = Classifier(tmp_path / "art", threads=1)
    predicted = [p.top[0][0] for p in classifier.predict(images, top_k=1)]
    assert next(iter(classifier.runner.loaded.values())).input["dtype"] == np.int8
    from lrexport.deploy.runtime import preprocess

    x = torch.from_numpy(np.stack([preprocess(p, result.meta) for p in images]))
    with torch.no_grad():
        expected = [result.meta["class_names"][i] for i in load_model(quickstart_run / "checkpoints/finetune_best.pt")[0].eval()(x).argmax(1)]
    assert sum(a == b for a, b in zip(predicted, expected)) >= 7


def test_without_litert_each_command_is_one_line(exported, run, tmp_path):
    blocker = tmp_path / "blocker"
    for package in ("ai_edge_litert", "litert_torch"):
        (blocker / package).mkdir(parents=True)
        (blocker / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]), OMP_NUM_THREADS="1")
    image = tmp_path / "a.png"
    save_val_image(run, 0, image)
    commands = {"export": ["export", str(run), "--runtime", "litert", "--output", str(tmp_path / "out")],
                "verify": ["verify", str(exported.out_dir)], "infer": ["infer", str(exported.out_dir), str(image)]}
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", "lrexport", *args], env=env, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, proc.stderr[-2000:])
        assert "is not installed" in lines[0] and 'pip install "lrexport[litert' in lines[0], name
    assert not (tmp_path / "out").exists()
    assert json.loads((exported.out_dir / "meta.json").read_text())["runtime"] == "litert"
