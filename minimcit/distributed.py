"""Data parallelism across processes with torch.distributed, started by torchrun.

    torchrun --nproc_per_node 2 run.py --method branchlora --tasks minicoin

Every process holds the whole model and the same adapters. A training step's micro-batches are
dealt out across processes, the gradients of the trainable tensors are summed with all_reduce
(gloo on CPU, NCCL on GPU), and every process takes the same optimiser step, so the flags give
the same optimisation at any world size: the global batch is batch_size x grad_accum samples.

NCCL takes only tensors on the process's own GPU, where gloo takes CPU tensors too, so a
collective given a CPU tensor works in every CPU test and stops a GPU run at its first step.
Every collective here therefore goes through `_on_group`, which places its tensor on the
group's device (cuda:LOCAL_RANK under NCCL, cpu under gloo) and back; the loop builds its own
collective tensors on the run's device, so on a GPU nothing is copied.
tests/test_nccl_rule.py declares the group's device to be `meta`, which no CPU tensor is on,
and checks every collective of a training stage against it.

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

_device = torch.device("cpu")  # the process group's device; set by init


def init(device) -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched more than one process."""
    global _device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            _device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(_device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank(), world_size()


def _on_group(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the group's device: itself when it is already there, else a copy."""
    return tensor if tensor.device == _device else tensor.to(_device)


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
    """Rank 0; under torchrun also after the process group is gone (an interrupt's message)."""
    return (rank() if active() else int(os.environ.get("RANK", 0))) == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (a no-op alone), on the group's device whatever `tensor`'s."""
    if active():
        buf = _on_group(tensor)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
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
    flat = sum_(torch.cat([p.grad.reshape(-1) for p in params]))
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
