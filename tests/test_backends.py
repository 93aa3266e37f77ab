"""The backend registry is the one copy of what each runtime takes: the runners, export, the recipe's
prune.latency check and the CLI all read it."""

from importlib import import_module

import pytest
from click.testing import CliRunner

from lrexport.cli import main
from lrexport.deploy.backends import RUNTIMES, RuntimeOptions, UnsupportedOptionError, entry
from lrexport.errors import RecipeError, RuntimeMissingError
from lrexport.recipe import recipe_from_dict


def test_each_entry_names_a_module_whose_backend_is_that_entry():
    for name, e in RUNTIMES.items():  # importing a backend module imports no runtime (trt: no tensorrt here)
        assert import_module(f"lrexport.deploy.backends{e.module}").BACKEND.entry is e, name


def test_defaults_come_from_the_entry_and_what_it_does_not_take_is_refused():
    assert (entry("torch").resolve(RuntimeOptions()).device, entry("torch").resolve(RuntimeOptions()).precision) == ("cpu", "fp32")
    assert entry("torch").resolve(RuntimeOptions(device="cuda", precision="bf16")).precision == "bf16"
    trt = entry("trt").resolve(RuntimeOptions())
    assert (trt.device, trt.precision) == ("cuda", "fp16")  # engines for GPUs: fp16 unless told
    with pytest.raises(UnsupportedOptionError, match="channels-last.*applies to torch"):
        entry("ort").resolve(RuntimeOptions(channels_last=True))
    with pytest.raises(UnsupportedOptionError, match="threads"):
        entry("trt").resolve(RuntimeOptions(threads=2))
    with pytest.raises(RuntimeMissingError, match="not fp16 on the CPU"):
        entry("ort").resolve(RuntimeOptions(precision="fp16"))
    with pytest.raises(RuntimeMissingError, match="not fp32 on the CPU"):
        entry("trt").resolve(RuntimeOptions(device="cpu"))


def test_the_recipe_checks_prune_latency_against_the_same_entries():
    # what a runtime runs, its latency can be measured at: OpenVINO fp16 on the CPU
    assert recipe_from_dict({}, overrides=["prune.latency=openvino", "prune.latency_precision=fp16"]).prune.latency == "openvino"
    with pytest.raises(RecipeError, match='needs prune.latency = "torch"'):  # onnxruntime on CUDA is not timed layer by layer
        recipe_from_dict({}, overrides=["prune.latency=ort", "prune.latency_device=cuda"])
    with pytest.raises(RecipeError, match="prune.latency"):  # TensorRT times no layer alone: not a choice
        recipe_from_dict({}, overrides=["prune.latency=trt"])


def test_export_help_is_grouped_and_lists_the_registry():
    res = CliRunner().invoke(main, ["export", "--help"])
    assert res.exit_code == 0
    for section in ("Target:", "Planning:", "Checks:", "int8:", "Runtime-specific:"):
        assert section in res.output
    assert "|".join(RUNTIMES) in res.output and "--format" not in res.output and "--trt-batch-sizes" not in res.output
    assert "--parity-tolerance" in res.output and "--batches" in res.output


def test_an_option_the_runtime_does_not_take_is_refused_in_one_line_before_any_work(tmp_path):
    for args in (["--runtime", "trt", "--precision", "int8", "--max-layer-error", "0.2"], ["--runtime", "trt", "--tune-cache", "c"],
                 ["--runtime", "trt", "--threads", "2"], ["--channels-last"], ["--calibration-images", "8"]):
        res = CliRunner().invoke(main, ["export", str(tmp_path), *args])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, res.output)
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


@pytest.mark.parametrize("sources", [False, True])
def test_layer_of_names_each_conv_by_its_module_path_in_either_export(sources):
    import torch
    from torch import nn

    from lrexport.deploy.backends.pt2e import exported, layer_of
    from lrexport.lowrank.rewrite import to_plain
    from lrexport.models import create_model

    # a traced graph module, which a strict export names by Dynamo's expressions (getattr(L['self'].layer1, '0'))
    plain, _ = to_plain(create_model("cifar_resnet20", num_classes=10).eval(), (3, 16, 16))
    graph = exported(plain, (3, 16, 16), sources=sources)
    convs = [layer_of(n) for n in graph.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert sorted(convs) == sorted(name for name, m in plain.named_modules() if isinstance(m, nn.Conv2d))
    assert any(n.meta.get("source_fn_stack") for n in graph.graph.nodes) == sources
