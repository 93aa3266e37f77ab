import copy

import pytest
import torch
from torch import nn

import lrexport
from lrexport import LrexportError
from lrexport.lowrank import SVDConv2d, SVDLinear, energy_rank, round_rank, svd_layers
from lrexport.lowrank.regularizers import hoyer_of, l1_of, orthogonality_of


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def conv_shapes(model, input_size):
    """Every distinct Conv2d configuration of a model with its input size, from a real forward."""
    seen = {}

    def hook(m, inp, out):
        key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
        seen.setdefault(key, (m, tuple(inp[0].shape[1:])))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for h in hs:
        h.remove()
    return list(seen.values())


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("model_name,size", [("cifar_resnet20", (3, 32, 32)), ("resnet18", (3, 64, 64))])
def test_exact_svd_reproduces_every_conv_shape(model_name, size, mode):
    torch.manual_seed(0)
    model = lrexport.create_model(model_name, num_classes=10)
    shapes = conv_shapes(model, size)
    kinds = {(m.kernel_size, m.stride) for m, _ in shapes}
    assert ((1, 1), (2, 2)) in kinds and ((3, 3), (2, 2)) in kinds or model_name.startswith("cifar")
    for conv, in_shape in shapes:
        x = torch.randn(2, *in_shape)
        layer = SVDConv2d.from_dense(conv, mode)
        assert layer.rank == layer.full_rank
        with torch.no_grad():
            ref = conv(x)
            assert rel_err(layer(x), ref) < 1e-5
            # both forward paths: the dense rebuild and the thin pair
            w1, w2 = layer.factor_weights()
            g1, g2 = layer.pair_geometry()
            pair = nn.functional.conv2d(nn.functional.conv2d(x, w1, **g1), w2, layer.bias, **g2)
            assert rel_err(pair, ref) < 1e-5, (conv, mode)


def test_resnet18_stem_is_covered():
    model = lrexport.create_model("resnet18")
    kernels = {m.kernel_size for m, _ in conv_shapes(model, (3, 64, 64))}
    assert (7, 7) in kernels and (1, 1) in kernels and (3, 3) in kernels


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_decomposed_model_matches_dense(mode):
    torch.manual_seed(0)
    model = lrexport.create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    dec = lrexport.decompose(copy.deepcopy(model), mode=mode, linear=True).eval()
    assert len(svd_layers(dec)) == 22  # 19 convs + 2 shortcut convs + fc
    with torch.no_grad():
        assert rel_err(dec(x), model(x)) < 1e-5


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_gradients_reach_factors_on_both_paths(mode):
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    for rank in (None, 2):  # full rank runs dense, rank 2 runs the pair
        layer = SVDConv2d.from_dense(conv, mode)
        if rank:
            lrexport.lowrank.truncate(layer, rank)
        dense, factored = layer.macs((8, 8))
        assert (factored < dense) == bool(rank)
        layer(x).square().sum().backward()
        for p in (layer.U, layer.s, layer.V):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_linear_svd_is_exact_and_cheap_when_thin():
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    layer = SVDLinear.from_dense(lin)
    with torch.no_grad():
        assert rel_err(layer(x), lin(x)) < 1e-5
    lrexport.lowrank.truncate(layer, 4)
    assert layer.macs() == (64 * 32, 4 * 96)


def test_orthogonality_zero_for_orthogonal_factors_and_hand_value():
    q, _ = torch.linalg.qr(torch.randn(6, 3))
    assert orthogonality_of(q, q.T).item() == pytest.approx(0.0, abs=1e-6)
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # UᵀU - I = diag(0, 3): 9; V = I: 0; / r² = 4
    assert orthogonality_of(u, torch.eye(2)).item() == pytest.approx(9 / 4)


def test_sparsity_terms_by_hand():
    s = torch.tensor([3.0, -4.0])
    assert l1_of(s).item() == pytest.approx(7.0)
    assert hoyer_of(s).item() == pytest.approx(7.0 / 5.0)
    assert hoyer_of(torch.tensor([0.0, 2.5, 0.0])).item() == pytest.approx(1.0)
    assert hoyer_of(torch.ones(9)).item() == pytest.approx(3.0)


def test_model_terms_are_sums_over_layers():
    model = lrexport.decompose(lrexport.create_model("cifar_resnet20", num_classes=10), "channel")
    layers = svd_layers(model)
    assert lrexport.hoyer(model).item() == pytest.approx(sum(hoyer_of(l.s).item() for _, l in layers), rel=1e-5)
    assert lrexport.l1(model).item() == pytest.approx(sum(l.s.abs().sum().item() for _, l in layers), rel=1e-5)
    # exact SVD factors are orthonormal: the term starts near zero
    assert lrexport.orthogonality(model).item() < 1e-4


def test_regularizer_gradients_match_autograd_of_the_plain_formulas():
    # the terms use a closed-form gradient (orthogonality) and batch all layers (sparsity);
    # the reference is autograd through DESIGN §2's formulas written out per layer
    torch.manual_seed(0)
    model = lrexport.decompose(lrexport.create_model("cifar_resnet20", num_classes=10), "spatial")
    layers = [l for _, l in svd_layers(model)]
    with torch.no_grad():  # away from orthogonality and with uneven ranks, so that every gradient is non-trivial
        for l in layers:
            l.U.add_(0.1 * torch.randn_like(l.U)), l.V.add_(0.1 * torch.randn_like(l.V)), l.s.mul_(torch.rand_like(l.s))
        lrexport.lowrank.truncate(layers[3], 5)

    def plain(l):
        r = l.rank
        ortho = (((l.U.T @ l.U - torch.eye(r)) ** 2).sum() + ((l.V @ l.V.T - torch.eye(r)) ** 2).sum()) / r**2
        return ortho, l.s.abs().sum() / l.s.norm(), l.s.abs().sum()

    for term, k in ((lrexport.orthogonality, 0), (lrexport.hoyer, 1), (lrexport.l1, 2)):
        params = [p for l in layers for p in (l.U, l.s, l.V)]
        got_value = 0.5 * term(model)  # weighted, as in the loss, so that backward must use its incoming gradient
        got = torch.autograd.grad(got_value, params, allow_unused=True, materialize_grads=True)
        want_value = 0.5 * sum(plain(l)[k] for l in layers)
        want = torch.autograd.grad(want_value, params, allow_unused=True, materialize_grads=True)
        assert got_value.item() == pytest.approx(want_value.item(), rel=1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_orthogonality_under_autocast_keeps_the_factors_precision():
    # a user may call the term inside the model's autocast region
    model = lrexport.decompose(lrexport.create_model("cifar_resnet20", num_classes=10), "channel")
    with torch.no_grad():
        for _, l in svd_layers(model):
            l.U.mul_(1.1)
    want = lrexport.orthogonality(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lrexport.orthogonality(model)
    got.backward()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(l.U.grad is not None and l.U.grad.dtype == torch.float32 for _, l in svd_layers(model))


@pytest.mark.parametrize("e,k", [(0.0, 4), (0.01, 4), (0.05, 3), (0.2, 2), (0.24, 2), (0.25, 1), (0.99, 1)])
def test_energy_rank_on_hand_spectrum(e, k):
    # s² = 16, 4, 1, 0.25 (sum 21.25): keeping 3 leaves 0.25/21.25 = 1.2% removed, 2 leaves 5.9%, 1 leaves 24.7%
    assert energy_rank(torch.tensor([1.0, 4.0, 0.5, 2.0]), e) == k


def test_energy_rank_ignores_zero_values_at_e0():
    assert energy_rank(torch.tensor([3.0, 0.0, 0.0]), 0.0) == 1


@pytest.mark.parametrize("e", [-0.1, 1.0, 1.5])
def test_energy_out_of_range_is_clear(e):
    with pytest.raises(LrexportError, match="energy threshold"):
        energy_rank(torch.ones(3), e)


def test_round_rank():
    assert round_rank(5, 8, 64) == 8  # never 0
    assert round_rank(13, 8, 64) == 16 and round_rank(11, 8, 64) == 8
    assert round_rank(62, 8, 60) == 60  # never above full rank
    assert round_rank(7, 1, 64) == 7


def test_prune_slices_factors_keeping_largest():
    model = lrexport.decompose(nn.Sequential(nn.Conv2d(4, 8, 3)), "channel")
    layer = model[0]
    with torch.no_grad():
        layer.s.copy_(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]))
    u_kept = layer.U[:, :2].detach().clone()
    [res] = lrexport.prune(model, 0.2)
    assert (res.before, res.after) == (8, 2)
    assert layer.U.shape == (8, 2) and layer.V.shape == (2, 36) and torch.equal(layer.U.detach(), u_kept)


def test_prune_multiple_of():
    model = lrexport.decompose(nn.Sequential(nn.Conv2d(16, 32, 3)), "channel")
    with torch.no_grad():
        model[0].s.copy_(torch.logspace(0, -6, 32))
    [res] = lrexport.prune(model, 1e-4, multiple_of=8)
    assert res.after % 8 == 0 and 0 < res.after <= 32


def test_published_mac_counts():
    cases = [
        ("resnet18", {}, (3, 224, 224), 1.814e9),
        ("resnet50", {}, (3, 224, 224), 4.089e9),
        ("cifar_resnet20", {"shortcut": "A", "num_classes": 10}, (3, 32, 32), 40.55e6),
        ("cifar_resnet20", {"shortcut": "B", "num_classes": 10}, (3, 32, 32), 40.81e6),
    ]
    for name, kw, size, published in cases:
        total = lrexport.count_macs(lrexport.create_model(name, **kw), size).dense
        assert abs(total / published - 1) < 0.005, (name, total)


def test_decomposed_macs_fall_back_to_dense_at_break_even():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    layer = SVDConv2d.from_dense(conv, "channel")
    hw = (8, 8)
    be = layer.break_even_rank(hw)
    dense, _ = layer.macs(hw)
    assert layer.macs(hw, rank=be)[1] >= dense > layer.macs(hw, rank=be - 1)[1]
    model = nn.Sequential(layer)
    report = lrexport.count_macs(model, (64, 8, 8))
    assert report.deployed == report.dense  # full rank: deployed as dense, not more
    lrexport.lowrank.truncate(layer, be - 1)
    report = lrexport.count_macs(model, (64, 8, 8))
    assert report.layers[0].factored and report.deployed == layer.macs(hw)[1] < dense
    lrexport.lowrank.truncate(layer, 4)
    assert lrexport.count_macs(model, (64, 8, 8)).speedup == pytest.approx(dense / layer.macs(hw)[1])


def test_paper_costing_is_the_factored_pair_at_any_rank():
    """The paper's code costs the pair even at full rank (above break-even), where we deploy one dense conv."""
    conv, fc = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 10)
    model = nn.Sequential(SVDConv2d.from_dense(conv, "channel"), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    svd = model[0]
    assert svd.rank == svd.full_rank == 32 >= svd.break_even_rank((8, 8))
    dense_conv, pair = 64 * 9 * 16 * 32, 64 * (9 * 16 * 32 + 32 * 32)  # H'W'·kh·kw·c·n; H'W'·(kh·kw·c·r + r·n), r = 32
    report = lrexport.count_macs(model, (16, 8, 8))
    assert report.dense == dense_conv + 32 * 10 and report.paper == pair + 32 * 10
    assert report.deployed == dense_conv + 32 * 10 < report.paper and report.paper_speedup < report.speedup == 1.0
    d = report.to_dict()
    assert (d["paper_macs"], d["paper_speedup"]) == (report.paper, report.dense / (pair + 32 * 10))
    assert [(l["kind"], l["paper"], l["deployed"], l["factored"]) for l in d["layers"]] == [
        ("svd-channel", pair, dense_conv, False), ("linear", 320, 320, False)]
    lrexport.lowrank.truncate(svd, 2)  # below break-even: both costings are the pair
    report = lrexport.count_macs(model, (16, 8, 8))
    assert report.paper == report.deployed == 64 * (9 * 16 * 2 + 2 * 32) + 320 and report.paper_speedup == report.speedup


def test_spatial_macs_formula_by_hand():
    layer = SVDConv2d(8, 16, 3, stride=2, padding=1, mode="spatial", rank=5)
    # input 10x10 -> output 5x5; conv1 output 5x10 (unstrided width)
    assert layer.macs((10, 10)) == (25 * 9 * 8 * 16, 5 * 10 * 3 * 8 * 5 + 25 * 3 * 5 * 16)


def test_bad_inputs_name_the_value():
    model = lrexport.create_model("cifar_resnet20", num_classes=10)
    with pytest.raises(LrexportError, match="unknown model 'resnet9000'"):
        lrexport.create_model("resnet9000")
    with pytest.raises(LrexportError, match="'diagonal'"):
        lrexport.decompose(model, mode="diagonal")
    with pytest.raises(LrexportError, match="'layer9.*'"):
        lrexport.decompose(model, include=["layer9.*"])
    with pytest.raises(LrexportError, match="multiple_of"):
        lrexport.prune(lrexport.decompose(model), 0.1, multiple_of=0)


def test_torchvision_model_by_name_and_local_weights(tmp_path):
    src = lrexport.create_model("resnet18", num_classes=7)
    path = tmp_path / "w.pt"
    torch.save({"model": src.state_dict()}, path)
    dst = lrexport.create_model("resnet18", num_classes=7, weights=str(path))
    assert torch.equal(dst.fc.weight, src.fc.weight)
    assert "mobilenet_v2" in lrexport.list_models()
    with pytest.raises(lrexport.errors.CheckpointError, match="does not match"):
        lrexport.create_model("resnet18", num_classes=3, weights=str(path))


def test_a_model_with_no_decomposable_layer_says_why():
    """Not that the pattern '*' matched nothing, but what the layers are (timm's NF-ResNets: weight-standardized convs)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=2))
    with pytest.raises(LrexportError, match=r"the model has no decomposable layer \(0: depthwise, groups=8; 1: depthwise, groups=8; …\)"):
        lrexport.lowrank.decompose(model, "channel")
