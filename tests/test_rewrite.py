"""Rewrite of low-rank models into plain conv pairs / dense convs with BatchNorm folded."""

import operator

import pytest
import torch
from torch import nn

import lrexport
from lrexport.lowrank import SVDConv2d, decompose, truncate
from lrexport.lowrank.rewrite import aligned_rank, plan_layers, relative_error, to_plain



def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that folding has something to fold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return model


def conv_bn(conv: nn.Conv2d) -> nn.Module:
    return randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())).eval()


def plain_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


CONVS = {
    "3x3": dict(in_channels=16, out_channels=24, kernel_size=3, stride=1, padding=1),
    "3x3-strided": dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1),
    "1x1-strided": dict(in_channels=16, out_channels=32, kernel_size=1, stride=2, padding=0),
    "7x7-stem": dict(in_channels=3, out_channels=32, kernel_size=7, stride=2, padding=3),
    "3x5-bias": dict(in_channels=8, out_channels=16, kernel_size=(3, 5), stride=(1, 2), padding=(1, 2), bias=True),
}


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_thin_pair_reproduces_low_rank_layer(conv, mode):
    torch.manual_seed(0)
    cfg = {"bias": False} | CONVS[conv]
    model = conv_bn(nn.Conv2d(**cfg))
    decompose(model, mode)
    layer = model[0]
    size = (cfg["in_channels"], 15, 13)  # odd sizes catch padding/stride mistakes
    even = layer.break_even_rank(size[1:])
    truncate(layer, max(1, even // 3))
    x = torch.randn(3, *size)
    plain, report = to_plain(model, size, multiple_of=1)
    with torch.no_grad():
        assert relative_error(plain(x), model(x)) < 1e-4
    (plan,) = report.layers
    assert not plan.dense and plan.deployed_rank == layer.rank
    first, second = plain_convs(plain)
    n, c, r = layer.out_channels, layer.in_channels, layer.rank
    kh, kw = layer.kernel_size
    if mode == "channel":
        assert first.weight.shape == (r, c, kh, kw) and first.stride == layer.stride
        assert second.weight.shape == (n, r, 1, 1)
    else:
        assert first.weight.shape == (r, c, kh, 1) and first.stride == (layer.stride[0], 1)
        assert second.weight.shape == (n, r, 1, kw) and second.stride == (1, layer.stride[1])
    assert first.bias is None and second.bias is not None  # the folded BN lands in the second conv
    assert report.bn_folded == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_alignment_zero_pads_rank_upward_and_changes_nothing(mode):
    torch.manual_seed(1)
    model = conv_bn(nn.Conv2d(32, 64, 3, padding=1, bias=False))
    decompose(model, mode)
    truncate(model[0], 5)
    x = torch.randn(2, 32, 8, 8)
    exact, _ = to_plain(model, (32, 8, 8), multiple_of=1)
    aligned, report = to_plain(model, (32, 8, 8), multiple_of=8)
    assert report.layers[0].deployed_rank == 8
    first, second = plain_convs(aligned)
    assert first.out_channels == 8 and second.in_channels == 8
    assert torch.all(first.weight[5:] == 0) and torch.all(second.weight[:, 5:] == 0)
    with torch.no_grad():
        assert relative_error(aligned(x), exact(x)) < 1e-6
        assert relative_error(aligned(x), model(x)) < 1e-4


def test_aligned_rank():
    assert [aligned_rank(r, 8) for r in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert aligned_rank(13, 1) == 13


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_dense_fallback_at_and_above_break_even(mode):
    torch.manual_seed(2)
    size = (16, 8, 8)
    x = torch.randn(2, *size)
    base = conv_bn(nn.Conv2d(16, 16, 3, padding=1, bias=False))
    probe = SVDConv2d.from_dense(base[0], mode)
    even = probe.break_even_rank(size[1:])
    assert 2 < even <= probe.full_rank

    def deployed(rank, multiple_of):
        model = decompose(conv_bn(nn.Conv2d(16, 16, 3, padding=1, bias=False)), mode)
        truncate(model[0], rank)
        plain, report = to_plain(model, size, multiple_of)
        with torch.no_grad():
            assert relative_error(plain(x), model(x)) < 1e-4
        return report.layers[0], plain_convs(plain)

    plan, convs = deployed(even, 1)  # at break-even: one dense conv
    assert plan.dense and len(convs) == 1 and convs[0].weight.shape == (16, 16, 3, 3)
    plan, convs = deployed(probe.full_rank, 1)  # above
    assert plan.dense and len(convs) == 1
    plan, convs = deployed(even - 1, 1)  # just below: a thin pair
    assert not plan.dense and len(convs) == 2
    # below break-even, but aligning up would reach it: dense rather than a padded pair
    rank = even - 1
    step = next(m for m in range(2, 64) if aligned_rank(rank, m) >= even)
    plan, convs = deployed(rank, step)
    assert plan.dense and len(convs) == 1


def test_plan_uses_each_layers_input_size():
    torch.manual_seed(3)
    model = lrexport.create_model("cifar_resnet20").eval()
    decompose(model, "channel")
    plans = {p.name: p for p in plan_layers(model, (3, 16, 16), multiple_of=1)}
    assert plans["conv1"].in_hw == (16, 16)
    assert plans["layer2.0.conv1"].in_hw == (16, 16) and plans["layer2.0.conv2"].in_hw == (8, 8)
    assert plans["layer3.2.conv2"].in_hw == (4, 4)
    for name, layer in model.named_modules():
        if isinstance(layer, SVDConv2d):
            assert plans[name].break_even == layer.break_even_rank(plans[name].in_hw)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_dense_model_only_folds_batchnorm(shortcut):
    torch.manual_seed(4)
    model = randomize_bn(lrexport.create_model("cifar_resnet20", shortcut=shortcut)).eval()
    x = torch.randn(4, 3, 16, 16)
    plain, report = to_plain(model, (3, 16, 16))
    with torch.no_grad():
        assert relative_error(plain(x), model(x)) < 1e-5
    assert report.layers == [] and report.bn_left == 0
    assert report.bn_folded == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(plain_convs(plain)) == len(plain_convs(model))
    assert any(isinstance(p, nn.BatchNorm2d) for p in model.modules())  # the original is untouched


def test_shortcut_a_channel_counts_become_constants():
    model = lrexport.create_model("cifar_resnet20", shortcut="A").eval()
    plain, _ = to_plain(model, (3, 16, 16))
    shape_reads = [
        n for n in plain.graph.nodes
        if (n.op == "call_function" and n.target is getattr and n.args[1] == "shape")
        or (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)
            and n.args[0].op == "call_function" and n.args[0].target is getattr)
    ]
    assert shape_reads == []
    x = torch.randn(3, 3, 16, 16)  # another batch size than the one the shapes were read at
    with torch.no_grad():
        assert relative_error(plain(x), model(x)) < 1e-5


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_whole_low_rank_network_with_linear(mode):
    torch.manual_seed(5)
    model = randomize_bn(lrexport.create_model("cifar_resnet20")).eval()
    decompose(model, mode, linear=True)
    lrexport.prune(model, 0.3)
    x = torch.randn(4, 3, 16, 16)
    plain, report = to_plain(model, (3, 16, 16), multiple_of=8)
    with torch.no_grad():
        assert relative_error(plain(x), model(x)) < 1e-4
    kinds = {p.kind for p in report.layers}
    assert kinds == {f"svd-{mode}", "svd-linear"}
    assert any(p.dense for p in report.layers) and any(not p.dense for p in report.layers)
    for p in report.layers:
        assert p.dense or (p.deployed_rank % 8 == 0 and p.rank <= p.deployed_rank < p.break_even)
    # only plain modules are left, and nothing is trainable
    leaf_types = {type(m) for m in plain.modules() if not list(m.children())}
    assert leaf_types <= {nn.Conv2d, nn.Linear, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Identity}
    assert not any(p.requires_grad for p in plain.parameters())
    assert any(isinstance(m, lrexport.lowrank.SVDConv2d) for m in model.modules())  # original untouched


class PoolUpToKernel(nn.Module):
    """A head that pools an input smaller than its kernel up to the kernel's size (as timm's VGG head
    does): Python control flow on the input's spatial size around a conv to decompose."""

    def __init__(self, channels: int, out: int, kernel: int = 5):
        super().__init__()
        self.kernel = kernel
        self.fc = nn.Conv2d(channels, out, kernel, bias=True)

    def forward(self, x):
        if x.shape[-2] < self.kernel or x.size(3) < self.kernel:
            x = nn.functional.adaptive_avg_pool2d(x, (max(self.kernel, x.shape[-2]), max(self.kernel, x.shape[-1])))
        return self.fc(x).mean((2, 3))


class SizeBranchNet(nn.Module):
    """A stem, then a branch on the channel count in the model's own forward, then the head above."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = PoolUpToKernel(16, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[1] == 16:
            x = x * 2
        return self.head(x)


@pytest.mark.parametrize("size", [(3, 8, 8), (3, 16, 16)])  # the head pools 4×4 up to 5×5; 8×8 it leaves
def test_branch_on_fixed_sizes_takes_its_side_and_exports(size):
    from lrexport.deploy.backends import run_onnx
    from lrexport.deploy.export import ExportConfig, rewrite

    torch.manual_seed(6)
    model = randomize_bn(SizeBranchNet()).eval()
    decompose(model, "channel")
    truncate(model.head.fc, 3)
    plain, report, proto = rewrite(model, size, ExportConfig(), multiple_of=1)
    assert [p.name for p in report.layers if not p.dense] == ["head.fc"] and report.bn_folded == 1
    # the branches are decided: no shape read is left in the graph, nor an If in the ONNX graph
    assert not any(n.op == "call_function" and n.target is getattr for n in plain.graph.nodes)
    ops = {node.op_type for node in proto.graph.node}
    assert "If" not in ops
    assert ("MatMul" in ops) == (size[1] == 8)  # 4×4 pooled up to 5×5: ONNX's AveragePool cannot, two MatMuls can
    x = torch.randn(5, *size)  # another batch size than the one the branches were read at
    with torch.no_grad():
        ref = model(x)
        assert relative_error(plain(x), ref) < 1e-5
    _, out = run_onnx(proto, x.numpy())
    assert relative_error(torch.from_numpy(out), ref) < 1e-5


class BatchBranch(nn.Module):
    def forward(self, x):
        return x if x.shape[0] > 1 else x * 2


class ValueBranch(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else x * 2


@pytest.mark.parametrize("branch", [BatchBranch, ValueBranch])
def test_branch_on_batch_size_or_values_is_an_error_naming_the_layer(branch):
    from lrexport.lowrank.rewrite import RewriteError

    model = nn.Sequential(nn.Conv2d(3, 4, 3), branch()).eval()
    with pytest.raises(RewriteError, match=r"cannot trace layer '1' .*batch size or on a tensor's values"):
        to_plain(model, (3, 8, 8))


@pytest.mark.parametrize("in_hw,out_hw", [((1, 1), (7, 7)), ((4, 5), (5, 4)), ((7, 9), (3, 4)), ((6, 6), (4, 3))])
def test_adaptive_pool_as_matmuls_is_pytorchs_pool(in_hw, out_hw):
    from lrexport.lowrank.adaptive_pool import AdaptiveAvgPoolMatmul

    x = torch.randn(2, 3, *in_hw)
    ref = nn.functional.adaptive_avg_pool2d(x, out_hw)
    assert relative_error(AdaptiveAvgPoolMatmul(in_hw, out_hw, x)(x), ref) < 1e-6
