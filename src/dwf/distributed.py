"""Data-parallel training under `torchrun` (DDP): one process per GPU (NCCL), or gloo on CPU.

Every rank holds the same seeded generator, so every rank draws the same data order,
augmentation and attack budgets and builds the same global batch; each then takes its own
contiguous shard. Attacks are per-example, so crafting on shards equals crafting on the whole
batch; DistributedDataParallel averages the shards' gradients, and BatchNorm in train mode
normalizes with the statistics of the global batch (`batch_norm`). So N processes make the
update 1 process makes on the same global batch (tests/test_distributed.py). Rank 0 alone
writes files.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, metrics and progress."""
        return self.rank == 0

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (the size must divide evenly)."""
        n = len(t) // self.size
        return t[self.rank * n:(self.rank + 1) * n]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over all ranks (t itself with one process)."""
        if self.size > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t


def shardable(recipe):
    """Mark a training recipe as safe to run on shards of the global batch.

    A recipe is shardable when its output for each example depends only on that example and on
    per-batch draws (an eps, an iteration count), not on the batch size or on draws shaped like
    the batch: then the shards' outputs are the whole batch's. DWF's recipes are; PGD-AT with a
    random start (noise shaped like the shard) or FGSM-AT's attacked fraction are not.
    """
    recipe.shardable = True
    return recipe


def require_shardable(recipes, world: World) -> None:
    """Refuse data-parallel training with a recipe that is not `shardable` (ValueError)."""
    if world.size == 1:
        return
    for recipe in recipes:
        if not getattr(recipe, "shardable", False):
            name = getattr(recipe, "__name__", repr(recipe))
            raise ValueError(f"{name} does not give the same batch on shards of the global batch; "
                             "run it as one process (data-parallel training supports DWF's recipes)")


def same_on_all_ranks(value: int, world: World, device: torch.device) -> bool:
    """Whether every rank holds the same integer (n * sum(v^2) == sum(v)^2 iff all equal)."""
    t = world.sum(torch.tensor([value, value * value], dtype=torch.float64, device=device))
    return bool(world.size * t[1] == t[0] * t[0])


def world() -> World:
    """The current World: torch.distributed's if initialized, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def _env_int(name: str, default: int | None, low: int, high: int | None = None) -> int:
    """An integer torchrun puts in the environment, in low..high-1 (ValueError naming it)."""
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set although WORLD_SIZE > 1 "
                             "(start data-parallel training with torchrun)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (torchrun "
                         "sets it; unset WORLD_SIZE to run as one process)") from None
    if value < low or (high is not None and value >= high):
        raise ValueError(f"environment variable {name}={value} is outside {low}.."
                         f"{'' if high is None else high - 1}")
    return value


def world_size() -> int:
    """How many processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1, low=1)


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*).

    Without torchrun (WORLD_SIZE unset or 1) nothing is initialized. On CUDA each process
    takes the GPU of its local rank and NCCL; on CPU, gloo. The integers torchrun sets are
    checked before any of them is used (a ValueError naming the variable).
    Returns:
        the World and the device this process trains on.
    """
    size = world_size()
    if size <= 1:
        return World(), device
    _env_int("RANK", None, low=0, high=size)  # read again by init_process_group
    local_rank = _env_int("LOCAL_RANK", 0, low=0, high=size)
    if device.type == "cuda":  # before the group exists, so NCCL binds this process's GPU
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world(), device


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients (each rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, training: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """F.batch_norm, with train-mode statistics taken over the global batch of all ranks.

    Per-channel sums are added over ranks by a differentiable all-reduce, first for the mean,
    then for the centred sum of squares (two passes, as exact as BatchNorm's own variance when
    a channel's mean is large against its spread), so the backward pass carries every rank's
    share of the statistics' gradient, as one process on the whole batch would. With one
    process this is F.batch_norm itself.
    """
    size = world().size
    if not training or size == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    c, xf = x.shape[1], x.float()
    n = x.numel() / c * size  # shards are equal (fit checks the batch splits evenly)
    mean = _AllSum.apply(xf.sum((0, 2, 3))) / n
    centred = xf - mean.view(1, -1, 1, 1)
    var = _AllSum.apply((centred * centred).sum((0, 2, 3))) / n  # biased, as BatchNorm normalizes
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(momentum * mean)
        running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))  # unbiased, as BatchNorm
    scale = weight * torch.rsqrt(var + eps)
    return (centred * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).to(x.dtype)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics cover every rank's shard (`batch_norm`).

    torch's own SyncBatchNorm runs on GPUs only; this one runs wherever all-reduce does, so
    the equivalence test runs on CPU with gloo. Same parameters and buffers as BatchNorm2d, so
    checkpoints load into either.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world().size > 1):
            return super().forward(x)
        if self.momentum is None or not (self.affine and self.track_running_stats):
            raise ValueError("SyncBatchNorm2d needs a fixed momentum, affine and running statistics")
        self.num_batches_tracked.add_(1)
        return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                          self.momentum, self.eps)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of `model` in place by a SyncBatchNorm2d sharing its tensors."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
                sync.weight, sync.bias = child.weight, child.bias
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
                sync.train(child.training)
                setattr(parent, name, sync)
    return model
