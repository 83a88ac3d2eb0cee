"""Orthonormal fast Walsh-Hadamard transform in plain PyTorch: the spec the Triton kernel is tested against.

``y = x @ H_n / sqrt(n)`` along the last dimension, with ``H_n`` the Sylvester Hadamard matrix
(``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``), computed as log2(n) butterfly stages (see README.md).
"""

from __future__ import annotations

import torch

__all__ = ["hadamard_ref"]


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of ``x`` along its last dimension, in fp32 (fp64 stays fp64).

    Args:
        x: ``[..., n]`` floating tensor, ``n`` a power of two; any device.

    Returns:
        ``[..., n]`` tensor of ``x``'s dtype: ``x @ H_n / sqrt(n)``.
    """
    n = x.shape[-1]
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, n)
    rows = y.shape[0]
    h = 1
    while h < n:
        # Stage with stride h: pairs (i, i + h) inside each block of 2h become (a + b, a - b).
        pairs = y.view(rows, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(rows, n)
        h *= 2
    return (y * n**-0.5).view(x.shape).to(x.dtype)
