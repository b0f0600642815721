"""Run a function on two (or more) gloo ranks in spawned processes and bring rank 0's result back."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, fn: Callable[[], Any], path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from dormant import distributed

    with distributed.launched("gloo") as w:
        assert w == world and distributed.rank() == rank
        out = fn()
        if distributed.is_main():
            torch.save(out, path)


def on_ranks(fn: Callable[[], Any], tmp_path: Path, world: int = 2) -> Any:
    """``fn()`` run by ``world`` gloo ranks (``fn`` must be a module-level function); returns rank 0's result."""
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_rank, args=(world, _free_port(), fn, path), nprocs=world)
    return torch.load(path, weights_only=False)
