"""Two processes on the CPU (gloo) through `lrexport train --nproc 2` against one process."""

import json
import sys

import pytest
import torch

import lrexport

# A gentle learning rate keeps one- and two-process training within rounding of each other
# (at 0.05 the chaotic early steps amplify the order of float sums to percent-level differences).
GENTLE = ["seed=1", "reg.decay=0.1", "phases.dense.lr=0.002", "phases.svd.lr=0.002", "phases.finetune.lr=0.0002"]


def train(cli, recipe, out, *extra):
    proc = cli("train", recipe, "--output", out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return summary, [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_two_processes_match_one_with_the_same_global_batch(tiny_recipe, cli, tmp_path):
    recipe = tiny_recipe(*GENTLE)
    one, one_lines = train(cli, recipe, tmp_path / "one")
    two, two_lines = train(cli, recipe, tmp_path / "two", "--nproc", "2")
    assert (one["processes"], two["processes"]) == (1, 2)
    # Same global batch and BatchNorm statistics synchronised: the runs differ only in the order of
    # floating-point sums (test_two_processes_take_the_same_steps shows it step by step), so every
    # epoch's training and validation loss agree to 0.3 % and the pruned ranks to one per layer.
    # Only rank 0 wrote: one metrics line per epoch.
    assert [(l["phase"], l["epoch"]) for l in two_lines] == [(l["phase"], l["epoch"]) for l in one_lines] == [
        ("dense", 1), ("svd", 1), ("finetune", 1)]
    for a, b in zip(one_lines, two_lines):
        assert (b["loss"], b["val_loss"]) == pytest.approx((a["loss"], a["val_loss"]), rel=3e-3), (a, b)
    assert set(one["ranks"]) == set(two["ranks"])
    assert all(abs(one["ranks"][k]["final"] - two["ranks"][k]["final"]) <= 1 for k in one["ranks"])
    # one set of files, no temporary leftovers
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    leftovers = [p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.suffix != ".pt"]
    assert not leftovers


def _steps(rank, world, port, out):
    """Two SGD steps of a BatchNorm ResNet, sharded over ``world`` gloo processes."""
    import torch.distributed as dist

    from lrexport.train.distributed import Dist, sync_batchnorm

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = lrexport.create_model("cifar_resnet20", num_classes=10)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(sync_batchnorm(model, Dist(rank, world), torch.device("cpu")))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(32, 3, 16, 16, generator=gen), torch.randint(10, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(trained(x[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out)
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_take_the_same_steps(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _steps(0, 1, port, tmp_path / "one.pt")
    mp.spawn(_steps, args=(2, port, tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    for name in one:
        assert torch.allclose(one[name].float(), two[name].float(), rtol=1e-4, atol=1e-6), name
