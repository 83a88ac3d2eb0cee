"""Causal token mixers for MetaFormer blocks, and the registry that names them.

Every mixer maps ``x [B, T, D] -> y [B, T, D]`` and is strictly causal: ``y[:, t]`` depends on ``x[:, :t + 1]``
only. Mixers register under a name with :func:`register_mixer` and are built by name with :func:`build_mixer`;
``MetaFormerLM`` looks its mixer up here, so a mixer registered later (the token-mixer issue) is usable at once.

The registry:

- ``attention``: LLaMA's causal attention (RoPE, GQA); CAFormer's late-stage mixer.
- ``pooling``: PoolFormer's ``avgpool(x) - x`` over the last ``window`` tokens (no parameters).
- ``conv``: a short causal depthwise convolution (H3/Mamba's; ConvFormer's depthwise step alone).
- ``sepconv``: ConvFormer's separable block, pointwise -> StarReLU -> causal depthwise (7 taps) -> pointwise.
- ``linear_attention``: gated linear attention (scalar data-dependent decay), on :func:`tilewise.ops.linear_attention`.
- ``fft_conv``: Hyena-style gated long convolution, on :func:`tilewise.ops.fft_conv`.

The last two import their op on the first forward, so they build (and plan, on meta) without it.

Conventions a mixer follows:

- its constructor takes ``dim`` first; any of ``n_heads``, ``n_kv_heads``, ``rope_theta``, ``max_seq_len`` and
  ``dropout`` that it declares are filled in from the model's config;
- a ``nn.Linear`` whose output is added to the residual stream sets ``residual_proj = True``, so that the model's
  ``init_weights()`` gives it the scaled init ``0.02 / sqrt(2 * n_layers)``;
- it holds no buffer that ``init_weights()`` could not rebuild, so a model built on the meta device can be
  materialized with ``to_empty`` + ``init_weights()``.

Example:
    >>> import torch
    >>> from tilewise.nn import build_mixer
    >>> mixer = build_mixer("pooling", 64, window=4)
    >>> mixer(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tilewise.nn.layers import StarReLU

__all__ = [
    "MIXERS",
    "CausalAttention",
    "CausalConv",
    "CausalPooling",
    "CausalSepConv",
    "GatedLinearAttention",
    "LongConv",
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
        >>> import torch
        >>> from torch import nn
        >>> from tilewise.nn import MIXERS, build_mixer, register_mixer
        >>> @register_mixer("my-identity")
        ... class Identity(nn.Module):
        ...     def __init__(self, dim: int) -> None:
        ...         super().__init__()
        ...     def forward(self, x):
        ...         return x
        >>> x = torch.randn(1, 3, 8)
        >>> torch.equal(build_mixer("my-identity", 8)(x), x)
        True
        >>> register_mixer("my-identity")(Identity)
        Traceback (most recent call last):
        ...
        ValueError: mixer 'my-identity' is already registered (by ...); pick another name
        >>> del MIXERS["my-identity"]  # leave the registry as it was
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

    Example:
        >>> import torch
        >>> from tilewise.nn import build_mixer
        >>> mixer = build_mixer("conv", 16, kernel_size=3)
        >>> type(mixer).__name__, mixer.kernel_size
        ('CausalConv', 3)
        >>> mixer(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
        >>> build_mixer("lstm", 16)
        Traceback (most recent call last):
        ...
        ValueError: unknown mixer 'lstm'; registered mixers are: attention, conv, ...
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

    Example:
        >>> import torch
        >>> from tilewise.nn import rope_cos_sin
        >>> cos, sin = rope_cos_sin(torch.arange(4), head_dim=8)
        >>> cos.shape, sin.dtype
        (torch.Size([4, 8]), torch.float32)
        >>> torch.equal(cos[0], torch.ones(8)), torch.equal(sin[0], torch.zeros(8))  # position 0: no rotation
        (True, True)
        >>> round(sin[1, 0].item(), 4), round(sin[1, 4].item(), 4)  # fastest pair turns 1 rad a token: sin(1)
        (0.8415, 0.8415)
        >>> torch.allclose(cos**2 + sin**2, torch.ones(4, 8))
        True
        >>> rope_cos_sin(torch.arange(4), head_dim=8, dtype=torch.bfloat16)[0].dtype
        torch.bfloat16
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; choose dim / n_heads even")
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, Dh]`` by the tables of :func:`rope_cos_sin` (``[T, Dh]``); returns ``[..., T, Dh]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import apply_rope, rope_cos_sin
        >>> _ = torch.manual_seed(0)
        >>> cos, sin = rope_cos_sin(torch.arange(6), head_dim=8)
        >>> apply_rope(torch.randn(2, 4, 6, 8), cos, sin).shape  # [B, H, T, Dh]
        torch.Size([2, 4, 6, 8])
        >>> q, k = torch.randn(8).expand(6, 8), torch.randn(8).expand(6, 8)  # the same q and k at every position
        >>> qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        >>> torch.allclose(qr.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps the norm
        True
        >>> torch.allclose(qr[3] @ kr[1], qr[5] @ kr[3], atol=1e-5)  # the score depends on the offset only
        True
        >>> torch.allclose(qr[3] @ kr[1], qr[3] @ kr[2], atol=1e-5)
        False
    """
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

    Example:
        >>> import torch
        >>> from tilewise.nn import CausalAttention
        >>> _ = torch.manual_seed(0)
        >>> attn = CausalAttention(32, n_heads=4, n_kv_heads=2)  # grouped-query: 2 query heads per k/v head
        >>> attn.wq.weight.shape, attn.wk.weight.shape  # head width 32 / 4 = 8
        (torch.Size([32, 32]), torch.Size([16, 32]))
        >>> x = torch.randn(2, 6, 32)
        >>> y = attn(x)
        >>> y.shape
        torch.Size([2, 6, 32])
        >>> x[:, 4] += 1.0  # change token 4: tokens 0-3 do not see it, token 4 on does
        >>> y2 = attn(x)
        >>> torch.allclose(y2[:, :4], y[:, :4], atol=1e-6), torch.allclose(y2[:, 4:], y[:, 4:])
        (True, False)
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

    Example:
        >>> import torch
        >>> from tilewise.nn import CausalPooling
        >>> pool = CausalPooling(1, window=2)
        >>> x = torch.tensor([2.0, 4.0, 0.0, 8.0]).view(1, 4, 1)  # [B, T, D]
        >>> pool(x).flatten().tolist()  # mean of x[t-1], x[t] (x[0] alone at t = 0), minus x[t]
        [0.0, -1.0, 2.0, -4.0]
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2, 8, 16)
        >>> y = CausalPooling(16, window=3)(x)
        >>> x[:, 5] += 1.0  # change token 5: tokens 0-4 do not see it
        >>> torch.allclose(CausalPooling(16, window=3)(x)[:, :5], y[:, :5])
        True
        >>> len(list(pool.parameters()))
        0
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

    This is the short convolution of H3/Mamba and ConvFormer's depthwise step alone; ``"sepconv"`` is ConvFormer's
    whole separable block around it.

    Args:
        dim: model width ``D`` (one filter per channel).
        kernel_size: taps; default 4. Left padding of ``kernel_size - 1`` keeps it causal.
        bias: learn ``b``; default True.

    Shapes: ``x [B, T, D] -> [B, T, D]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import CausalConv
        >>> conv = CausalConv(1, kernel_size=3)
        >>> with torch.no_grad():  # taps [1, 2, 3], no bias
        ...     _ = conv.conv.weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3))
        ...     _ = conv.conv.bias.zero_()
        >>> impulse = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]).view(1, 5, 1)  # [B, T, D]
        >>> conv(impulse).flatten().tolist()  # zero before the impulse; the last tap weighs the current token
        [0.0, 3.0, 2.0, 1.0, 0.0]
        >>> CausalConv(16)(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = True) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # [B, D, T + k - 1]
        return self.conv(xt).transpose(1, 2)


@register_mixer("sepconv")
class CausalSepConv(nn.Module):
    """ConvFormer's separable-convolution mixer made causal: ``pw2(dwconv(StarReLU(pw1 x)))``.

    ``pw1`` widens ``D`` to ``expansion * D``, ``dwconv`` is a causal depthwise convolution of ``kernel_size``
    taps (ConvFormer's 7x7 becomes 7 past tokens), ``pw2`` projects back; no biases, as in ConvFormer.

    Args:
        dim: model width ``D``.
        kernel_size: depthwise taps; default 7.
        expansion: hidden width as a multiple of ``D``; default 2.

    Shapes: ``x [B, T, D] -> [B, T, D]``, hidden ``[B, T, expansion * D]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import CausalSepConv
        >>> _ = torch.manual_seed(0)
        >>> mixer = CausalSepConv(16, kernel_size=3)
        >>> mixer.pw1.weight.shape, mixer.dwconv.conv.weight.shape  # 2 * 16 hidden channels, 3 taps each
        (torch.Size([32, 16]), torch.Size([32, 1, 3]))
        >>> x = torch.randn(2, 8, 16)
        >>> y = mixer(x)
        >>> y.shape
        torch.Size([2, 8, 16])
        >>> x[:, 5] += 1.0  # change token 5: tokens 0-4 do not see it, tokens 5-7 (within 3 taps) do
        >>> y2 = mixer(x)
        >>> torch.allclose(y2[:, :5], y[:, :5]), torch.allclose(y2[:, 5:], y[:, 5:])
        (True, False)
    """

    def __init__(self, dim: int, kernel_size: int = 7, expansion: float = 2.0) -> None:
        super().__init__()
        hidden = int(expansion * dim)
        if hidden < 1:
            raise ValueError(f"expansion * dim must be >= 1, got {expansion} * {dim}")
        self.pw1 = nn.Linear(dim, hidden, bias=False)
        self.act = StarReLU()
        self.dwconv = CausalConv(hidden, kernel_size, bias=False)
        self.pw2 = nn.Linear(hidden, dim, bias=False)
        self.pw2.residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.dwconv(self.act(self.pw1(x))))


def _load_op(name: str) -> Callable[..., object]:
    """The public op ``tilewise.ops.<name>.<name>``, imported on first use so that building a model (on meta,
    for planning) never needs it."""
    try:
        op = getattr(importlib.import_module(f"tilewise.ops.{name}"), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"this mixer calls tilewise.ops.{name}.{name}, which this install lacks ({exc}); "
            "install a tilewise version that ships it, or pick another mixer"
        ) from exc
    return op


@register_mixer("linear_attention")
class GatedLinearAttention(nn.Module):
    """Linear attention with a data-dependent scalar decay per head and token (simple GLA / RetNet-style).

    Per head: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (:func:`tilewise.ops.linear_attention`),
    with ``g_t = logsigmoid(x_t W_g + b_g) / gate_temperature`` (``[B, T, H]``, ``<= 0``). The temperature keeps the
    decay near 1 at init (``0.5 ** (1/16) ~ 0.958`` a token, a memory of ~24 tokens) while letting the model learn
    to forget. The output is normalized per head (RMSNorm), gated by ``silu(x W_r)`` and projected, as in GLA.

    Feature map (``feature_map``):

    - ``"l2norm"`` (default): ``q`` and ``k`` are L2-normalized per head, so each token writes at most ``|v_t|``
      into the state and the state stays bounded by ``max |v| / (1 - decay)`` whatever the projections' scale;
      ``q . k`` is a cosine in ``[-1, 1]`` (scale 1). This is the choice of DeltaNet/GLA-style models for stability.
    - ``"elu"``: ``elu(x) + 1`` on ``q`` and ``k`` (Katharopoulos et al., positive features, scale ``Dh**-0.5``); the
      state grows with ``|k|`` and the output norm undoes it.

    Strictly causal. Decoding with a carried state is the op's ``initial_state``/``output_final_state``.

    Args:
        dim: model width ``D``; must be divisible by ``n_heads``.
        n_heads: heads ``H``; default 4 (key and value width ``D / H`` each).
        gate_temperature: divides the log decay; default 16 (fla's ``gate_logit_normalizer``).
        feature_map: ``"l2norm"`` or ``"elu"``; default ``"l2norm"``.
        norm_eps: epsilon of the per-head output RMSNorm; default 1e-5.

    Shapes: ``x [B, T, D] -> [B, T, D]``; inside, ``q, k, v [B, T, H, D / H]``, ``g [B, T, H]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import GatedLinearAttention
        >>> _ = torch.manual_seed(0)
        >>> gla = GatedLinearAttention(16, n_heads=2)
        >>> gla.wg.weight.shape  # one decay logit per head
        torch.Size([2, 16])
        >>> x = torch.randn(2, 6, 16)
        >>> y = gla(x)
        >>> y.shape
        torch.Size([2, 6, 16])
        >>> x[:, 4] += 1.0  # change token 4: tokens 0-3 do not see it, token 4 on does
        >>> y2 = gla(x)
        >>> torch.allclose(y2[:, :4], y[:, :4], atol=1e-6), torch.allclose(y2[:, 4:], y[:, 4:])
        (True, False)
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        gate_temperature: float = 16.0,
        feature_map: Literal["l2norm", "elu"] = "l2norm",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if n_heads <= 0 or dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads} (a positive integer)")
        if feature_map not in ("l2norm", "elu"):
            raise ValueError(f"feature_map must be 'l2norm' or 'elu', got {feature_map!r}")
        if gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be > 0, got {gate_temperature}")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.gate_temperature, self.feature_map = gate_temperature, feature_map
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wg = nn.Linear(dim, n_heads, bias=True)  # decay logits; the bias sets the decay at init
        self.wr = nn.Linear(dim, dim, bias=False)  # output gate
        self.o_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.wo.residual_proj = True

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_map == "l2norm":
            return F.normalize(x, dim=-1)
        return F.elu(x) + 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        v = self.wv(x).view(shape)
        # The op wants one dtype; autocast may run the feature map's norm in fp32.
        q = self._features(self.wq(x).view(shape)).to(v.dtype)
        k = self._features(self.wk(x).view(shape)).to(v.dtype)
        g = F.logsigmoid(self.wg(x).float()) / self.gate_temperature  # [B, T, H], fp32 log decay
        scale = 1.0 if self.feature_map == "l2norm" else self.head_dim**-0.5
        o, _ = _load_op("linear_attention")(q, k, v, g, scale=scale)  # [B, T, H, Dh] in v's dtype
        # The norm's weight follows o's dtype so that a bf16 o (autocast) keeps the fused kernel.
        o = F.rms_norm(o, (self.head_dim,), self.o_norm.weight.to(o.dtype), self.o_norm.eps)
        return self.wo(o.reshape(B, T, D) * F.silu(self.wr(x)))


@register_mixer("fft_conv")
class LongConv(nn.Module):
    """Hyena-style long-convolution mixer (order 2) with an explicit kernel per channel, convolved by FFT.

    ``x0, x1, v = shortconv(W_in x)`` (a causal depthwise conv of 3 taps on the ``3D`` projection), then
    ``y = W_out(x0 * (h * (x1 * v) + skip * (x1 * v)))`` where ``h * u`` is the causal convolution along time of
    :func:`tilewise.ops.fft_conv`, O(T log T). The kernel ``h [D, T]`` is the first ``T`` taps of a learned
    ``[D, max_seq_len]`` parameter times a fixed exponential window ``exp(-a_c t / max_seq_len)``; the rates
    ``a_c`` are spread over the channels so that the window reaches 1e-2 after 30% (fastest channel) to 150%
    (slowest) of ``max_seq_len`` (Hyena's ExponentialModulation). The window is computed on the fly (no buffer).

    Explicit instead of Hyena's implicit (MLP over positional features) filter: fewer moving parts, the same
    O(T log T) cost, and "Simple Hardware-Efficient Long Convolutions" (Fu et al., 2023) shows it matches once the
    kernel is regularized, here by the window. It costs ``D * max_seq_len`` parameters a layer.

    Args:
        dim: model width ``D``.
        max_seq_len: longest sequence, the kernel's length; filled in from ``MetaFormerConfig.max_seq_len``.
        short_kernel: taps of the short causal convolution; default 3.

    Shapes: ``x [B, T, D] -> [B, T, D]`` with ``T <= max_seq_len``; the op sees ``u [B, D, T]``, ``k [D, T]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import LongConv
        >>> _ = torch.manual_seed(0)
        >>> mixer = LongConv(8, max_seq_len=10)
        >>> mixer.kernel.shape  # one learned tap per channel and position
        torch.Size([8, 10])
        >>> w = mixer.window(16)  # fastest channel at 1e-2 after 30% of max_seq_len, slowest after 150%
        >>> round(w[0, 3].item(), 4), round(w[-1, 15].item(), 4)
        (0.01, 0.01)
        >>> x = torch.randn(2, 10, 8)
        >>> y = mixer(x)
        >>> y.shape
        torch.Size([2, 10, 8])
        >>> x[:, 6] += 1.0  # change token 6: tokens 0-5 see it only through FFT rounding
        >>> y2 = mixer(x)
        >>> torch.allclose(y2[:, :6], y[:, :6], atol=1e-6), torch.allclose(y2[:, 6:], y[:, 6:])
        (True, False)
        >>> mixer(torch.randn(1, 11, 8))
        Traceback (most recent call last):
        ...
        ValueError: sequence length 11 exceeds the fft_conv kernel length max_seq_len=10; ...
    """

    def __init__(self, dim: int, max_seq_len: int = 1024, short_kernel: int = 3) -> None:
        super().__init__()
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.dim, self.max_seq_len = dim, max_seq_len
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.short_conv = CausalConv(3 * dim, short_kernel)
        self.kernel = nn.Parameter(torch.empty(dim, max_seq_len))
        self.skip = nn.Parameter(torch.empty(dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj.residual_proj = True
        self.reset_parameters()

    def window(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """The fixed decay window ``[D, length]`` (fp32) that multiplies the learned kernel."""
        device = self.kernel.device if device is None else device
        log_target = math.log(1e-2)
        rates = torch.linspace(-log_target / 0.3, -log_target / 1.5, self.dim, device=device)  # fast -> slow
        t = torch.arange(length, device=device, dtype=torch.float32) / self.max_seq_len
        return torch.exp(-rates[:, None] * t[None, :])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kernel ~ N(0, 1 / sum_t window_t**2) per channel, so the windowed convolution preserves variance at
        ``T = max_seq_len``; ``skip`` = 1. The projections and the short conv initialize themselves."""
        norm = self.window(self.max_seq_len).square().sum(dim=1, keepdim=True).rsqrt()  # [D, 1]
        self.kernel.normal_().mul_(norm.to(self.kernel.dtype))
        self.skip.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if self.max_seq_len < T:
            raise ValueError(
                f"sequence length {T} exceeds the fft_conv kernel length max_seq_len={self.max_seq_len}; "
                "build the mixer (or the model's config) with a larger max_seq_len"
            )
        x0, x1, v = self.short_conv(self.in_proj(x)).chunk(3, dim=-1)  # each [B, T, D]
        u = (x1 * v).transpose(1, 2)  # [B, D, T]
        k = self.kernel[:, :T] * self.window(T, x.device).to(self.kernel.dtype)  # [D, T]
        y = _load_op("fft_conv")(u, k, skip=self.skip)  # [B, D, T]
        return self.out_proj(x0 * y.transpose(1, 2))
