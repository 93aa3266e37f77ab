"""SVD training holds where dense training holds: the factor step is scaled to the dense step's size,
a diverged step is named and stops the epoch, and a phase recovers from it by rolling back.

Why the scale (docs/training.md): a step on U, s, V moves W = U·diag(s)·V up to 2·s²+1 times as far
as the same step on W; on a model without BatchNorm after its convs that diverged at the
learning rate that trained it dense.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rich.console import Console

from lrexport.cli import summary_table
from lrexport.lowrank import decompose, svd_layers
from lrexport.lowrank.svd_layers import SVDConv2d
from lrexport.recipe import PhaseConfig, load_recipe
from lrexport.train import run_recipe
from lrexport.train.loop import (EpochState, Loss, NonFiniteLoss, Precision, build_optimizer, build_scheduler, load_optimizer_state,
                                 train_one_epoch)
from lrexport.models import create_model
from lrexport.train.stability import Limits, Rollback, factor_layers, scale_factor_grads

CPU = Precision(torch.device("cpu"))


class OwnNet(nn.Module):
    """A user's net with no BatchNorm after any conv: a stem, 1×7 then 7×1, a dilated conv, their
    concat fused by a 1×1 conv with bias and added to a residual, a strided conv, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.a17 = nn.Conv2d(w, w, (1, 7), padding=(0, 3))
        self.a71 = nn.Conv2d(w, w, (7, 1), padding=(3, 0))
        self.dil = nn.Conv2d(w, w, 3, padding=2, dilation=2)
        self.fuse = nn.Conv2d(2 * w, w, 1, bias=True)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = torch.relu(self.a71(torch.relu(self.a17(x))))
        b = torch.relu(self.dil(x))
        x = torch.relu(x + self.fuse(torch.cat([a, b], 1)))
        return self.head(torch.relu(self.down(x)).mean((2, 3)))


class NaNOnce(nn.Module):
    """``inner``, except that its ``at``-th forward in training mode returns NaN logits (once)."""

    def __init__(self, inner: nn.Module, at: int):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out * torch.nan
        return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scaled_factor_step_moves_w_as_far_as_the_dense_step():
    """With singular values above 1 the unscaled SVD step moves W several times as far as SGD on W would;
    scaled, at most about 3× (the U, s and V steps each at most the dense one)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(4 / torch.linalg.matrix_norm(conv.weight.reshape(16, -1), ord=2))  # s_max = 4
    layer = SVDConv2d.from_dense(conv)
    x = torch.randn(4, 16, 8, 8)
    target = torch.randn(4, 16, 8, 8)
    weight = conv.weight.detach().clone().requires_grad_()
    F.mse_loss(F.conv2d(x, weight, conv.bias, padding=1), target).backward()
    dense_step = weight.grad.norm()

    def w_step(scaled: bool) -> float:
        layer.zero_grad()
        F.mse_loss(layer(x), target).backward()
        if scaled:
            scale_factor_grads([layer])
        lr = 1e-4  # small: the step's first-order part
        with torch.no_grad():
            w0 = layer.dense_weight()
            w1 = ((layer.U - lr * layer.U.grad) * (layer.s - lr * layer.s.grad)) @ (layer.V - lr * layer.V.grad)
            return ((w1.reshape(w0.shape) - w0).norm() / lr / dense_step).item()

    plain, scaled = w_step(False), w_step(True)
    assert plain > 8  # 2·s²+1 = 33 along the top direction
    assert scaled < 3.1


class Mixed(OwnNet):
    """OwnNet with a BatchNorm after the 1×7, the 7×1 and the dilated conv (none after the stem and the fuse)."""

    def __init__(self):
        super().__init__()
        self.n17, self.n71, self.ndil = nn.BatchNorm2d(16), nn.BatchNorm2d(16), nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = torch.relu(self.n71(self.a71(torch.relu(self.n17(self.a17(x))))))
        b = torch.relu(self.ndil(self.dil(x)))
        x = torch.relu(x + self.fuse(torch.cat([a, b], 1)))
        return self.head(torch.relu(self.down(x)).mean((2, 3)))


@pytest.mark.parametrize("model,auto", [
    (OwnNet, ["stem", "a17", "a71", "dil", "fuse", "down"]),
    (Mixed, ["stem", "fuse", "down"]),
    (lambda: create_model("cifar_resnet20", num_classes=10), []),  # a BatchNorm after every conv: the paper's nets train as before
])
def test_auto_scales_the_layers_no_normalization_follows(model, auto):
    net = decompose(model(), "channel")
    names = {id(layer): name for name, layer in svd_layers(net)}
    x = torch.zeros(2, 3, 8, 8)
    assert [names[id(layer)] for layer in factor_layers(net, "auto", x)] == auto
    assert len(factor_layers(net, True, x)) == len(names) and factor_layers(net, False, x) == []
    assert net.training  # the forward that looked ran in eval mode and left the mode as it was


def test_an_orthogonality_runaway_stops_the_epoch_naming_the_layer_and_changes_no_weight():
    """λ_o = −1 pushes the factors apart: the term grows step by step until it passes the limit."""
    torch.manual_seed(0)
    model = decompose(OwnNet(), "channel")
    with torch.no_grad():
        dict(svd_layers(model))["dil"].U.mul_(2)  # UᵀU = 4·I: off orthonormal, below the limit
    reference = copy.deepcopy(model)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(10, (8,))) for _ in range(12)]
    apart = Loss(ortho=-1.0)
    with pytest.raises(NonFiniteLoss, match=r"orthogonality term ran away to .* at step (\d+) of the epoch .*farthest from orthonormal: dil") as e:
        train_one_epoch(model, data, build_optimizer(model.parameters(), PhaseConfig(lr=1.0)), apart, CPU,
                        limits=Limits(ortho=1.0), log_every=4)
    assert (e.value.reason, e.value.layer) == ("ortho", "dil") and 1 < e.value.step < 12
    # the weights are those the diverged step saw: the steps before it, and no more
    train_one_epoch(reference, data[: e.value.step - 1], build_optimizer(reference.parameters(), PhaseConfig(lr=1.0)), apart, CPU)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_net_without_batchnorm_trains_through_the_svd_phase_at_the_quickstart_lr(tiny_recipe, tmp_path):
    """The quickstart's SVD learning rate, on the net above: no non-finite step, no divergence, no recovery."""
    quickstart = load_recipe("recipes/quickstart.toml")
    r = load_recipe(tiny_recipe(f"phases.dense.lr={quickstart.phases.dense.lr}", f"phases.svd.lr={quickstart.phases.svd.lr}",
                                "phases.dense.epochs=2", "phases.svd.epochs=2", "phases.finetune.epochs=0", "data.image_size=16",
                                "reg.compile=false"))
    torch.manual_seed(0)
    result = run_recipe(r, tmp_path / "r", model=OwnNet())
    svd = [m for m in metrics(tmp_path / "r") if m["phase"] == "svd"]
    assert len(svd) == 2 and not any("recovery" in m for m in svd)
    assert all(math.isfinite(m[k]) for m in svd for k in ("loss", "ce", "ortho", "val_loss"))
    assert max(m["ortho"] for m in svd) < 0.05 * len(svd_layers(decompose(OwnNet(), "channel")))  # far below the limit
    assert "recoveries" not in result.summary["phases"]["svd"]


def test_a_nonfinite_step_rolls_the_epoch_back_lowers_the_lr_and_is_recorded(tiny_recipe, tmp_path):
    r = load_recipe(tiny_recipe("phases.dense.epochs=0", "phases.svd.epochs=2", "phases.finetune.epochs=1", "reg.compile=false"))
    steps = math.ceil(r.data.train_size / r.data.batch_size)
    torch.manual_seed(0)
    # the SVD phase is the first that trains: its epoch 2, step 3 is the (steps + 3)-th training forward
    result = run_recipe(r, tmp_path / "r", model=NaNOnce(OwnNet(), at=steps + 3))
    lines = metrics(tmp_path / "r")
    recovery = [m for m in lines if "recovery" in m]
    lr = r.phases.svd.lr
    assert recovery == [{"phase": "svd", "epoch": 2, "recovery": 1, "step": 3, "reason": "nonfinite", "layer": recovery[0]["layer"],
                         "lr_before": lr, "lr": lr * r.train.recovery_lr_factor}]
    assert recovery[0]["layer"] in dict(svd_layers(decompose(NaNOnce(OwnNet(), 0), "channel")))  # the one farthest from orthonormal
    svd = {m["epoch"]: m for m in lines if m["phase"] == "svd" and "recovery" not in m}
    assert svd[1]["lr"] == lr and svd[2]["lr"] == lr * r.train.recovery_lr_factor  # epoch 2 trained again, at the lower rate
    assert all(math.isfinite(svd[e][k]) for e in (1, 2) for k in ("loss", "val_loss"))
    assert result.summary["phases"]["svd"]["recoveries"] == recovery
    assert "finetune" in result.summary["phases"]  # the run went on to the end
    # the train table the CLI prints: the svd row says so
    console = Console(width=200, record=True)
    console.print(summary_table(result.summary))
    svd_row = next(line for line in console.export_text().splitlines() if line.strip(" │|").startswith("svd"))
    assert f"1 (lr → {lr * r.train.recovery_lr_factor:.3g})" in svd_row


def test_recoveries_are_bounded_then_the_error_says_so(tiny_recipe, tmp_path):
    r = load_recipe(tiny_recipe("phases.dense.epochs=0", "phases.svd.lr=1e30", "train.recoveries=2", "reg.compile=false"))
    with pytest.raises(NonFiniteLoss, match=r"svd phase, epoch 1: loss became nan at step \d+ .*2 recoveries at a lower learning rate did not help"):
        run_recipe(r, tmp_path / "r")
    recovery = [m for m in metrics(tmp_path / "r") if "recovery" in m]
    assert [m["recovery"] for m in recovery] == [1, 2]
    assert [m["lr"] for m in recovery] == [1e30 * 0.5, 1e30 * 0.25]


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the schedule is stepped without training
@pytest.mark.parametrize("schedule", ["constant", "cosine", "multistep"])
def test_a_lowered_lr_survives_the_schedule_and_a_resume(schedule):
    cfg = PhaseConfig(lr=0.1, schedule=schedule, epochs=4, milestones=[2])
    model = nn.Linear(3, 2)

    def phase():
        opt = build_optimizer(model.parameters(), cfg)
        sched = build_scheduler(opt, cfg)
        return opt, sched, Rollback(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), 0.5, 3)

    opt, sched, rollback = phase()
    reference, ref_sched, _ = phase()
    rollback.save(EpochState())
    old, new, _ = rollback.restore()
    assert (old, new, rollback.used) == (0.1, 0.05, 1)
    for _ in range(3):
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"] * 0.5)
    # a resume rebuilds optimizer and schedule, replays the schedule, loads the saved state (pipeline._resume_training)
    resumed, res_sched, res_rollback = phase()
    for _ in range(3):
        res_sched.step()
    load_optimizer_state(resumed, opt.state_dict())
    res_rollback.resumed()
    sched.step(), res_sched.step(), ref_sched.step()
    assert resumed.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert resumed.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"] * 0.5)
    assert res_rollback.used == 1
