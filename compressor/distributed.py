"""Data-parallel profiling: one process per rank (``torchrun --nproc-per-node P``), calibration samples split
across ranks, influence sums all-reduced.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`from_env` joins that process group (gloo on CPU, nccl with one GPU per rank) and returns a
:class:`DataParallel`, or None in a plain single process. :func:`torchrun_command` is what
``compress profile --workers P`` runs. Only rank 0 writes files; every rank ends with the same sums, so every
rank returns the same profile.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from plans.errors import CompressError

TIMEOUT_S = 4 * 3600  # how long a rank waits for the others in a collective (a dead rank is torchrun's to notice)


@dataclass
class DataParallel:
    rank: int
    world: int
    local_rank: int
    backend: str  # gloo | nccl
    device: torch.device  # where this rank computes (and where nccl's collectives run)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The sum over ranks of each tensor (returned on the CPU, in the tensor's dtype)."""
        import torch.distributed as dist

        comm = torch.device("cpu") if self.backend == "gloo" else self.device
        out = []
        for t in tensors:
            x = t.detach().to(comm).contiguous().clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            out.append(x.cpu())
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (same shape and dtype everywhere)."""
        import torch.distributed as dist

        comm = torch.device("cpu") if self.backend == "gloo" else self.device
        x = t.detach().to(comm).contiguous().clone()
        dist.broadcast(x, src=0)
        return x.cpu()

    def same_everywhere(self, value: int) -> bool:
        """Whether every rank passed the same integer."""
        v = torch.tensor([value, -value], dtype=torch.int64)
        lo_hi = self.all_reduce_max(v)
        return int(lo_hi[0]) == value and int(-lo_hi[1]) == value

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        comm = torch.device("cpu") if self.backend == "gloo" else self.device
        x = t.detach().to(comm).contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x.cpu()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CompressError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def from_env() -> DataParallel | None:
    """Join the process group torchrun described in the environment (None when WORLD_SIZE is unset or 1)."""
    world = world_size_from_env()
    if world <= 1:
        return None
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise CompressError(f"rank {rank}: local rank {local} but only {torch.cuda.device_count()} GPUs; "
                                "run at most one worker per GPU")
        backend, device = "nccl", torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():  # a long timeout: the other ranks wait while rank 0 builds the calibration set
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S))
    return DataParallel(rank=rank, world=world, local_rank=local, backend=backend, device=device)


@contextmanager
def session():
    """``from_env()`` for the duration of the block; the process group is destroyed afterwards."""
    dp = from_env()
    try:
        yield dp
    finally:
        if dp is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def torchrun_command(workers: int, cli_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node P -m compressor.cli ARGS`` (a free
    rendezvous port on this machine, so several such runs can share it)."""
    if workers < 1:
        raise CompressError(f"--workers must be >= 1, got {workers}")
    if torch.cuda.is_available() and workers > torch.cuda.device_count():
        raise CompressError(f"--workers {workers}: only {torch.cuda.device_count()} GPUs here (one worker per GPU)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
            "-m", "compressor.cli", *cli_args]
