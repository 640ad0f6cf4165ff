"""Data-parallel training with PyTorch DDP, launched by torchrun (one or many nodes).

The class-balanced sampler forms the same global batch on every rank and gives each rank a contiguous
share, so a run depends on the global batch, not on the process count. The objective is what DDP wraps.
The base loss and its miner see the global batch through pytorch-metric-learning's
``DistributedLossWrapper`` / ``DistributedMinerWrapper``; the language term is computed on the global
B x B matrix from embeddings gathered by pytorch-metric-learning's ``gather``. Both gather the other
ranks' embeddings without gradient, so each rank's backward gives d(global loss)/d(its own embeddings);
DDP then averages the ranks' parameter gradients, which is why those two terms are scaled by the world
size for the backward (the sum over ranks is the gradient of the global loss). Per-sample terms
(diversity) need neither gather nor scale. Rank 0 alone writes checkpoints, logs and the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from stages.core.runtime import launched_by_torchrun


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device_type: str) -> Context:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); one process otherwise."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context()
    import torch.distributed as dist

    ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def device_for(ctx: Context, device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK); the CPU stays the CPU."""
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.distributed else device


def world_size() -> int:
    """Processes in the DDP group (1 outside one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_all(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch on every rank (this rank's rows first, with gradient; the others' without)."""
    from pytorch_metric_learning.utils import distributed as pml_dist

    all_x, all_labels, _ = pml_dist.gather(x, labels)
    return all_x, all_labels


def gather_rows(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order, this rank's own with their gradient (the
    others' without); the ranks may hold different numbers of rows. With contiguous shares of one global
    batch, the result is that global batch in its own order, so a loss over it is the one-process loss.
    (pytorch-metric-learning's ``gather`` needs equal sizes and puts the own rows first.)"""
    if not ctx.distributed:
        return x
    import torch.distributed as dist

    count = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    rows = [part[:n] for part, n in zip(parts, sizes, strict=True)]
    rows[ctx.rank] = x
    return torch.cat(rows)


def gather_objects(obj: object, ctx: Context) -> list[object]:
    """One picklable object from every rank, in rank order (rank 0's RNG state, rank 1's, ...)."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
