"""The user's own network: a package by import path, timm's models, a module passed in from Python.

Every conv and linear layer is decomposed or named with why not; whatever cannot be built or
exported is one line. The user's package (docs' example, examples/own_model) is copied to a
temp dir, as a user keeps it beside their recipe, and `lrexport` runs there.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrexport.data import DataConfig, build_datasets, resolve_input
from lrexport.deploy.export import export_run
from lrexport.deploy.onnx_graph import GraphError
from lrexport.deploy.runtime import Classifier
from lrexport.deploy.verify import VerifyConfig, verify_artifacts
from lrexport.lowrank import decompose, layer_status
from lrexport.lowrank.rewrite import RewriteError, relative_error
from lrexport.models import create_model, model_input
from lrexport.recipe import load_recipe
from lrexport.train import run_recipe
from lrexport.train.checkpoint import GivenModelError
from runs import UNTUNED, no_torch_env, save_val_image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
# beside the example's package, models that the export cannot carry, and a factory that fails
ODD = """
import torch
from torch import nn

from .nets import TinyNet


class Erfinv(nn.Module):  # an op ONNX has no operator for
    def forward(self, x):
        return x + torch.erfinv(x.clamp(-0.5, 0.5))


class Gate(nn.Module):  # a branch on a tensor's value: no static graph
    def forward(self, x):
        return x if x.mean() > 0 else -x


class WithOdd(TinyNet):
    def __init__(self, num_classes, odd):
        super().__init__(num_classes)
        self.odd = odd

    def forward(self, x):
        return self.classifier(self.odd(self.features(x)).mean((2, 3)))


def with_erfinv(num_classes=10):
    return WithOdd(num_classes, Erfinv())


def with_gate(num_classes=10):
    return WithOdd(num_classes, Gate())


def broken(num_classes=10):
    raise ValueError("width must be even")
"""

# per layer: decomposed, or why not (the user model at 16×16, channel mode)
LAYERS = {
    "stem.0": "", "block.expand": "", "block.depthwise": "depthwise, groups=32", "block.project": "",
    "grouped": "grouped, groups=4", "mixer": "", "classifier": "Linear, decompose.linear = false",
}
USER_RUN = ('model.name="mynet.nets:build"', "data.image_size=16", "device=cpu")
QUICK_VERIFY = VerifyConfig(warmup=1, repeats=3)


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory) -> Path:
    """A directory holding the user's package ``mynet`` (docs' example, and ODD), importable only from there."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(EXAMPLE / "mynet", root / "mynet", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mynet" / "odd.py").write_text(ODD)
    return root


@pytest.fixture
def on_path(user_pkg, monkeypatch):
    """``mynet`` importable in this process."""
    monkeypatch.syspath_prepend(str(user_pkg))
    for name in [m for m in sys.modules if m == "mynet" or m.startswith("mynet.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture(scope="module")
def user_run(user_pkg, tiny_recipe, cli) -> Path:
    """The user's model trained by `lrexport train` run in the package's directory, by its import path."""
    run = user_pkg / "runs" / "own"
    proc = cli("train", tiny_recipe(*USER_RUN), "--output", run, cwd=user_pkg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def test_user_package_trains_exports_and_verifies_from_its_import_path(user_run, user_pkg, cli):
    summary = json.loads((user_run / "summary.json").read_text())
    assert {name: layer["reason"] for name, layer in summary["layers"].items()} == LAYERS
    assert {name for name, layer in summary["layers"].items() if layer["decomposed"]} == set(summary["ranks"])
    assert summary["model"]["name"] == "mynet.nets:build"
    export = cli("export", user_run, "--no-tune", cwd=user_pkg)  # rebuilds the model from its import path
    assert export.returncode == 0, export.stderr[-2000:]
    verify = cli("verify", user_run / "artifacts", "--repeats", "3", "--warmup", "1", cwd=user_pkg)
    assert verify.returncode == 0, verify.stderr[-2000:]
    report = json.loads((user_run / "artifacts" / "verify.json").read_text())
    assert report["passed"] and report["accuracy"]["lowrank"]["top1_disagree"] == 0


@pytest.mark.parametrize("name,message", [
    ("mynet.nowhere:build", "no module named 'mynet.nowhere'"),
    ("mynet.nets:missing", "mynet.nets has no attribute 'missing'"),
    ("mynet.odd:broken", "the factory raised ValueError: width must be even"),
    ("mynet.nets:", "is not an import path"),
    ("mynet.nets", "or give timm/NAME or package.module:factory"),
])
def test_a_model_that_cannot_be_built_is_one_line(name, message, user_pkg, tiny_recipe, cli, tmp_path):
    recipe = tiny_recipe(f'model.name="{name}"', "device=cpu")
    line = error_line(cli("train", recipe, "--output", tmp_path / "r", cwd=user_pkg))
    assert message in line and not (tmp_path / "r").exists()


def test_weights_that_do_not_fit_the_model_are_one_line(user_run, user_pkg, tiny_recipe, cli, tmp_path):
    recipe = tiny_recipe(*USER_RUN, "model.kwargs.width=8", f'model.weights="{user_run / "checkpoints" / "dense.pt"}"')
    line = error_line(cli("train", recipe, "--output", tmp_path / "r", cwd=user_pkg))
    assert "dense.pt does not match the model" in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_timm_models_decompose_exactly(name):
    torch.manual_seed(0)
    model = create_model(f"timm/{name}", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    status = {s.name: s for s in layer_status(model, input_size=(3, 32, 32))}
    decompose(model, input_size=(3, 32, 32))
    assert relative_error(model(x), ref) < 1e-5
    depthwise = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    assert depthwise == {n for n, s in status.items() if s.reason.startswith("depthwise")}  # none in resnet18
    assert {n for n, s in status.items() if s.decomposed} == {n for n, _ in model.named_modules() if n in status and
                                                              type(model.get_submodule(n)).__name__ == "SVDConv2d"}


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_timm_model_trains_exports_and_verifies_on_onnxruntime(name, tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(f'model.name="timm/{name}"', "data.image_size=32", "data.train_size=32",
                                     "data.val_size=16", "data.batch_size=16", "phases.dense.epochs=0", "device=cpu"))
    run = run_recipe(recipe, tmp_path / "r")
    assert run.summary["data_info"]["mean"] == [0.485, 0.456, 0.406]  # timm's pretrained config, which the recipe left open
    checked = verify_artifacts(export_run(run.run_dir, config=UNTUNED).out_dir, config=QUICK_VERIFY)
    assert checked.passed and checked.report["accuracy"]["lowrank"]["top1_disagree"] == 0


def test_timm_config_gives_the_input_the_recipe_leaves_open():
    open_ = resolve_input(DataConfig(), model_input("timm/resnet18"))
    assert (open_.image_size, open_.channels, open_.mean, open_.std) == (224, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert model_input(create_model("timm/resnet18")) == model_input("timm/resnet18")  # a timm module passed from Python
    gray = resolve_input(DataConfig(image_size=64, channels=1), model_input("timm/resnet18", {"in_chans": 1}))
    assert (gray.image_size, gray.channels, len(gray.mean)) == (64, 1, 1)
    _, val, info = build_datasets(DataConfig(channels=1, image_size=8, train_size=4, val_size=4))
    assert info.input_size == (1, 8, 8) and val[0][0].shape == (1, 8, 8)


def test_a_module_passed_from_python_is_trained_and_exported_with_it(on_path, tiny_recipe, tmp_path, cli):
    from mynet.nets import TinyNet

    net = TinyNet(width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = run_recipe(load_recipe(tiny_recipe("data.image_size=16", "device=cpu")), tmp_path / "r", model=net)
    assert run.summary["model"] | {"kwargs": None} == {"name": "mynet.nets.TinyNet", "given": True, "num_classes": 10,
                                                       "kwargs": None, "weights": ""}
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the caller's module is left as it was
    with pytest.raises(GivenModelError, match="pass the same module again"):
        export_run(run.run_dir, config=UNTUNED)
    checked = verify_artifacts(export_run(run.run_dir, config=UNTUNED, model=net).out_dir, config=QUICK_VERIFY)
    assert checked.passed
    assert "passed to lrexport from Python" in error_line(cli("export", run.run_dir, "--no-tune", "--output", tmp_path / "a"))


@pytest.mark.parametrize("factory,error,layer", [("with_erfinv", GraphError, "layer 'odd' (erfinv)"),
                                                 ("with_gate", RewriteError, "layer 'odd'")])
def test_a_layer_the_export_cannot_carry_is_named(factory, error, layer, on_path, tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(f'model.name="mynet.odd:{factory}"', "data.image_size=16", "device=cpu",
                                     "phases.dense.epochs=0"))
    run = run_recipe(recipe, tmp_path / "r").run_dir
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(error, match=re.escape(layer)):
        export_run(run, config=UNTUNED)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == files  # nothing in the run directory changed


def test_one_channel_model_exports_and_infers_without_torch(user_pkg, tiny_recipe, cli, tmp_path):
    run = tmp_path / "gray"
    train = cli("train", tiny_recipe(*USER_RUN, "model.kwargs.in_chans=1", "data.channels=1"), "--output", run, cwd=user_pkg)
    assert train.returncode == 0, train.stderr[-2000:]
    export = cli("export", run, "--no-tune", cwd=user_pkg)
    assert export.returncode == 0, export.stderr[-2000:]
    meta = json.loads((run / "artifacts" / "meta.json").read_text())
    assert meta["input"]["shape"][1:] == [1, 16, 16] and meta["input"]["color"] == "L" and len(meta["input"]["mean"]) == 1
    assert verify_artifacts(run / "artifacts", config=QUICK_VERIFY).passed
    image = tmp_path / "digit.png"
    save_val_image(run, 0, image)
    proc = subprocess.run([sys.executable, "-m", "lrexport", "infer", str(run / "artifacts"), str(image), "--top-k", "1"],
                          env=no_torch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (expected,) = Classifier(run / "artifacts").predict([image], top_k=1)
    assert proc.stdout.split()[-1] == expected.top[0][0]
