"""Data parallelism for ``tilewise train --dist ddp|fsdp``: PyTorch's DDP and FSDP2 (``fully_shard``), one process
per device, launched by torchrun; gloo on the CPU, NCCL on CUDA.

    torchrun --nproc-per-node 2 -m tilewise train --dist ddp     # or --dist fsdp

- The batch is global: ``batch_size`` sequences per micro-batch over all ranks. Every rank draws the same windows
  from the same generator and keeps rows ``[rank·b, (rank+1)·b)``, ``b = batch_size / world_size``, so the ranks
  see disjoint slices whose union is the batch one process sees. A run therefore follows one process's loss
  trajectory (up to the fp32 summation order of the gradient all-reduce) and resumes on any number of ranks.
- Rank 0 alone writes the run directory and prints; the losses it logs are means over all ranks.
- Checkpoints hold full, unsharded state keyed by parameter name (:mod:`torch.distributed.checkpoint.state_dict`),
  the same files one process writes; under FSDP they are gathered to rank 0's CPU (``full_state_dict=True,
  cpu_offload=True``), and on resume every rank reads them and keeps its shard.
- Without torchrun (no ``RANK`` in the environment) ``--dist`` runs as a group of one process.

Another number of ranks reads the same checkpoint; with 8- or 4-bit optimizer state under FSDP the state is laid
out per shard, in 256- (128-) element blocks, so that works where every shard holds whole blocks (the tiny model
on 2, 4 or 8 ranks does). A parameter whose first dim does not split evenly keeps its quantized state local to
each rank, where no full checkpoint can gather it: the trainer refuses that setting up front.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DIST_MODES",
    "Dist",
    "full_state",
    "full_value",
    "init_distributed",
    "load_full_state",
    "no_sync",
    "shutdown",
    "wrap_model",
]

DIST_MODES = ("ddp", "fsdp")
"""Names for ``TrainConfig.dist``: ``DistributedDataParallel`` (replicated) and FSDP2 ``fully_shard`` (sharded)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``mode`` (None: one plain process), ``rank`` of ``world_size``.

    ``owns_group``: :func:`init_distributed` created the process group, so :func:`shutdown` destroys it.
    """

    mode: str | None = None
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` (a multiple of ``world_size``)."""
        per = batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over all ranks (an all-reduce in fp64); ``value`` itself in one process."""
        if self.world_size == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        return float(total) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(mode: str | None, device: torch.device) -> tuple[Dist, torch.device]:
    """Join (or create) the process group for ``mode``; returns this process's :class:`Dist` and its device.

    On CUDA each rank takes ``cuda:LOCAL_RANK`` (a device given without an index). A group that already exists
    (initialized by the caller) is used as it is.

    Raises:
        ValueError: an unknown mode, or a torch built without ``torch.distributed``.
    """
    if mode is None:
        return Dist(), device
    if mode not in DIST_MODES:
        raise ValueError(f"dist must be one of {', '.join(DIST_MODES)} (or None), got {mode!r}")
    dist = torch.distributed
    if not dist.is_available():
        raise ValueError(f"dist={mode!r} needs torch.distributed, which this torch build lacks; train without it")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        if "RANK" in os.environ:  # launched by torchrun: the env:// rendezvous
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    return Dist(mode, dist.get_rank(), dist.get_world_size(), owns), device


def shutdown(ctx: Dist) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(model: torch.nn.Module, ctx: Dist, device: torch.device) -> torch.nn.Module:
    """``model`` under DDP, or sharded in place by FSDP2: each block of ``model.layers`` one unit, then the root
    (embedding, final norm, head). Build the optimizer after this: FSDP2 replaces parameters with DTensors."""
    if ctx.mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if ctx.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ctx.world_size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def no_sync(model: torch.nn.Module, ctx: Dist, last: bool) -> contextlib.AbstractContextManager:
    """Under DDP, skip the gradient all-reduce of every micro-batch but the ``last`` one of a step."""
    if ctx.mode == "ddp" and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def full_value(t: torch.Tensor) -> float:
    """A scalar tensor's value; a DTensor's (FSDP2's gradient norm) is first reduced over the ranks."""
    full = getattr(t, "full_tensor", None)
    return float(full() if callable(full) else t)


def _options(ctx: Dist) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sharded = ctx.mode == "fsdp"
    return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Dist) -> tuple[dict, dict]:
    """``(model state, optimizer state)``, unsharded and keyed by parameter name (DDP's ``module.`` prefix gone).

    Under FSDP this is a collective (every rank must call it) and the result lies on rank 0's CPU (empty dicts on
    the other ranks). With no optimizer state yet, torch initializes it with a zero-learning-rate step.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(ctx)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    ctx: Dist,
) -> None:
    """Load :func:`full_state`'s dicts (every rank passes the whole of them; under FSDP each keeps its shard).

    An optimizer state keyed by parameter index (``optimizer.state_dict()``, as checkpoints before ``--dist``
    held) loads with ``optimizer.load_state_dict`` when the model is not sharded.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(ctx)
    set_model_state_dict(model, model_state, options=options)
    if ctx.mode != "fsdp" and all(isinstance(k, int) for k in optimizer_state["state"]):
        optimizer.load_state_dict(optimizer_state)
    else:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
