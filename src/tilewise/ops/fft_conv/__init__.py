"""Causal depthwise long convolution by FFT (Hyena / H3 / S4-style long filters).

The spec is ``reference.py`` (math in README.md beside it). ``monarch.py`` is the same convolution with every DFT
a product of small DFT matrices, in PyTorch; ``triton.py`` runs those products on tensor cores (two passes with
float16 operands by default) and is loaded only when the Triton backend is chosen.
"""

from __future__ import annotations

import os

import torch

from tilewise._backend import ENV_VAR, resolve_backend
from tilewise.ops.fft_conv.reference import fft_conv_ref

__all__ = ["AUTO_TRITON_MIN_N", "MAX_TRITON_N", "fft_conv"]

# Longest N the Triton kernel convolves (a 2N-point transform in one program); must equal triton.MAX_FUSED_N.
MAX_TRITON_N = 8192
# Shortest N that backend="auto" sends to Triton. Both paths cost by the transform length L (the power of two
# >= 2N). H100, B=8 H=768, fp32 / bf16, forward and forward + backward against torch.fft (BENCHMARKS.md):
# N = 8192: 3.3x / 4.1x and 2.1x / 2.2x; N = 4096: 3.0x / 3.8x and 2.0x / 2.1x; N = 2048: 2.3x / 4.5x and
# 1.3x / 1.3x; N = 1024: 1.8x / 0.86x and 0.90x / 0.86x. At N = 2048 with B=4 (tilewise bench mixers, per-call
# timing that counts the host) forward + backward was 0.55x: the split path's ~10 launches a step dominate there.
# Eager calls without the custom op (2026-11-23, B=4 H=768, do_bench) left N = 2048 forward + backward host-bound:
# bf16 0.739 vs torch.fft's 0.929, fp32 0.983 vs 0.834 (~1.1 ms of host time a call, 0.34 ms of kernels).
# So auto starts at L = 8192.
AUTO_TRITON_MIN_N = 2049
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32 or bfloat16), got {t.dtype}; cast it first")
    return t


def _check(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None) -> None:
    _check_tensor("u", u)
    _check_tensor("k", k)
    if u.dim() != 3:
        raise ValueError(f"u must be [B, H, N] (3 dims), got shape {tuple(u.shape)}; add a batch dim with u[None]")
    _, h, n = u.shape
    if n < 1:
        raise ValueError(f"u must have a sequence length N >= 1, got shape {tuple(u.shape)}")
    if tuple(k.shape) != (h, n):
        raise ValueError(
            f"k must be [H, N] = [{h}, {n}] to match u {tuple(u.shape)}, got {tuple(k.shape)}; zero-pad a shorter "
            "kernel to N with torch.nn.functional.pad(k, (0, N - k.shape[-1]))"
        )
    if skip is not None:
        _check_tensor("skip", skip)
        if tuple(skip.shape) != (h,):
            raise ValueError(f"skip must be [H] = [{h}] (one weight per channel), got {tuple(skip.shape)}")
    tensors = (u, k) if skip is None else (u, k, skip)
    if len({t.device for t in tensors}) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in zip(("u", "k", "skip"), tensors, strict=False))
        raise ValueError(f"u, k and skip must be on one device, got {where}; move them with .to(u.device)")


def fft_conv(
    u: torch.Tensor, k: torch.Tensor, *, skip: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Causal depthwise convolution of ``u`` with one long kernel per channel, by FFT.

    ``y[b, h, t] = sum_{s <= t} k[h, s] u[b, h, t - s] + skip[h] u[b, h, t]`` (the skip term only when ``skip``
    is given), computed in fp32 and returned in ``u``'s dtype. Differentiable in ``u``, ``k`` and ``skip``.

    Args:
        u: ``[B, H, N]`` input, float32 or bfloat16 (float16 too; float64 on the reference backend). Any ``N >= 1``,
            not only powers of two; ``B`` or ``H`` may be 0.
        k: ``[H, N]`` kernel, any floating dtype; zero-pad a shorter kernel to ``N``.
        skip: optional ``[H]`` weight of the direct term (the ``D`` of an SSM).
        backend: ``"auto"`` (Triton on CUDA for ``AUTO_TRITON_MIN_N <= N <= MAX_TRITON_N``, where it measured
            faster; else the ``torch.fft`` reference),
            ``"triton"`` (CUDA, ``N <= MAX_TRITON_N``) or ``"reference"``. The Triton path computes the transforms
            with float16 products (~5e-4 relative error for fp32 I/O, README.md); on an H100 at
            ``B=8 H=768 N=8192`` it is 3.3x (fp32) / 4.1x (bf16) torch.fft's speed forward, 2.1-2.2x forward +
            backward (BENCHMARKS.md). ``TILEWISE_BACKEND=reference`` keeps ``"auto"`` on torch.fft. ``"auto"``
            assumes an eager call, where short rows wait on the host; in a CUDA graph pass ``"triton"``, which is
            faster from ``N = 512`` there (README.md).

    Returns:
        ``[B, H, N]`` tensor of ``u``'s dtype.

    Raises:
        TypeError: an argument is not a floating tensor, or is float64 with ``backend="triton"``.
        ValueError: shapes do not match (``u [B, H, N]``, ``k [H, N]``, ``skip [H]``), tensors are on different
            devices, or ``backend="triton"`` with ``N > MAX_TRITON_N``.
        RuntimeError: ``backend="triton"`` cannot run on these tensors (see :func:`tilewise._backend.resolve_backend`).

    Example:
        >>> import torch
        >>> from tilewise.ops import fft_conv
        >>> u = torch.tensor([[[1.0, 2.0, 3.0]]])
        >>> k = torch.tensor([[1.0, 1.0, 0.0]])  # y[t] = u[t] + u[t - 1]
        >>> fft_conv(u, k).round()  # an FFT result is exact only up to float rounding
        tensor([[[1., 3., 5.]]])

        A long random kernel with a skip term matches the direct causal sum (``conv1d`` correlates, so flip ``k``):

        >>> import torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> u, k, d = torch.randn(2, 4, 100, generator=g), torch.randn(4, 100, generator=g), torch.randn(4, generator=g)
        >>> direct = F.conv1d(F.pad(u, (99, 0)), k.flip(-1)[:, None], groups=4) + d[:, None] * u
        >>> torch.allclose(fft_conv(u, k, skip=d), direct, atol=1e-4)
        True
    """
    _check(u, k, skip)
    tensors = (u, k) if skip is None else (u, k, skip)
    chosen = resolve_backend(backend, *tensors)
    forced = backend == "triton" or (backend == "auto" and os.environ.get(ENV_VAR, "").strip() == "triton")
    if chosen == "triton" and any(t.dtype not in _TRITON_DTYPES for t in tensors):
        if forced:
            raise TypeError(
                "the Triton backend supports float32, float16 and bfloat16 tensors, got "
                f"{', '.join(str(t.dtype) for t in tensors)}; use backend='reference'"
            )
        chosen = "reference"
    if chosen == "triton" and u.shape[-1] > MAX_TRITON_N:
        if forced:
            raise ValueError(
                f"the Triton backend convolves N <= {MAX_TRITON_N}, got N = {u.shape[-1]}; use backend='auto' or "
                "'reference' (torch.fft) for longer sequences"
            )
        chosen = "reference"
    if chosen == "triton" and not forced and u.shape[-1] < AUTO_TRITON_MIN_N:
        chosen = "reference"
    if chosen == "reference":
        return fft_conv_ref(u, k, skip)
    from tilewise.ops.fft_conv.triton import fft_conv_triton

    return fft_conv_triton(u, k, skip)
