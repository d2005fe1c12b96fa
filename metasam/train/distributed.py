"""Data-parallel meta-training under torchrun: joining the process group, and who does what.

``torchrun --nproc-per-node N [--nnodes M ...] -m metasam train ...`` starts W = N·M processes and puts
WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address (MASTER_ADDR, MASTER_PORT) in each one's
environment. :func:`join` reads them. Without them (or with WORLD_SIZE=1) the run is a single process and
no process group is created. Otherwise the process joins the default group, NCCL for ``--device cuda``
(process r then uses GPU LOCAL_RANK) and gloo for the CPU, and the trainer:

- gives each process tasks i ≡ RANK (mod W) of every meta-batch (:meth:`Processes.share`): the union over
  processes is the meta-batch one process would draw for that seed; the learner's
  :class:`~metasam.meta.distributed.ProcessGroupReducer` sums meta-gradients and metrics over processes;
- copies rank 0's weights to every process before training, after a start or a resume;
- makes every process stop after the same iteration when any of them gets SIGINT or SIGTERM;
- writes files (config, metrics, checkpoints, summaries) and shows progress bars from rank 0 only;
- leaves the group together at the end of a command that succeeded (:func:`leave`).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metasam.errors import ConfigError
from metasam.meta.distributed import ProcessGroupReducer


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run: rank ``rank`` of ``world_size`` (1: a single process).

    ``device`` is where the tensors of collectives live: "cuda" (this process's GPU) under NCCL, else "cpu".
    """

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @cached_property
    def reducer(self) -> ProcessGroupReducer | None:
        """The learner's reducer over the default process group; None for a single process."""
        return None if self.world_size == 1 else ProcessGroupReducer()

    def share(self, tasks: range) -> range:
        """This process's tasks of a meta-batch: the reducer's share, those i with i ≡ rank (mod W)."""
        return tasks if self.reducer is None else self.reducer.share(tasks)

    def broadcast_weights(self, model: nn.Module, *more: Tensor) -> None:
        """Copy rank 0's parameters and buffers of ``model``, and the tensors ``more`` (a learner's learned inner
        step sizes), into every process's (in place)."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in (*model.state_dict().values(), *more):
                dist.broadcast(tensor, src=0)

    def agree_on_signal(self, signum: int | None) -> int | None:
        """The stop signal received by any process (the largest number; None if none did), the same on all
        processes, so that all of them leave the training loop after the same iteration."""
        if self.world_size == 1:
            return signum
        flag = torch.tensor(signum or 0, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def join(device: str = "cpu", meta_batch: int | None = None) -> Processes:
    """Join the torchrun job this process was started in, or return a single process.

    Reads WORLD_SIZE, RANK and LOCAL_RANK. ``device`` "cpu" → gloo; "cuda" → NCCL on GPU LOCAL_RANK
    (made the current device). ``meta_batch``: the tasks per outer step, at least one per process.
    The process group is created once per process and destroyed when it exits.
    """
    rank, world_size = launched_as()
    if world_size == 1:
        return Processes()
    local_rank = _env_int("LOCAL_RANK")
    if meta_batch is not None and meta_batch < world_size:
        raise ConfigError(
            f"--meta-batch {meta_batch} is smaller than the {world_size} processes: each process needs at least one "
            "task of every meta-batch; raise --meta-batch or start fewer processes"
        )
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process (without torchrun)")
    if device == "cpu":
        backend = "gloo"
    elif device == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process with LOCAL_RANK={local_rank} needs GPU {local_rank}, but {torch.cuda.device_count()} are "
                "visible; start at most that many processes per node (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        raise ConfigError(
            f"--device {device} under torchrun: pass --device cuda (process r uses GPU LOCAL_RANK) or --device cpu"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
        atexit.register(_destroy)  # on an error; a command that succeeds calls leave()
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ConfigError(
            f"the process group already initialised in this process is rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but the environment says RANK={rank}, WORLD_SIZE={world_size}"
        )
    return Processes(rank, world_size, "cuda" if backend == "nccl" else "cpu")


def leave() -> None:
    """End this process's part of a torchrun job whose command succeeded: wait until every process is done with
    the process group (a barrier: rank 0 may still be writing checkpoints when the others finish), then destroy
    it in every process together, as PyTorch asks (torch.distributed's "Shutdown" docs). Each process destroying
    the group alone at exit, while rank 0 could still be writing, is the likely cause (not proven) of a rare
    abort of a gloo child at exit. Nothing happens outside torchrun."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process of the torchrun job gets here (nothing outside torchrun): after rank 0 alone
    wrote a file that the others read next."""
    if dist.is_initialized():
        dist.barrier()


def _destroy() -> None:
    """At exit after an error (no barrier: the other processes may never reach one; torchrun stops them)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def main_process() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def launched_as() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process in the torchrun job that started it; (0, 1) outside torchrun.
    Reads the environment only (no process group is joined); values torchrun would not set raise
    :class:`ConfigError`."""
    world_size = _env_int("WORLD_SIZE", default=1)
    if world_size == 1:
        return 0, 1
    rank = _env_int("RANK")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"WORLD_SIZE={world_size} and RANK={rank} do not describe a process of a job; launch with torchrun")
    return rank, world_size


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name, "")
    if not value:
        if default is None:
            raise ConfigError(f"WORLD_SIZE is set but {name} is not: launch the processes with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} in the environment is not an integer (torchrun sets it)") from None
