"""Multi-process helpers for runs launched with ``torchrun`` or ``accelerate launch``.

Both launchers describe the job in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); a plain ``python``/``memgen`` run has none of them and is
rank 0 of 1, so every helper here is a no-op there. Typical use::

    dist = init()                      # process group only when WORLD_SIZE > 1
    mine = shard(work, dist.rank, dist.world_size)
    parts = gather_to_main(result)     # list on rank 0 (one entry per rank), None elsewhere
    finish()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (0, 1, 0 without one)."""
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def device_for_rank(device: str, local_rank: int | None = None) -> str:
    """Give each process its own GPU: ``auto``/``cuda`` become ``cuda:<LOCAL_RANK>`` when
    several processes run and CUDA is visible; anything else is returned unchanged."""
    local_rank = info().local_rank if local_rank is None else local_rank
    if info().enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def init(backend: str | None = None) -> DistInfo:
    """Join the process group when the launcher started several processes.

    ``backend`` defaults to ``gloo``, which moves Python objects and CPU tensors and works
    on any machine; pass ``nccl`` for GPU collectives (training with DDP). Calling it twice
    is harmless.
    """
    dist = info()
    if dist.enabled and not torch_dist.is_initialized():
        backend = backend or "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dist.local_rank)
        torch_dist.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
    return dist


def finish() -> None:
    """Leave the process group (if this process joined one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` on.

    Strided, so shares differ in length by at most one and each rank gets a mix of the list.

    >>> shard(list(range(7)), 1, 3)
    [1, 4]
    """
    dist = info()
    rank = dist.rank if rank is None else rank
    world_size = dist.world_size if world_size is None else world_size
    return list(items[rank::world_size])


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` (picklable) as a list in rank order on rank 0; None on the others.

    Without a process group it returns ``[obj]``.
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    out = [None] * world_size if rank == 0 else None
    torch_dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (for values only rank 0 computes, e.g. a timestamp)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
