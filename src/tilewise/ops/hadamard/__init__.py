"""Orthonormal fast Walsh-Hadamard transform along the last dimension (Sylvester ordering).

The spec is ``reference.py`` (math in README.md beside it); ``triton.py`` is the GPU path, loaded only when the
Triton backend is chosen.
"""

from __future__ import annotations

import os

import torch

from tilewise._backend import ENV_VAR, resolve_backend
from tilewise.ops.hadamard.reference import hadamard_ref

__all__ = ["MAX_N", "hadamard"]

MAX_N = 32768
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (float32, float16 or bfloat16), got {x.dtype}; cast it first")
    if x.dim() == 0:
        raise ValueError(
            "x must have at least one dimension (the transform runs along the last one), got a 0-dim tensor"
        )
    n = x.shape[-1]
    if n < 1 or n > MAX_N or n & (n - 1):
        raise ValueError(
            f"the last dimension of x must be a power of two between 1 and {MAX_N}, got {n} (shape {tuple(x.shape)}); "
            "zero-pad it to the next power of two or split it into blocks"
        )


def hadamard(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of ``x`` along its last dimension.

    ``y = x @ H_n / sqrt(n)`` with ``H_n`` the Sylvester Hadamard matrix (``H_2n = [[H_n, H_n], [H_n, -H_n]]``),
    computed in fp32 and returned in ``x``'s dtype. The transform is symmetric and orthonormal, so it is its own
    inverse (``hadamard(hadamard(x)) == x`` up to rounding) and preserves norms. Differentiable; the gradient
    is the transform of the incoming gradient.

    Args:
        x: ``[..., n]`` float32, float16 or bfloat16 tensor (float64 on the reference backend), ``n`` a power of
            two in ``[1, 32768]``; any leading shape, including empty.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports, else the PyTorch reference),
            ``"triton"`` or ``"reference"``. The ``TILEWISE_BACKEND`` environment variable overrides ``"auto"``.

    Returns:
        ``[..., n]`` tensor of ``x``'s dtype and shape.

    Raises:
        TypeError: ``x`` is not a floating tensor, or is float64 with ``backend="triton"``.
        ValueError: ``x`` is 0-dim, or its last dimension is not a power of two in ``[1, 32768]``.
        RuntimeError: ``backend="triton"`` cannot run on ``x`` (see :func:`tilewise._backend.resolve_backend`).

    Example:
        >>> import torch
        >>> from tilewise.ops import hadamard
        >>> x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
        >>> hadamard(x)
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
        >>> torch.allclose(hadamard(hadamard(x)), x)
        True
    """
    _check(x)
    chosen = resolve_backend(backend, x)
    if chosen == "triton" and x.dtype not in _TRITON_DTYPES:
        if backend == "triton" or os.environ.get(ENV_VAR, "").strip():
            raise TypeError(
                f"the Triton backend supports float32, float16 and bfloat16, got {x.dtype}; use 'reference'"
            )
        chosen = "reference"
    if chosen == "reference":
        return hadamard_ref(x)
    from tilewise.ops.hadamard.triton import hadamard_triton

    return hadamard_triton(x)
