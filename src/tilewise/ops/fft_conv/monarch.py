"""FFT convolution as products of small DFT matrices (Monarch / four-step FFT), in plain PyTorch.

A length-``L`` DFT with ``L = N1 * M`` is ``F_N1`` along the strided axis, a pointwise twiddle, then a length-``M``
DFT along the contiguous axis (recursively, down to one matmul of size <= ``_DIRECT``). Its output is in a
permuted ("digit-reversed") order; the kernel's spectrum is computed in the same order and the inverse undoes
it, so the convolution never needs the natural order. Complex numbers are ``(re, im)`` pairs of real tensors
and every product is a real matmul. README.md has the index algebra. The DFT matrices and twiddles, also used
by ``triton.py``, are built in float64 from exact integer angles and cached per ``(size, device)``.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["dft_matrix", "fft_conv_monarch", "fft_length", "twiddle"]

# Largest DFT applied as one matmul; longer ones are split into factors of at most this size.
_DIRECT = 256
# Largest factor in a split (log2).
_MAX_FACTOR_LOG2 = 7

Pair = tuple[torch.Tensor, torch.Tensor]


def fft_length(n: int, minimum: int = 1) -> int:
    """Transform length for a causal convolution of length ``n``: the smallest power of two ``>= 2n`` (and
    ``>= minimum``), so the circular convolution of the zero-padded signals does not wrap."""
    return max(minimum, 1 << max(0, (2 * n - 1).bit_length()))


def _unit_roots(index: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """``[2, *index.shape]`` fp32 (re, im) of ``exp(-2 pi i index / n)``; ``index`` int64, reduced mod n first."""
    angle = (index % n).to(torch.float64) * (-2.0 * math.pi / n)
    return torch.stack((torch.cos(angle), torch.sin(angle))).to(device=device, dtype=torch.float32)


@functools.cache
def dft_matrix(n: int, device: torch.device) -> torch.Tensor:
    """``[2, n, n]`` fp32 (re, im) of the DFT matrix ``F_n[j, k] = exp(-2 pi i j k / n)`` (symmetric)."""
    o = torch.arange(n, dtype=torch.int64)
    return _unit_roots(o[:, None] * o[None, :], n, device)


@functools.cache
def twiddle(n1: int, n2: int, device: torch.device) -> torch.Tensor:
    """``[2, n1, n2]`` fp32 (re, im) of ``T[k1, j2] = exp(-2 pi i k1 j2 / (n1 n2))``."""
    o1, o2 = torch.arange(n1, dtype=torch.int64), torch.arange(n2, dtype=torch.int64)
    return _unit_roots(o1[:, None] * o2[None, :], n1 * n2, device)


def _split(length: int) -> int:
    """First factor ``N1`` of ``length = N1 * M`` (powers of two): factors as even as ``_MAX_FACTOR_LOG2`` allows."""
    p = length.bit_length() - 1
    levels = -(-p // _MAX_FACTOR_LOG2)
    return 1 << -(-p // levels)


def _cmul(a: Pair, b: Pair, conj_b: bool = False) -> Pair:
    br, bi = b[0], -b[1] if conj_b else b[1]
    return a[0] * br - a[1] * bi, a[0] * bi + a[1] * br


def _dft_last(x: Pair, f: torch.Tensor, conj: bool) -> Pair:
    """``x @ F`` (or ``x @ conj(F)``) along the last axis; ``f`` is ``[2, n, n]``."""
    fr, fi = f[0], -f[1] if conj else f[1]
    return x[0] @ fr - x[1] @ fi, x[0] @ fi + x[1] @ fr


def _forward(x: Pair) -> Pair:
    """DFT along the last axis (length ``L``, a power of two) into the permuted order; ``x`` is complex."""
    length = x[0].shape[-1]
    if length <= _DIRECT:
        return _dft_last(x, dft_matrix(length, x[0].device), conj=False)
    n1 = _split(length)
    m = length // n1
    xr, xi = x[0].unflatten(-1, (n1, m)), x[1].unflatten(-1, (n1, m))
    f = dft_matrix(n1, xr.device)
    # F_N1 along the strided axis: [N1, N1] @ [..., N1, M].
    b = (f[0] @ xr - f[1] @ xi, f[0] @ xi + f[1] @ xr)
    t = twiddle(n1, m, xr.device)
    c = _forward(_cmul(b, (t[0], t[1])))
    return c[0].flatten(-2), c[1].flatten(-2)


def _inverse(c: Pair) -> Pair:
    """Unnormalized inverse of :func:`_forward`: permuted spectrum -> natural-order signal (times ``L``)."""
    length = c[0].shape[-1]
    if length <= _DIRECT:
        return _dft_last(c, dft_matrix(length, c[0].device), conj=True)
    n1 = _split(length)
    m = length // n1
    d = _inverse((c[0].unflatten(-1, (n1, m)), c[1].unflatten(-1, (n1, m))))
    t = twiddle(n1, m, d[0].device)
    d = _cmul(d, (t[0], t[1]), conj_b=True)
    f = dft_matrix(n1, d[0].device)
    y = (f[0] @ d[0] + f[1] @ d[1], f[0] @ d[1] - f[1] @ d[0])
    return y[0].flatten(-2), y[1].flatten(-2)


def _forward_real(x: torch.Tensor, length: int) -> Pair:
    """:func:`_forward` of the real ``x [..., n]`` zero-padded to ``length``, skipping the zero rows of the
    first factor: with ``t = M j1 + j2``, rows ``j1 >= ceil(n / M)`` of the ``[N1, M]`` view are all zero."""
    n = x.shape[-1]
    if length <= _DIRECT:
        f = dft_matrix(length, x.device)[:, :n]
        return x @ f[0], x @ f[1]
    n1 = _split(length)
    m = length // n1
    rows = -(-n // m)
    xv = torch.nn.functional.pad(x, (0, rows * m - n)).unflatten(-1, (rows, m))
    f = dft_matrix(n1, x.device)[:, :, :rows]
    t = twiddle(n1, m, x.device)
    c = _forward(_cmul((f[0] @ xv, f[1] @ xv), (t[0], t[1])))
    return c[0].flatten(-2), c[1].flatten(-2)


def _inverse_real(c: Pair, n: int) -> torch.Tensor:
    """Real part of :func:`_inverse`, first ``n`` samples only (the rows of the last factor that hold them)."""
    length = c[0].shape[-1]
    if length <= _DIRECT:
        f = dft_matrix(length, c[0].device)[:, :, :n]
        return c[0] @ f[0] + c[1] @ f[1]
    n1 = _split(length)
    m = length // n1
    rows = -(-n // m)
    d = _inverse((c[0].unflatten(-1, (n1, m)), c[1].unflatten(-1, (n1, m))))
    t = twiddle(n1, m, d[0].device)
    d = _cmul(d, (t[0], t[1]), conj_b=True)
    f = dft_matrix(n1, d[0].device)[:, :rows]
    # Re(conj(F) D) = Fr Dr + Fi Di
    return (f[0] @ d[0] + f[1] @ d[1]).flatten(-2)[..., :n]


def fft_conv_monarch(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution as :func:`~tilewise.ops.fft_conv.reference.fft_conv_ref`, with every DFT a
    product of small DFT matrices (fp32 math; matmul precision follows ``torch.backends``). Differentiable
    through torch's autograd.

    Args:
        u: ``[B, H, N]`` floating tensor.
        k: ``[H, N]`` kernel.
        skip: optional ``[H]`` weight of ``skip[h] * u``.

    Returns:
        ``[B, H, N]`` tensor of ``u``'s dtype.
    """
    n = u.shape[-1]
    length = fft_length(n)
    uf, kf = u.float(), k.float()
    # 1/L of the inverse folded into the kernel's spectrum.
    kr, ki = _forward_real(kf, length)
    spectrum = _cmul(_forward_real(uf, length), (kr / length, ki / length))
    y = _inverse_real(spectrum, n)
    if skip is not None:
        y = y + skip.float()[:, None] * uf
    return y.to(u.dtype)
