"""Launch helpers shared by the Triton ops (imported only where Triton is).

- :func:`dot_args`: the ``tl.dot`` operand dtype and input precision for an input dtype and device.
- :func:`first_that_fits`: launch the first of several configurations that fits the GPU's shared memory,
  remembering per key which one did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton.language as tl
from triton.runtime import OutOfResources

__all__ = ["dot_args", "first_that_fits"]


def dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    """``{"DOT": operand dtype, "PREC": input precision}`` for ``tl.dot``: the input dtype on a GPU (fp32 as IEEE
    fp32, not TF32); fp32 in Triton's interpreter, whose bf16 dot multiplies bit patterns as integers."""
    if device.type != "cuda" or dtype == torch.float32:
        return {"DOT": tl.float32, "PREC": "ieee"}
    return {"DOT": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PREC": "tf32"}


def first_that_fits(cache: dict, key: Any, configs: Sequence, launch: Callable[[Any], None]) -> Any | None:
    """Launch with the first of ``configs`` that fits the GPU, starting from the one that fitted last time for
    ``key`` in ``cache``; return it, or ``None`` when none does. ``OutOfResources`` (shared memory over the device's
    limit) is raised at launch, before the kernel runs, so a failed try writes nothing. ``None`` cannot be a
    configuration: it would read as "none fitted" (block-sparse attention's ``(None, 2, 1)`` stage list once made
    its caller launch every kernel a second time)."""
    if any(c is None for c in configs):
        raise ValueError("first_that_fits: None is not a configuration (its return value means none fitted)")
    start = cache.get(key, 0)
    for i in range(start, len(configs)):
        try:
            launch(configs[i])
        except OutOfResources:
            continue
        cache[key] = i
        return configs[i]
    cache[key] = len(configs)
    return None
