"""Causal token mixers for MetaFormer blocks, and the registry that names them.

Every mixer maps ``x [B, T, D] -> y [B, T, D]`` and is strictly causal: ``y[:, t]`` depends on ``x[:, :t + 1]``
only. Mixers register under a name with :func:`register_mixer` and are built by name with :func:`build_mixer`;
``MetaFormerLM`` looks its mixer up here, so a mixer registered later (the token-mixer issue) is usable at once.

Conventions a mixer follows:

- its constructor takes ``dim`` first; any of ``n_heads``, ``n_kv_heads``, ``rope_theta``, ``max_seq_len`` and
  ``dropout`` that it declares are filled in from the model's config;
- a ``nn.Linear`` whose output is added to the residual stream sets ``residual_proj = True``, so that the model's
  ``init_weights()`` gives it the scaled init ``0.02 / sqrt(2 * n_layers)``;
- it holds no buffer that ``init_weights()`` could not rebuild, so a model built on the meta device can be
  materialized with ``to_empty`` + ``init_weights()``.

Example:
    >>> mixer = build_mixer("pooling", 64, window=4)
    >>> mixer(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIXERS",
    "CausalAttention",
    "CausalConv",
    "CausalPooling",
    "apply_rope",
    "build_mixer",
    "register_mixer",
    "rope_cos_sin",
]

MIXERS: dict[str, Callable[..., nn.Module]] = {}

_M = TypeVar("_M", bound=Callable[..., nn.Module])


def register_mixer(name: str) -> Callable[[_M], _M]:
    """Register a mixer class (or factory) under ``name``; use as a decorator.

    Args:
        name: the key for :func:`build_mixer` and ``MetaFormerConfig.mixer``.

    Raises:
        ValueError: if ``name`` is already registered.

    Example:
        >>> @register_mixer("identity")
        ... class Identity(nn.Module):
        ...     def __init__(self, dim: int) -> None:
        ...         super().__init__()
        ...     def forward(self, x):
        ...         return x
    """

    def decorator(cls: _M) -> _M:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered (by {MIXERS[name]!r}); pick another name")
        MIXERS[name] = cls
        return cls

    return decorator


def build_mixer(name: str, dim: int, **kwargs: object) -> nn.Module:
    """Build the mixer registered under ``name`` for model width ``dim``.

    Args:
        name: a key of :data:`MIXERS` (``"attention"``, ``"pooling"``, ``"conv"``, ...).
        dim: model width ``D``; the mixer maps ``[B, T, D] -> [B, T, D]``.
        **kwargs: passed to the mixer's constructor.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the registered names).
    """
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers are: {', '.join(sorted(MIXERS))}")
    return MIXERS[name](dim, **kwargs)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary-embedding tables for the given positions (rotate-half layout, as in LLaMA/GPT-NeoX).

    Computed on the fly (no buffer), so meta-device models need nothing rebuilt.

    Args:
        positions: integer positions ``[T]``.
        head_dim: even head width ``Dh``.
        theta: RoPE base; default 10000.
        dtype: dtype of the returned tables (math is in fp32).

    Returns:
        ``(cos, sin)``, each ``[T, Dh]``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; choose dim / n_heads even")
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, Dh]`` by the tables of :func:`rope_cos_sin` (``[T, Dh]``); returns ``[..., T, Dh]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


@register_mixer("attention")
class CausalAttention(nn.Module):
    """Causal multi-head attention with RoPE on q/k and grouped-query heads (LLaMA-style, no biases).

    Args:
        dim: model width ``D``; must be divisible by ``n_heads``, with an even head width ``D / n_heads``.
        n_heads: query heads ``H``; default 4.
        n_kv_heads: key/value heads (GQA); must divide ``n_heads``; default ``n_heads`` (plain MHA).
        rope_theta: RoPE base; default 10000.
        dropout: attention-probability dropout in training; default 0.

    Shapes: ``x [B, T, D] -> [B, T, D]``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads} (a positive integer)")
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must be a positive divisor of n_heads={n_heads}")
        if (dim // n_heads) % 2:
            raise ValueError(f"head width dim / n_heads = {dim // n_heads} must be even for RoPE")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.rope_theta, self.dropout = rope_theta, dropout
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.wo.residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(torch.arange(T, device=x.device), self.head_dim, self.rope_theta, dtype=q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # [B, H, T, Dh]
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


@register_mixer("pooling")
class CausalPooling(nn.Module):
    """PoolFormer's mixer made causal: ``y_t = mean(x_{t-w+1..t}) - x_t``, in O(T) through a cumulative sum.

    At ``t < w - 1`` the mean is over the ``t + 1`` tokens that exist. The ``- x_t`` is PoolFormer's: the block
    adds the residual back. No parameters.

    Args:
        dim: model width ``D`` (unused beyond the signature every mixer shares).
        window: tokens averaged, the current one included; default 4.

    Shapes: ``x [B, T, D] -> [B, T, D]``.
    """

    def __init__(self, dim: int, window: int = 4) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        xf = x.float()
        csum = F.pad(xf.cumsum(dim=1), (0, 0, 1, 0))  # [B, T+1, D], csum[:, i] = sum of x[:, :i]
        end = torch.arange(1, T + 1, device=x.device)
        start = (end - self.window).clamp_min(0)
        window_sum = csum[:, end] - csum[:, start]  # [B, T, D]
        mean = window_sum / (end - start).to(xf.dtype)[None, :, None]
        return (mean - xf).to(x.dtype)


@register_mixer("conv")
class CausalConv(nn.Module):
    """Causal depthwise convolution: ``y_t = b + sum_j w_j * x_{t-j}``, ``j < kernel_size``, per channel.

    Args:
        dim: model width ``D`` (one filter per channel).
        kernel_size: taps; default 4. Left padding of ``kernel_size - 1`` keeps it causal.

    Shapes: ``x [B, T, D] -> [B, T, D]``.
    """

    def __init__(self, dim: int, kernel_size: int = 4) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # [B, D, T + k - 1]
        return self.conv(xt).transpose(1, 2)
