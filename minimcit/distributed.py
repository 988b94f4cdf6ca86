"""Data parallelism across processes with torch.distributed, started by torchrun.

    torchrun --nproc_per_node 2 run.py --method branchlora --tasks minicoin

Every process holds the whole model and the same adapters. A training step's micro-batches are
dealt out across processes, the gradients of the trainable tensors are summed with all_reduce
(gloo on CPU, NCCL on GPU), and every process takes the same optimiser step, so the flags give
the same optimisation at any world size: the global batch is batch_size x grad_accum samples.

Why not the DistributedDataParallel wrapper: its reducer syncs the parameters of the wrapped
module's forward, while here the step is `Llava.loss` and two method losses read tensors outside
the model (the task selector's keys for L_align, LiLoRA's B0 snapshot for L_reg). Summing the
trainable gradients once per step is what DDP does with no_sync over the accumulation steps,
without that coupling. Without torchrun (WORLD_SIZE unset) everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device) -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank(), world_size()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (a no-op alone)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(params) -> None:
    """Sum every trainable tensor's gradient over processes, in one flat buffer. A process that saw
    no micro-batch this step contributes zeros."""
    if not active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def gather(obj) -> list:
    """Every process's `obj`, in rank order (alone: [obj])."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
