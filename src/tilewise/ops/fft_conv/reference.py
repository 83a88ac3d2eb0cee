"""Causal depthwise long convolution by FFT in plain PyTorch: the spec the fast paths are tested against.

``y[b, h, t] = sum_{s <= t} k[h, s] u[b, h, t - s] (+ skip[h] u[b, h, t])``, computed as a circular
convolution of length ``2N`` (zero padding makes it linear): ``rfft`` both, multiply, ``irfft``, keep the first
``N`` (see README.md). Autograd goes through ``torch.fft``.
"""

from __future__ import annotations

import torch

__all__ = ["fft_conv_ref"]


def fft_conv_ref(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution of ``u`` with ``k`` along the last dim, in fp32 (fp64 stays fp64).

    Args:
        u: ``[B, H, N]`` floating tensor; any device.
        k: ``[H, N]`` kernel, one per channel.
        skip: optional ``[H]`` weight of the direct term ``skip[h] * u[b, h, t]``.

    Returns:
        ``[B, H, N]`` tensor of ``u``'s dtype.
    """
    n = u.shape[-1]
    math_dtype = torch.promote_types(u.dtype, torch.float32)
    uf, kf = u.to(math_dtype), k.to(math_dtype)
    spectrum = torch.fft.rfft(uf, n=2 * n) * torch.fft.rfft(kf, n=2 * n)
    y = torch.fft.irfft(spectrum, n=2 * n)[..., :n]
    if skip is not None:
        y = y + skip.to(math_dtype)[:, None] * uf
    return y.to(u.dtype)
