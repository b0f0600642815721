"""Data parallelism on ``torch.distributed``: which rank this is, its shard of the work, and sums across ranks.

A run launched by ``torchrun --nproc-per-node N -m dormant ...`` (``WORLD_SIZE > 1``) joins one process group in
:func:`launched` (gloo for CPU runs, nccl for CUDA runs); every other run is one process and every function here
is then the identity (:func:`all_reduce_sum_` returns its tensor untouched, :func:`shard` returns everything).
The verbs that stream windows shard them with :func:`shard` (contiguous, in rank order) and sum what they
accumulated with :func:`all_reduce_sum_`; integer histograms sum exactly, so thresholds equal those of one process
over the same windows. Only the main rank (:func:`is_main`) writes files or shows progress.

The ground layer: no domain knowledge; torch is imported inside the functions, so ``import dormant`` stays light.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["requested_world", "local_rank", "launched", "world", "rank", "is_main", "shard", "shard_range",
           "describe_shards", "all_reduce_sum_", "gather_cat", "barrier"]

T = TypeVar("T")


def requested_world() -> int:
    """The world size ``torchrun`` asked for (``WORLD_SIZE``; 1 when not launched by it)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 when not launched by ``torchrun``)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@contextmanager
def launched(backend: str = "gloo", cuda_device: int | None = None) -> Iterator[int]:
    """Join the process group for the enclosed work when launched with ``WORLD_SIZE > 1``; yields the world size.

    Args:
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
        cuda_device: the CUDA device this rank works on (nccl); default ``LOCAL_RANK``.

    A single process (no ``torchrun``, or ``--nproc-per-node 1``) initialises nothing. A group already initialised
    by the caller is used as it is and left for the caller to destroy.
    """
    import torch
    import torch.distributed as dist

    if requested_world() <= 1 or _dist() is not None:
        yield world()
        return
    if backend == "nccl":
        torch.cuda.set_device(local_rank() if cuda_device is None else cuda_device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    try:
        yield dist.get_world_size()
    finally:
        dist.destroy_process_group()


def world() -> int:
    """Number of ranks in the process group (1 without one)."""
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0)."""
    return rank() == 0


def shard_range(n: int, of_rank: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of rank ``of_rank``'s contiguous share of ``n`` items (the first ``n % world`` ranks get
    one more); this rank's by default."""
    w, r = world(), rank() if of_rank is None else of_rank
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items`` (a list, a tensor's first dimension, ...): all of them in one
    process. Shares follow rank order, so concatenating them in rank order gives ``items`` back."""
    start, stop = shard_range(len(items))
    return items[start:stop]


def describe_shards(n: int) -> dict[str, Any]:
    """What a record says of a sharded pass over ``n`` items: ``{"world_size", "rank_windows": [[start, stop], ...]}``
    (``{}`` in one process, so single-process records are unchanged)."""
    if world() <= 1:
        return {}
    return {"world_size": world(), "rank_windows": [list(shard_range(n, r)) for r in range(world())]}


def _backend_device():
    import torch

    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor):
    """Sum ``tensor`` over all ranks, in place (any device: it travels to the backend's device and back); returns
    it. The identity in one process."""
    d = _dist()
    if d is None:
        return tensor
    dev = _backend_device()
    if tensor.device == dev and tensor.is_contiguous():
        d.all_reduce(tensor, op=d.ReduceOp.SUM)
        return tensor
    buf = tensor.to(dev).contiguous()
    d.all_reduce(buf, op=d.ReduceOp.SUM)
    tensor.copy_(buf)
    return tensor


def gather_cat(values):
    """The 1-D tensors ``values`` of every rank concatenated in rank order (on every rank; lengths may differ).

    With :func:`shard`'s contiguous shares this restores the per-item order of one process, so a mean taken over
    the result is the very mean one process takes. Built from two sums: the lengths, then the zero-padded values.
    """
    import torch

    if world() <= 1:
        return values
    sizes = torch.zeros(world(), dtype=torch.int64)
    sizes[rank()] = values.numel()
    all_reduce_sum_(sizes)
    offset = int(sizes[: rank()].sum())
    full = torch.zeros(int(sizes.sum()), dtype=values.dtype)
    full[offset : offset + values.numel()] = values.detach().flatten().cpu()
    return all_reduce_sum_(full)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    d = _dist()
    if d is not None:
        d.barrier()
