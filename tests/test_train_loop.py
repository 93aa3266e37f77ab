"""The training loop reads the device only every log_every steps, and a NaN step changes no weight.

On a GPU each host read of a device value waits for the GPU; here, on the CPU, the reads are
counted by wrapping every Tensor method that hands a value to Python.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lrexport.lowrank import decompose
from lrexport.models import create_model
from lrexport.recipe import PhaseConfig
from lrexport.train.loop import (CudaGraphs, EpochState, Loss, NonFiniteLoss, Precision, build_optimizer, load_optimizer_state,
                                 train_one_epoch)

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
CPU = Precision(torch.device("cpu"))


def svd_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return decompose(create_model("cifar_resnet20", num_classes=10), "channel")


def batches(n: int, nan_at: int | None = None, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 8×8 images; batch ``nan_at`` (1-based) is all NaN."""
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(10, (size,), generator=g)) for _ in range(n)]
    if nan_at is not None:
        out[nan_at - 1] = (torch.full_like(out[nan_at - 1][0], float("nan")), out[nan_at - 1][1])
    return out


LOSS = Loss(ortho=1.0, sparsity_type="hoyer", decay=0.1)


@pytest.fixture
def count_reads(monkeypatch):
    """Counts calls of every Tensor method that gives a tensor's value to the host."""
    calls: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


@pytest.mark.parametrize("log_every,expected", [(4, 3), (5, 3), (1, 12), (50, 1)])
def test_host_reads_once_per_log_every_steps(count_reads, log_every, expected):
    model = svd_model()
    opt = build_optimizer(model.parameters(), PhaseConfig(lr=0.01))
    events = []
    del count_reads[:]  # building the model reads values; only the epoch counts
    stats = train_one_epoch(model, batches(12), opt, LOSS, CPU, log_every=log_every,
                            on_step=lambda step, steps, info: events.append((step, info["advance"])))
    reads = len(count_reads)
    assert reads == expected, count_reads  # 12 steps: reads at multiples of log_every and after the last
    assert [s for s, _ in events][-1] == 12 and sum(a for _, a in events) == 12 and len(events) == expected
    assert stats["images_per_s"] > 0 and 0 <= stats["train_top1"] <= 100 and stats["ortho"] > 0


def test_a_stop_happens_at_a_read_and_the_state_resumes_from_it():
    """should_stop is asked at reads only; the EpochState there continues to the same sums as one pass."""
    data = batches(10)
    whole_model, part_model = svd_model(), svd_model()
    whole = train_one_epoch(whole_model, data, build_optimizer(whole_model.parameters(), PhaseConfig(lr=0.01)), LOSS, CPU, log_every=3)
    opt = build_optimizer(part_model.parameters(), PhaseConfig(lr=0.01))
    state, asked = EpochState(), []
    assert train_one_epoch(part_model, data, opt, LOSS, CPU, state=state, log_every=3,
                           should_stop=lambda: asked.append(state.step) or True) is None
    assert asked == [3] and state.step == 3 and state.sums[5] == 24
    rest = train_one_epoch(part_model, data[3:], opt, LOSS, CPU, state=state, log_every=3)
    assert rest == pytest.approx(whole | {"images_per_s": rest["images_per_s"]}, rel=1e-12)
    for (name, a), b in zip(whole_model.state_dict().items(), part_model.state_dict().values()):
        assert torch.equal(a, b), name


def _plain_sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=False)  # no found_inf protocol


def _sgd(p):
    return build_optimizer(p, PhaseConfig(lr=0.01, momentum=0.9, weight_decay=5e-4))


@pytest.mark.parametrize("make_optimizer,scaled", [
    (_sgd, False),
    (lambda p: build_optimizer(p, PhaseConfig(optimizer="adam", lr=0.01, weight_decay=5e-4)), False),
    (_plain_sgd, False),
    (_sgd, True),
], ids=["fused-sgd", "fused-adam", "plain-sgd", "fused-sgd-gradscaler"])
def test_nan_step_and_later_steps_change_no_weight_and_the_next_read_names_it(make_optimizer, scaled):
    """Weight decay and momentum would move weights even with zero gradients: the whole update is skipped.

    "gradscaler": fp16's path (a GradScaler, here on the CPU), where the scaler skips the step.
    """
    model = svd_model()
    reference = copy.deepcopy(model)
    opt, ref_opt = make_optimizer(model.parameters()), make_optimizer(reference.parameters())
    scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=1.0)) if scaled else (lambda: None)
    data = batches(6, nan_at=3)
    events = []
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 3 of the epoch \(ce=nan, ortho=.*, sparsity=.*\)"):
        train_one_epoch(model, data, opt, LOSS, CPU, scaler(), log_every=6, on_step=lambda *a: events.append(a))
    assert events == []  # the read that raises comes before any progress
    train_one_epoch(reference, data[:2], ref_opt, LOSS, CPU, scaler())  # the two good steps only
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
        assert all(torch.equal(v, opt.state[p][k]) for k, v in ref_opt.state[q].items() if torch.is_tensor(v)), name


def test_an_old_non_fused_optimizer_state_loads_into_a_fused_optimizer():
    model = svd_model()
    old = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_one_epoch(model, batches(1), old, Loss(), CPU)
    new = build_optimizer(model.parameters(), PhaseConfig(lr=0.1))
    load_optimizer_state(new, old.state_dict())
    assert all(g["fused"] for g in new.param_groups) and len(new.state) == len(old.state)


def test_cuda_graphs_are_off_on_the_cpu_and_true_says_why():
    assert not CudaGraphs("auto", torch.device("cpu")).enabled
    assert not CudaGraphs(False, torch.device("cpu")).enabled
    with pytest.warns(UserWarning, match="cuda_graph = true, but the device is not a CUDA GPU"):
        graphs = CudaGraphs(True, torch.device("cpu"))
    model = svd_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager path, silently
        stats = train_one_epoch(model, batches(2), build_optimizer(model.parameters(), PhaseConfig(lr=0.01)), LOSS, CPU,
                                cuda_graphs=graphs)
    assert stats["loss"] > 0


def test_gpu_train_throughput_script_dry_run(tmp_path, capsys):
    """benchmarks/gpu/train_throughput.py's plumbing on the CPU: `lrexport train` on device-resident batches, timed between reads."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("lrexport_train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "report.json"
    module.main(["--dry-run", "--modes", "channel", "--steps", "6", "--workdir", str(tmp_path / "runs"), "--json", str(out)])
    assert "| model | plain loop | dense phase |" in capsys.readouterr().out
    row = json.loads(out.read_text())["models"]["cifar_resnet20"]
    for phase in ("dense", "svd"):
        r = row["channel"][phase]
        assert r["timed_steps"] == 4 and r["reads"] == 2 and r["images_per_s"] > 0, r  # reads at steps 2, 4, 6 of the last epoch
    assert row["plain"]["images_per_s"] > 0 and row["channel"]["warnings"] == []
