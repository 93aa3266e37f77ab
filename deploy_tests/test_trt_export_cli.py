"""`lrexport export --format trt` on a machine without TensorRT: one line, exit code 2, ONNX kept."""

import importlib.util

import pytest
from click.testing import CliRunner

from lrexport.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: deploy_tests/gpu covers the real build"
)


@pytest.fixture
def tiny_run(trained_run):
    return trained_run("channel")  # the exports below write under --out, not into the shared run


@pytest.mark.parametrize("target", [["--format", "trt"], ["--runtime", "trt"]])  # --format trt: the old spelling
def test_export_trt_without_tensorrt_from_the_shell(tiny_run, tmp_path, cli, target):
    out = tmp_path / "art"
    res = cli("export", tiny_run, *target, "--output", out, "--check-images", "8", "--no-tune")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("error: TensorRT is not installed") and 'pip install "lrexport[trt]"' in lines[0]
    assert (out / "model.onnx").is_file() and (out / "meta.json").is_file()  # the ONNX artifacts stay usable


def test_export_int8_without_tensorrt_is_one_line_too(tiny_run, tmp_path):
    res = CliRunner().invoke(
        main, ["export", str(tiny_run), "--format", "trt", "--precision", "int8", "--output", str(tmp_path / "a"), "--check-images", "8"]
    )
    assert res.exit_code == 2 and "TensorRT is not installed" in res.output and "Traceback" not in res.output
