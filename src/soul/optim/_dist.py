"""Tiny wrappers around torch.distributed so every caller works the same with and without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes in place (a no-op without a process group) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_async(tensor: torch.Tensor, op: str = "sum"):
    """Start an in-place all-reduce without blocking the host; returns a handle to `wait()` on, or None."""
    if not is_distributed():
        return None
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    return dist.all_reduce(tensor, op=reduce_op, async_op=True)
