"""Training on several processes with torch.distributed: ranks from the environment, the process group, agreement.

``volseg train`` needs no launcher of its own: started by ``torchrun --nproc_per_node N`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) or by ``srun`` under SLURM (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
``SLURM_LOCALID``, with ``MASTER_ADDR`` / ``MASTER_PORT`` exported by the job script), every process
reads its rank from the environment and joins one process group: NCCL on CUDA, gloo on the CPU. The
network is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, so gradients are averaged
over the ranks at every step; everything else that must be the same on every rank (whether a step is
taken, the learning rate's time-based progress, when to stop) is decided by an explicit collective in
:class:`DistContext`, never by each rank's own clock. In a single process every method here is the
identity and no process group exists.

A process that dies or errors ends the others: its peers' next collective fails at once (gloo) or
after ``train.distributed_timeout`` (a hung peer, NCCL), and torchrun (or ``srun --kill-on-bad-exit``)
stops the remaining ones. :func:`collective_failure` turns the backends' messages into one line.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

__all__ = ["DistContext", "collective_failure", "describe_failure", "env_ranks", "process_group"]

T = TypeVar("T")


def env_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process, from torchrun's or srun's environment.

    torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` win (``srun torchrun`` sets both); srun's
    ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID`` count only inside a job step:
    a batch script's own environment has ``SLURM_NTASKS`` of the whole allocation, which says
    nothing about how many processes run this command. ``(0, 1, 0)`` otherwise.

    Raises
    ------
    ConfigError
        A rank variable that is not a number, or a rank outside the world size.
    """
    env = os.environ if environ is None else environ
    names = (("RANK", "WORLD_SIZE", "LOCAL_RANK") if "RANK" in env and "WORLD_SIZE" in env
             else ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
    if names[0] not in env or names[1] not in env:
        return 0, 1, 0
    try:
        rank, world = int(env[names[0]]), int(env[names[1]])
        local = int(env.get(names[2], rank))
    except ValueError:
        raise ConfigError(f"{', '.join(f'{n}={env.get(n)!r}' for n in names)}: rank variables of the environment "
                          "are not integers; start the run with torchrun or srun") from None
    if not 0 <= rank < world:
        raise ConfigError(f"{names[0]}={rank} is outside {names[1]}={world}; start the run with torchrun or srun")
    return rank, world, local


@dataclass
class DistContext:
    """This process's place in the run (rank 0 of 1 without torch.distributed) and the collectives it needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process trains together."""
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        """Rank 0: the one that takes the output lock and writes the model, plots, metrics and checkpoint."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ---- collectives (identity in one process) ------------------------------------------------
    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (a CPU tensor; moved for NCCL and back)."""
        if self.enabled:
            work = tensor.cuda() if self.backend == "nccl" else tensor
            dist.all_reduce(work, op=dist.ReduceOp.SUM)
            if work is not tensor:
                tensor.copy_(work.cpu())
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.enabled:
            return bool(flag)
        return bool(self.all_sum(torch.tensor([float(bool(flag))], dtype=torch.float64)).item() > 0)

    def from_primary(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=torch.device("cuda") if self.backend == "nccl" else None)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a block on every rank; when it fails on any rank, it fails on all (no rank waits for a dead one).

        The rank where it failed raises its own error; the others raise a :class:`TrainingError`
        pointing to it.
        """
        failed: Exception | None = None
        try:
            yield
        except Exception as exc:  # re-raised below, once the other ranks know
            failed = exc
        if self.any(failed is not None) and failed is None:
            raise TrainingError(f"{self}: another process of this run failed while {what}; its message says why")
        if failed is not None:
            raise failed

    # ---- devices and the network ----------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """This rank's device: CUDA device ``LOCAL_RANK`` (modulo the visible ones) when ``device`` is CUDA."""
        if not self.enabled or device.type != "cuda":
            return device
        if device.index not in (None, 0) or torch.cuda.device_count() == 0:
            return device
        local = torch.device("cuda", self.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(local)
        return local

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` under DistributedDataParallel (a no-op in one process).

        ``static_graph``: smp encoders keep stages a shallow ``encoder_depth`` never runs, which plain
        DDP reports as unused parameters; a static graph copes with them without
        ``find_unused_parameters``' traversal of the graph at every step. Wrap again after changing
        which parameters train (the frozen-encoder phase), as DDP fixes that set when it is built.
        """
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def collective_failure(exc: BaseException, context: DistContext) -> bool:
    """Whether ``exc`` is a collective of a multi-process run failing (a peer died, hung or errored)."""
    if not context.enabled or not isinstance(exc, RuntimeError):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "broken pipe"))


def describe_failure(exc: BaseException) -> str:
    """The gist of a backend's error: its first line without the source location and the generic advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0]
    return text[:200]


@contextlib.contextmanager
def process_group(device: torch.device, timeout_minutes: float,
                  environ: Mapping[str, str] | None = None) -> Iterator[DistContext]:
    """Join the process group of a torchrun / srun launch for the block; a single process joins nothing.

    A process group that the caller already started (the API inside a user's own DDP script) is
    used as it is and left running.

    Raises
    ------
    ConfigError
        Launched by srun without ``MASTER_ADDR`` / ``MASTER_PORT`` (torchrun sets them).
    """
    if dist.is_available() and dist.is_initialized():
        yield DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                          dist.get_backend())
        return
    rank, world, local = env_ranks(environ)
    if world == 1:
        yield DistContext()
        return
    env = os.environ if environ is None else environ
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set: {world} processes (srun) cannot find rank 0; export "
                          "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) and "
                          "MASTER_PORT=29500 in the job script, or start the processes with torchrun "
                          "(examples/slurm_train.sh)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    context = DistContext(rank, world, local, backend)
    log.debug("%s (local rank %d, pid %d): joined the %s process group", context, local, os.getpid(), backend)
    clean = False
    try:
        yield context
        clean = True
    finally:
        if clean:  # after a failure a peer may be gone, and NCCL's clean-up would wait for it
            dist.destroy_process_group()
