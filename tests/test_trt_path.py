"""The TensorRT path up to its first TensorRT call, the calibration reader, and the providers helper.

None of this needs TensorRT or a GPU; the tests that show the "missing" errors skip where
TensorRT is installed (there the GPU tests in deploy_tests/gpu cover the real build).
"""

import functools
import importlib.util
import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrexport.deploy.backends import ort as providers
from lrexport.deploy.calibration import CalibrationError, CalibrationReader
from lrexport.deploy.timing import Stats, interleave, interleave_within, quantile
from lrexport.deploy.backends.trt import (
    CALIBRATION_CACHE_FILE, TIMING_CACHE_FILE, TrtRunner, build_engine, onnx_input, plan_build, profile_shapes,
)
from lrexport.errors import LrexportError, RuntimeMissingError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the GPU tests cover the real build")


def tiny_onnx(path, batch="batch", shape=(3, 8, 8)):
    """A one-conv ONNX model; its weight is also listed as a graph input, as old exporters did."""
    c, h, w = shape
    weight = numpy_helper.from_array(np.ones((4, c, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, c, h, w]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, c, 3, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4, h, w])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# -- pure parts --------------------------------------------------------------------------------
def test_profile_shapes_dynamic_batch():
    assert profile_shapes((32, 1), (None, 3, 224, 224)) == ((1, 3, 224, 224), (32, 3, 224, 224), (32, 3, 224, 224))
    assert profile_shapes((1, 8, 64), (None, 3, 32, 32), opt_batch=8)[1] == (8, 3, 32, 32)
    assert profile_shapes([4], (None, 3, 32, 32)) == ((4, 3, 32, 32),) * 3


def test_profile_shapes_fixed_batch():
    assert profile_shapes((1,), (1, 3, 32, 32)) == ((1, 3, 32, 32),) * 3
    with pytest.raises(LrexportError, match="fixed batch of 1"):
        profile_shapes((1, 32), (1, 3, 32, 32))


@pytest.mark.parametrize("sizes", [(), (0,), (1, -2), ("8",), (True,), (1.5,)])
def test_profile_shapes_rejects_bad_batch_sizes(sizes):
    with pytest.raises(LrexportError, match="batch sizes"):
        profile_shapes(sizes, (None, 3, 32, 32))


def test_profile_shapes_rejects_dynamic_image_and_bad_opt():
    with pytest.raises(LrexportError, match="fixed C, H, W"):
        profile_shapes((1,), (None, 3, None, 32))
    with pytest.raises(LrexportError, match="outside"):
        profile_shapes((1, 8), (None, 3, 32, 32), opt_batch=16)


def test_onnx_input_reads_name_and_shape(tmp_path):
    assert onnx_input(tiny_onnx(tmp_path / "m.onnx")) == ("input", (None, 3, 8, 8))
    assert onnx_input(tiny_onnx(tmp_path / "f.onnx", batch=2)) == ("input", (2, 3, 8, 8))


def test_onnx_input_errors(tmp_path):
    with pytest.raises(LrexportError, match="not found"):
        onnx_input(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(LrexportError, match="not an ONNX model"):
        onnx_input(tmp_path / "junk.onnx")


def test_plan_build_paths_and_shapes(tmp_path):
    plan = plan_build(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art", "fp16", (1, 32), workspace_gb=0.5)
    assert plan.engine_path == tmp_path / "art" / "model.engine"
    assert plan.timing_cache_path == tmp_path / "art" / TIMING_CACHE_FILE
    assert plan.info_path.name == "model.engine.json"
    assert plan.profile == ((1, 3, 8, 8), (32, 3, 8, 8), (32, 3, 8, 8))
    assert plan.workspace_bytes == 1 << 29 and plan.input_name == "input" and plan.calibration is None
    named = plan_build(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art", engine_name="lowrank.engine")
    assert named.engine_path.name == "lowrank.engine" and named.timing_cache_path == plan.timing_cache_path


@pytest.mark.parametrize(
    "kwargs,match",
    [({"precision": "bf16"}, "precision"), ({"workspace_gb": 0}, "workspace"), ({"engine_name": "../x.engine"}, "plain file"),
     ({"optimization_level": 9}, "optimization level"), ({"precision": "int8"}, "calibration images")],
)
def test_plan_build_rejects(tmp_path, kwargs, match):
    with pytest.raises(LrexportError, match=match):
        plan_build(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art", **kwargs)


def test_plan_build_int8_checks_calibration_first(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    good = CalibrationReader([np.zeros((3, 8, 8), np.float32)] * 4, batch_size=2)
    plan = plan_build(model, tmp_path / "art", "int8", (1, 4), good)
    assert plan.calibration is good and good.cache_path == tmp_path / "art" / CALIBRATION_CACHE_FILE
    wrong = CalibrationReader([np.zeros((3, 16, 16), np.float32)] * 4, batch_size=2)
    with pytest.raises(CalibrationError, match="model input"):
        plan_build(model, tmp_path / "art", "int8", (1, 4), wrong)


# -- the one-line "missing" errors ---------------------------------------------------------------
@no_trt
def test_build_engine_without_tensorrt_is_one_line_exit_2(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(RuntimeMissingError) as err:
        build_engine(model, tmp_path / "art")
    msg = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in msg
    assert "TensorRT is not installed" in msg and 'pip install "lrexport[trt]"' in msg
    assert not (tmp_path / "art").exists()  # nothing written before TensorRT is found


@no_trt
def test_validation_comes_before_the_tensorrt_import(tmp_path):
    with pytest.raises(LrexportError, match="not found") as err:
        build_engine(tmp_path / "missing.onnx", tmp_path / "art")
    assert not isinstance(err.value, RuntimeMissingError)


@no_trt
def test_trt_runner_without_tensorrt(tmp_path):
    with pytest.raises(LrexportError, match="engine not found"):
        TrtRunner(tmp_path / "missing.engine")
    (tmp_path / "model.engine").write_bytes(b"x")
    with pytest.raises(RuntimeMissingError, match="TensorRT is not installed"):
        TrtRunner(tmp_path / "model.engine")


@no_trt
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from lrexport.cli import reports_errors

    with pytest.raises(SystemExit) as exit_:
        reports_errors(build_engine)(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT is not installed") and len(err.splitlines()) == 1
    assert "Traceback" not in err


def fake_tensorrt(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))


def test_without_gpu_is_one_line(tmp_path, monkeypatch):
    import torch

    fake_tensorrt(monkeypatch, "10.3.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeMissingError, match="no CUDA GPU visible") as err:
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art")
    assert "\n" not in str(err.value)


def test_tensorrt_11_refuses_weakly_typed_precisions(tmp_path, monkeypatch):
    import torch

    fake_tensorrt(monkeypatch, "11.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for precision in ("fp16", "int8"):
        calib = CalibrationReader([np.zeros((3, 8, 8), np.float32)] * 2, batch_size=2) if precision == "int8" else None
        with pytest.raises(RuntimeMissingError, match=r'tensorrt>=10,<11'):
            build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art", precision, (1, 2), calib)
    with pytest.raises(RuntimeMissingError, match="no CUDA GPU"):  # fp32 gets past the version check
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art", "fp32")


def test_old_tensorrt_is_refused(tmp_path, monkeypatch):
    fake_tensorrt(monkeypatch, "8.6.1")
    with pytest.raises(RuntimeMissingError, match="8.6.1 is too old"):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "art")


# -- calibration ---------------------------------------------------------------------------------
def test_calibration_batches_are_contiguous_float32():
    images = [np.full((3, 4, 4), i, np.float64) for i in range(11)]
    reader = CalibrationReader(images, batch_size=4, max_batches=5)
    batches = list(reader.batches())
    assert [b.shape for b in batches] == [(4, 3, 4, 4)] * 2  # the incomplete third batch is dropped
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    assert batches[1][0, 0, 0, 0] == 4 and reader.sample_shape == (3, 4, 4)
    assert len(list(CalibrationReader(images, batch_size=2, max_batches=3).batches())) == 3


def test_calibration_takes_pairs_and_replays_one_shot_iterables():
    import torch

    reader = CalibrationReader(((torch.ones(3, 4, 4), k) for k in range(4)), batch_size=2)
    first = reader.materialize()
    assert len(first) == 2 and len(reader.materialize()) == 2


def test_calibration_errors():
    with pytest.raises(CalibrationError, match="at least 4 images"):
        list(CalibrationReader([np.zeros((3, 4, 4))] * 3, batch_size=4).batches())
    with pytest.raises(CalibrationError, match="differ in shape"):
        list(CalibrationReader([np.zeros((3, 4, 4)), np.zeros((3, 5, 5))], batch_size=4).batches())
    with pytest.raises(CalibrationError, match="C×H×W"):
        list(CalibrationReader([np.zeros((4, 4))], batch_size=1).batches())
    with pytest.raises(CalibrationError, match="≥ 1"):
        CalibrationReader([], batch_size=0)


def test_calibration_cache_roundtrip(tmp_path):
    reader = CalibrationReader([], cache_path=tmp_path / "sub" / "calib.cache")
    assert reader.read_cache() is None
    reader.write_cache(b"TRT-table")
    assert reader.read_cache() == b"TRT-table"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["calib.cache"]  # no temp file left
    assert CalibrationReader([]).read_cache() is None


def test_calibration_from_folder_preprocesses_like_infer(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (255, 0, 128)).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    reader = CalibrationReader.from_folder(tmp_path, (3, 16, 16), mean, std, resize=20, batch_size=3)
    (batch,) = reader.batches()
    assert batch.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(batch[0, :, 5, 5], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25], atol=1e-2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no image files"):
        CalibrationReader.from_folder(tmp_path / "empty", (3, 16, 16), mean, std)
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationReader.from_folder(tmp_path / "nowhere", (3, 16, 16), mean, std)


def test_calibration_from_dataset():
    from lrexport.data import DataConfig, synthetic_split

    val = synthetic_split(DataConfig(val_size=10), train=False)
    (batch,) = CalibrationReader.from_dataset(val, batch_size=8).batches()
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == np.float32


# -- providers and timing --------------------------------------------------------------------------
def test_ort_providers_cpu_and_cuda(monkeypatch):
    import onnxruntime as ort

    assert providers.ort_providers(prefer_gpu=False) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers.ort_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers.ort_providers(prefer_gpu=False) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers.ort_providers() == ["CPUExecutionProvider"]


def test_session_provider_reports_what_ran(tmp_path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_onnx(tmp_path / "m.onnx")), providers=providers.ort_providers())
    assert providers.session_provider(sess) in ("CPUExecutionProvider", "CUDAExecutionProvider")


def test_interleaved_timing_on_cpu():
    calls = []
    t = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=3, repeats=7)
    assert len(calls) == 20 and t.clock == "wall" and all(len(v) == 7 for v in t.times_ms.values())
    assert all(x != y for x, y in zip(calls, calls[1:]))  # two models: each always follows the other
    calls.clear()
    interleave({name: functools.partial(calls.append, name) for name in "abc"}, warmup=0, repeats=30)
    rounds = [calls[i:i + 3] for i in range(0, 90, 3)]
    assert all(sorted(r) == list("abc") for r in rounds) and all(x != y for x, y in zip(calls, calls[1:]))
    assert all({r[i] for r in rounds} == set("abc") for i in range(3))  # no model keeps one place in the round
    stats = t.stats("a", batch=2)
    assert isinstance(stats, Stats) and stats.p10_ms <= stats.median_ms <= stats.p90_ms and stats.repeats == 7
    assert json.dumps(stats.to_dict())  # serialisable for reports
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    with pytest.raises(ValueError):
        interleave({"a": lambda: None}, repeats=0, warmup=0)


def test_per_round_ratio_is_the_median_of_ratios():
    from lrexport.deploy.timing import Timed

    t = Timed({"slow": [2.0, 4.0, 30.0], "fast": [1.0, 1.0, 1.0]}, "wall", 0)
    assert t.ratio("slow", "fast") == 4.0  # one slow spell does not move it
    assert 3 <= len(interleave_within({"a": lambda: None}, budget_ms=0.0, min_repeats=3, max_repeats=5).times_ms["a"]) <= 5
