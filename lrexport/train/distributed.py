"""Distributed setup in one call, as torchvision's references do: torchrun's env or one process."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a small CPU tensor of statistics over ranks (identity in one process)."""
        if not self.enabled:
            return t
        dev = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        out = t.to(dev)
        dist.all_reduce(out)
        return out.cpu()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a small picklable value; identity in one process)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), else one process.

    nccl on GPUs, gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if not d.enabled:
        return flag
    return bool(d.all_sum(torch.tensor([float(flag)])).item() > 0)


class _GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span every process, for CPU (gloo) process groups.

    torch's SyncBatchNorm runs on GPUs only; without this, two CPU processes would each
    normalise over half the global batch and drift from a one-process run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype)
        with warnings.catch_warnings():  # its deprecation names a private successor; keep the public API
            warnings.simplefilter("ignore", FutureWarning)
            # two passes (mean, then squared deviations) as BatchNorm does: E[x²] − E[x]² cancels badly
            stats = dist_nn.all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
            n = stats[-1]
            mean = stats[:c] / n
            centred = x - mean[None, :, None, None]
            var = dist_nn.all_reduce((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.0
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                self.num_batches_tracked += 1
        y = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def sync_batchnorm(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Make BatchNorm statistics global over processes (in place; parameter names unchanged)."""
    if not d.enabled:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _GlooSyncBatchNorm  # same state, global statistics
    return model
