"""Causal linear attention with optional decay gates, chunked (training / prefill) and one token at a time (decoding).

The spec is ``reference.py`` (math in README.md beside it); ``triton.py`` is the GPU path, loaded only when the
Triton backend is chosen.
"""

from __future__ import annotations

import itertools

import torch

from tilewise._backend import resolve_backend
from tilewise.ops.linear_attention.reference import linear_attention_chunked, linear_attention_step_ref

__all__ = ["MAX_HEAD_DIM", "linear_attention", "linear_attention_step"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {layout} ({rank}-D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}; cast it first")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put q, k, v on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} ({layout}), got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must match q in every dim but the last ({layout}): q {tuple(q.shape)}, v {tuple(v.shape)}")
    for name, d in (("q and k", q.shape[-1]), ("v", v.shape[-1])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"the head dim of {name} must be in [1, {MAX_HEAD_DIM}], got {d}")


def _check_gate(g: torch.Tensor | None, lead: tuple[int, ...], heads: int, dk: int, device: torch.device) -> None:
    """``g``: None, ``[H]``, ``[*lead, H]`` or ``[*lead, H, Dk]``, floating, on q's device."""
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor or None, got {type(g).__name__}")
    shapes = [(heads,), (*lead, heads), (*lead, heads, dk)]
    if tuple(g.shape) not in shapes:
        raise ValueError(
            f"g must have shape {list(shapes[0])} (per-head constant), {list(shapes[1])} (scalar gate) or "
            f"{list(shapes[2])} (vector gate), got {tuple(g.shape)}"
        )
    if not g.is_floating_point():
        raise ValueError(f"g must be a floating tensor (log decay), got {g.dtype}")
    if g.device != device:
        raise ValueError(f"g is on {g.device} but q is on {device}; move it to q's device")


def _check_state(name: str, s: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if tuple(s.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ([N, H, Dk, Dv]), got {tuple(s.shape)}")
    if not s.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (fp32 recommended), got {s.dtype}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but q is on {device}; move it to q's device")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor) -> int:
    """Validate packed-sequence offsets and return the number of sequences."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "cu_seqlens must be a 1-D int32 tensor of N + 1 offsets [0, len_0, len_0 + len_1, ..., T], got "
            f"shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, pack the sequences into batch 1 ([1, T, H, D]); q has batch {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T={q.shape[1]}, got {bounds[:4]}...{bounds[-1:]}"
        )
    return len(bounds) - 1


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention, optionally gated: ``S_t = decay_t ⊙ S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``.

    The state ``S_t`` is ``[Dk, Dv]`` per sequence and head, kept in fp32; all accumulation is fp32.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one dtype (float32, float16 or bfloat16), ``Dk, Dv <= 256``.
        g: log decay (``decay = exp(g)``, normally ``g <= 0``): None (plain linear attention), ``[H]`` (a constant
            per head, Lightning Attention / RetNet), ``[B, T, H]`` (scalar gate, simple GLA / Mamba-2) or
            ``[B, T, H, Dk]`` (vector gate per key dim, GLA; its Triton kernel is exact but not yet on tensor
            cores: ~45x the no-gate time at T=8K on an H100, still ~24x faster than the chunked PyTorch path).
            Any float dtype; math in fp32.
        scale: multiplies ``q``; default ``Dk ** -0.5``.
        initial_state: ``[N, H, Dk, Dv]`` state before the first token (``N = B``, or the number of packed
            sequences); default zeros.
        output_final_state: also return the state after the last token, ``[N, H, Dk, Dv]`` fp32.
        cu_seqlens: int32 ``[N + 1]`` offsets of packed variable-length sequences in ``q [1, T, H, Dk]``; each
            sequence starts from its own state.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports, else the chunked PyTorch reference),
            ``"triton"`` or ``"reference"``; ``TILEWISE_BACKEND`` overrides ``"auto"``.

    Returns:
        ``(o, final_state)``: ``o [B, T, H, Dv]`` in q's dtype; ``final_state`` fp32 or None. Differentiable in
        ``q, k, v, g, initial_state``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a shape, dtype or device does not fit (the message names the argument).
        RuntimeError: ``backend="triton"`` cannot run here (see :func:`tilewise._backend.resolve_backend`).

    Example:
        >>> import torch
        >>> from tilewise.ops import linear_attention
        >>> q = k = v = torch.ones(1, 3, 1, 4)
        >>> o, _ = linear_attention(q, k, v, scale=1.0)
        >>> o[0, :, 0, 0]
        tensor([ 4.,  8., 12.])
    """
    _check_qkv(q, k, v, 4, "[B, T, H, D]")
    batch, seq, heads, dk = q.shape
    n = batch if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, q)
    _check_gate(g, (batch, seq), heads, dk, q.device)
    if initial_state is not None:
        _check_state("initial_state", initial_state, (n, heads, dk, v.shape[-1]), q.device)
    scale = dk**-0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "reference":
        return linear_attention_chunked(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    from tilewise.ops.linear_attention.triton import linear_attention_triton

    return linear_attention_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`linear_attention`: ``S' = decay ⊙ S + k^T v``, ``o = scale q S'``.

    Args:
        q, k: ``[B, H, Dk]``; v: ``[B, H, Dv]`` (one token; ``[B, 1, H, D]`` is accepted too and keeps its shape).
        state: ``[B, H, Dk, Dv]``, e.g. the ``final_state`` of :func:`linear_attention` (any float dtype).
        g: log decay for this token: None, ``[H]``, ``[B, H]`` or ``[B, H, Dk]`` (with a ``1`` after ``B`` when
            ``q`` has one).
        scale: default ``Dk ** -0.5``.

    Returns:
        ``(o, new_state)``: ``o`` like ``v`` in q's dtype, ``new_state [B, H, Dk, Dv]`` fp32 (a new tensor). Plain
        PyTorch on every device; differentiable.

    Example:
        Prefill 8 tokens with :func:`linear_attention`, then decode the 9th from its final state:

        >>> import torch
        >>> from tilewise.ops import linear_attention, linear_attention_step
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
        >>> gate = -torch.rand(2, 9, 3, generator=g)  # log decay per token and head
        >>> o_full, _ = linear_attention(q, k, v, gate)
        >>> _, state = linear_attention(q[:, :8], k[:, :8], v[:, :8], gate[:, :8], output_final_state=True)
        >>> o, state = linear_attention_step(q[:, 8], k[:, 8], v[:, 8], state, gate[:, 8])
        >>> o.shape, state.shape, state.dtype
        (torch.Size([2, 3, 16]), torch.Size([2, 3, 16, 16]), torch.float32)
        >>> torch.allclose(o, o_full[:, 8], atol=1e-5)  # the same as running all 9 tokens at once
        True
    """
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        _check_qkv(q, k, v, 4, "[B, 1, H, D]")
        if q.shape[1] != 1:
            raise ValueError(f"q must hold one token ([B, 1, H, D]) for a decoding step, got {tuple(q.shape)}")
        _check_gate(g, (q.shape[0], 1), q.shape[2], q.shape[3], q.device)
        if g is not None and g.dim() > 1:
            g = g.squeeze(1)
        o, new = linear_attention_step(q.squeeze(1), k.squeeze(1), v.squeeze(1), state, g, scale)
        return o.unsqueeze(1), new
    _check_qkv(q, k, v, 3, "[B, H, D]")
    batch, heads, dk = q.shape
    _check_gate(g, (batch,), heads, dk, q.device)
    _check_state("state", state, (batch, heads, dk, v.shape[-1]), q.device)
    if g is not None and g.dim() == 1:
        g = g.expand(batch, heads)
    return linear_attention_step_ref(q, k, v, state, g, dk**-0.5 if scale is None else float(scale))
