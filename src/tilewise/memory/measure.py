"""Measured peak memory of a training step, in the categories of :mod:`tilewise.memory.estimate`.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on the CPU (no allocator statistics) it is tensor
accounting: parameter, gradient and optimizer-state bytes, plus the unique storages that autograd saves for
backward while ``fn`` runs (``torch.autograd.graph.saved_tensors_hooks``). DTensor parameters and optimizer state
(FSDP2) count their local shards: the bytes this process holds.

Example:
    >>> import torch
    >>> from tilewise.memory import Recipe, estimate, format_comparison, measure_peak
    >>> from tilewise.nn import build_model
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("tiny")
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> idx = torch.randint(0, 256, (2, 16))
    >>> def step():
    ...     model(idx, targets=idx).backward()  # with targets: the mean cross-entropy
    ...     opt.step()
    >>> measured = measure_peak(step, model=model, optimizer=opt)
    >>> predicted = estimate("tiny", Recipe(batch_size=2, seq_len=16, device="cpu"))
    >>> print(format_comparison(predicted.as_dict(), measured, measured_other=False))
    category          predicted MiB   measured MiB  measured/predicted
    weights                    3.50           3.50                1.00
    gradients                  3.50           3.50                1.00
    optimizer_state            7.01           7.01                1.00
    activations                1.47           1.47                1.00
    other                     64.00            n/a                   -
    total w/o other           15.49          15.49                1.00
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from tilewise.memory.estimate import CATEGORIES

__all__ = ["SavedTensorCounter", "format_comparison", "measure_peak", "tensor_bytes"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2, tensor parallel); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once).

    Example:
        >>> import torch
        >>> from tilewise.memory import tensor_bytes
        >>> a = torch.zeros(1024)  # 4 KiB of fp32
        >>> tensor_bytes([a, a[:10], a.view(32, 32)])  # three views of one storage
        4096
        >>> tensor_bytes([a, torch.zeros(10, dtype=torch.bfloat16), torch.zeros(8, device="meta")])  # meta: none
        4116
    """
    seen: dict[tuple[str, int], int] = {}
    for t in map(_local, tensors):
        if t.device.type != "meta" and t.numel():
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager summing the distinct storages autograd saves for backward, parameters excluded.

    ``nbytes`` is, over the forward passes run inside the context, the largest total saved by one of them: what
    is held for backward at the end of that forward. A forward begins at the first save after a backward has
    started reading saved tensors, so gradient-accumulation micro-batches count once, not summed; saves made
    inside a backward (a reentrant checkpoint's recomputation) add to the pass they belong to.

    Not counted: ``exclude``'s storages, parameters and views of parameters (FSDP2's gathered weights are
    parameters while a block runs), and what ``torch.utils.checkpoint(use_reentrant=False)`` keeps: its own
    hooks replace these inside a checkpointed region.

    Example:
        >>> import torch
        >>> from tilewise.memory import SavedTensorCounter
        >>> w = torch.nn.Parameter(torch.randn(64, 64))
        >>> x = torch.randn(32, 64)
        >>> counter = SavedTensorCounter()
        >>> with counter:
        ...     for _ in range(2):  # two micro-batches: each saves x for x @ w and tanh's output (w: a parameter)
        ...         torch.tanh(x @ w).sum().backward()
        >>> counter.nbytes == 2 * 32 * 64 * 4  # one forward's worth, not the two summed
        True
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {_storage_key(t) for t in map(_local, exclude)}
        self._seen: dict[tuple[str, int], int] = {}
        self._peak = 0
        self._unpacked = False
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._unpacked and torch._C._current_graph_task_id() == -1:  # a new forward, after a backward
            self._peak, self._seen, self._unpacked = self.nbytes, {}, False
        local = _local(t)
        is_weight = isinstance(local, torch.nn.Parameter) or isinstance(local._base, torch.nn.Parameter)
        if local.device.type != "meta" and not is_weight:
            key = _storage_key(local)
            if key not in self._exclude:
                self._seen.setdefault(key, local.untyped_storage().nbytes())
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self._unpacked = True
        return t

    @property
    def nbytes(self) -> int:
        return max(self._peak, sum(self._seen.values()))


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
        ``weights``, ``gradients``, ``optimizer_state``, ``activations`` (distinct storages saved for backward by
        the largest forward pass: see :class:`SavedTensorCounter`), ``other`` (on CUDA: the measured peak minus the
        four, at least 0; 0 on the CPU, where nothing measures it) and ``peak`` (on the CPU: the sum of the four).

    Example:
        >>> import torch
        >>> from tilewise.memory import measure_peak
        >>> model = torch.nn.Linear(256, 256)  # 65,792 fp32 parameters: 263,168 bytes
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # one momentum buffer per parameter
        >>> x = torch.randn(8, 256)
        >>> def step():
        ...     model(x).square().mean().backward()  # saves x (for the weight's gradient) and square's input
        ...     opt.step()
        >>> measure_peak(step, model=model, optimizer=opt)
        {'weights': 263168, 'gradients': 263168, 'optimizer_state': 263168, 'activations': 16384, 'other': 0,
         'peak': 805888}
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


def format_comparison(
    predicted: Mapping[str, int] | None,
    measured: Mapping[str, int],
    *,
    markdown: bool = False,
    measured_other: bool = True,
) -> str:
    """Predicted beside measured bytes per category in MiB, and their ratio; the last row compares the totals.

    Args:
        predicted: bytes per category of :data:`~tilewise.memory.estimate.CATEGORIES`, e.g.
            ``Breakdown.as_dict()``; its ``total`` (else the categories' sum) is the predicted peak. None: no
            prediction (cells read ``-``).
        measured: :func:`measure_peak`'s dict; its ``peak`` is the measured peak.
        markdown: a Markdown table (for a report) instead of aligned text.
        measured_other: False where ``other`` is not measured (the CPU): that cell reads ``n/a`` and the last row
            compares the totals without it.

    Example:
        >>> from tilewise.memory import format_comparison
        >>> MiB = 2**20
        >>> predicted = {"weights": 4 * MiB, "gradients": 4 * MiB, "optimizer_state": 8 * MiB, "activations": 16 * MiB}
        >>> predicted["other"] = 64 * MiB
        >>> measured = dict(predicted, activations=12 * MiB, other=0, peak=28 * MiB)
        >>> print(format_comparison(predicted, measured, measured_other=False))
        category          predicted MiB   measured MiB  measured/predicted
        weights                    4.00           4.00                1.00
        gradients                  4.00           4.00                1.00
        optimizer_state            8.00           8.00                1.00
        activations               16.00          12.00                0.75
        other                     64.00            n/a                   -
        total w/o other           32.00          28.00                0.88
        >>> print(format_comparison(None, measured, markdown=True).splitlines()[-1])  # no prediction
        | total (peak) | - | 28.00 | - |
    """
    rows: list[tuple[str, int | None, int | None]] = []
    for c in CATEGORIES:
        rows.append((c, predicted[c] if predicted else None, measured[c] if c != "other" or measured_other else None))
    total = predicted.get("total", sum(predicted[c] for c in CATEGORIES)) if predicted else None
    if measured_other:
        rows.append(("total (peak)", total, measured["peak"]))
    else:  # compare like with like: the measured peak then holds no `other`
        rows.append(("total w/o other", None if total is None else total - predicted["other"], measured["peak"]))
    cells = [("category", "predicted MiB", "measured MiB", "measured/predicted")]
    for name, pred, meas in rows:
        ratio = f"{meas / pred:.2f}" if meas is not None and pred else "-"
        pred_text = "-" if pred is None else f"{pred / 2**20:,.2f}"
        cells.append((name, pred_text, "n/a" if meas is None else f"{meas / 2**20:,.2f}", ratio))
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "| --- | ---: | ---: | ---: |")
        return "\n".join(lines)
    return "\n".join(f"{a:<16} {b:>14} {c:>14} {d:>19}" for a, b, c, d in cells)
