"""Measured peak memory of a training step, in the categories of :mod:`tilewise.memory.estimate`.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on the CPU (no allocator statistics) it is tensor
accounting: parameter, gradient and optimizer-state bytes, plus the unique storages that autograd saves for
backward while ``fn`` runs (``torch.autograd.graph.saved_tensors_hooks``).

Example:
    >>> def step():
    ...     model(idx, targets=idx).backward()
    ...     opt.step()
    >>> measure_peak(step, model=model, optimizer=opt)["activations"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["SavedTensorCounter", "measure_peak", "tensor_bytes"]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t.device.type != "meta" and t.numel():
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager summing the distinct storages autograd saves for backward, parameters excluded.

    ``nbytes`` is the total over everything saved inside the context: for a forward pass, what is held for
    backward at its end.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            key = _storage_key(t)
            if key not in self._exclude:
                self._seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def measure_peak(
    fn: Callable[[], Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
) -> dict[str, int]:
    """Run ``fn`` once and return its peak memory in bytes per category, plus ``"peak"``.

    Args:
        fn: the work to measure (e.g. forward + backward + optimizer step).
        model: its parameters and gradients give ``weights`` and ``gradients`` (read after ``fn``).
        optimizer: its state tensors give ``optimizer_state`` (read after ``fn``).
        device: ``"cuda"`` uses the CUDA allocator statistics; default: the model's device, else CPU.

    Returns:
        ``weights``, ``gradients``, ``optimizer_state``, ``activations`` (distinct storages saved for backward),
        ``other`` (on CUDA: the measured peak minus the four; 0 on the CPU) and ``peak``.
    """
    params = list(model.parameters()) if model is not None else []
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = SavedTensorCounter(exclude=params)
    with counter:
        fn()
    out = {
        "weights": tensor_bytes(params),
        "gradients": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_state": tensor_bytes(_optimizer_tensors(optimizer)),
        "activations": counter.nbytes,
    }
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out["other"] = max(peak - sum(out.values()), 0)
        out["peak"] = peak
    else:
        out["other"] = 0
        out["peak"] = sum(out.values())
    return out
