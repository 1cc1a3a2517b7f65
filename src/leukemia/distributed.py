"""Rank, world size and collectives for jobs started as several processes by torchrun or SLURM's srun.

The train and predict jobs never start processes themselves. An external launcher starts
every process (rank) from the beginning of the command and passes each its rank in the
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` for torchrun,
``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NNODES`` for srun.
``init_distributed`` reads them with Lightning's own cluster environments, so the job and
Lightning's Trainer agree on every rank, and joins the process group (gloo for CPU
processes, NCCL for GPUs) before any data is touched, so the job can split the work and
wait at barriers before training. Lightning's DDP strategy then reuses that process group.

Every helper works unchanged in a single process: rank 0 of a world of one, where barriers
do nothing and a gather returns the one local value.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes a launcher started.

    Attributes:
        rank: global rank, 0 to ``size - 1``; rank 0 writes every output file.
        size: number of processes on all nodes.
        local_rank: rank on this node; the GPU index a process uses.
        local_size: processes on this node.
        launcher: "torchrun", "slurm", or "none" for a single process.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str = "none"

    @property
    def num_nodes(self) -> int:
        return max(1, self.size // self.local_size)


def launcher_world() -> World:
    """Return the world a launcher set up in the environment, or a world of one process.

    SLURM is checked first, as Lightning does, so both always pick the same launcher.

    Raises:
        RuntimeError: torchrun runs inside a SLURM job step with another process count,
            where Lightning would follow SLURM's count and the ranks would disagree.
    """
    if "SLURM_NTASKS" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return World()
    # Imported here: most single-process commands (predict) never need Lightning.
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    torchrun = TorchElasticEnvironment.detect()
    if SLURMEnvironment.detect():
        ntasks = int(os.environ["SLURM_NTASKS"])
        if torchrun and ntasks != int(os.environ["WORLD_SIZE"]):
            raise RuntimeError(
                f"torchrun started {os.environ['WORLD_SIZE']} processes inside a SLURM job step of {ntasks} task(s); "
                "Lightning follows SLURM there, so the processes would not agree on their ranks. Launch one task "
                "per process with srun instead (srun --ntasks-per-node N leukemia train ...), without torchrun"
            )
        nodes = int(os.environ.get("SLURM_NNODES", "1"))
        return World(
            rank=int(os.environ["SLURM_PROCID"]),
            size=ntasks,
            local_rank=int(os.environ["SLURM_LOCALID"]),
            local_size=max(1, ntasks // nodes),
            launcher="slurm",
        )
    if torchrun:
        size = int(os.environ["WORLD_SIZE"])
        return World(
            rank=int(os.environ["RANK"]),
            size=size,
            local_rank=int(os.environ["LOCAL_RANK"]),
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", size)),
            launcher="torchrun",
        )
    return World()


def init_distributed(*, device_type: str) -> World:
    """Join the launcher's process group when it started more than one process; return the world.

    Call it once at the start of a job, before any data is read. Nothing happens in a single
    process or when the process group already exists.

    Args:
        device_type: "cuda" joins with NCCL and binds this process to GPU ``local_rank``;
            "cpu" joins with gloo.

    Raises:
        RuntimeError: see ``launcher_world``; or this node has fewer GPUs than processes.
    """
    world = launcher_world()
    if world.size == 1 or dist.is_initialized():
        return world

    environment = _cluster_environment(world)
    # Lightning's environments fill in MASTER_ADDR and MASTER_PORT (SLURM: the first node of
    # the job and a port from the job ID), which init_process_group reads.
    os.environ["MASTER_ADDR"] = environment.main_address
    os.environ["MASTER_PORT"] = str(environment.main_port)
    options = {}
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"process {world.local_rank} on this node needs GPU {world.local_rank}, but only "
                f"{torch.cuda.device_count()} are visible; start at most that many processes per node, or pass "
                "--device cpu"
            )
        torch.cuda.set_device(world.local_rank)
        options["device_id"] = torch.device("cuda", world.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, **options)
    atexit.register(_destroy)
    logger.info("process %d of %d (%s, %s backend, node-local rank %d)",
                world.rank, world.size, world.launcher, backend, world.local_rank)
    return world


def local_device(device: str) -> str:
    """Return ``device`` with this process's GPU index when it names CUDA in a multi-process job.

    "auto" and "cuda" become "cuda:<local rank>" under a launcher, so each process of a node
    runs on its own GPU; anything else is returned unchanged.
    """
    world = launcher_world()
    if world.size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{world.local_rank}"


def rank() -> int:
    """Return this process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Return the number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Return whether this process is rank 0, the one that writes every output file."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here; return at once in a single process."""
    if world_size() > 1:
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """Return this process's share of ``items``: every ``world_size``-th item from position ``rank``."""
    return list(items[rank()::world_size()])


def gather_shards(mine: Sequence[T]) -> list[T]:
    """Collect the lists each process made from its ``shard`` and return them merged in the original order.

    Every process gets the whole merged list. It waits until every process has its share ready.
    """
    if world_size() == 1:
        return list(mine)
    shards = gather_objects(list(mine))
    merged: list[T] = []
    for position in range(sum(len(part) for part in shards)):
        merged.append(shards[position % len(shards)][position // len(shards)])
    return merged


def gather_objects(value: T) -> list[T]:
    """Return the values of every process, in rank order, on every process (pickled on the way)."""
    if world_size() == 1:
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def on_main(function: Callable[..., T], *args, **kwargs) -> T:
    """Run ``function`` on rank 0 alone; return its result on every process, or raise its error on every process.

    The other processes wait meanwhile. Sharing the error, rather than letting rank 0 fail
    alone, ends every process with the same message instead of leaving the others at their
    next collective call.
    """
    if world_size() == 1:
        return function(*args, **kwargs)
    outcome: list = [None, None]
    if is_main():
        try:
            outcome = [function(*args, **kwargs), None]
        except Exception as error:
            outcome = [None, _picklable(error)]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome
    if error is not None:
        raise error
    return result


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    return error


def _cluster_environment(world: World):
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment() if world.launcher == "slurm" else TorchElasticEnvironment()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
