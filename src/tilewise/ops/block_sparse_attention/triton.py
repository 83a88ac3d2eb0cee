"""Triton kernels for block-sparse causal softmax attention (flash-attention style; README.md has the math).

The host turns the block mask into compacted lists of kept causal blocks, so every loop runs over kept blocks only:

- ``kv_idx [B, H, NB, NB]`` / ``kv_cnt [B, H, NB]``: per query block, its kept key blocks, ascending (diagonal last).
- ``q_idx`` / ``q_cnt``: per key block, the query blocks that keep it, ascending (diagonal first).

Kernels, one program per ``(block, b * H + h)``:

1. ``_fwd_kernel``: online softmax in base 2 in fp32 over the kept key blocks of one query block; stores ``o`` and
   the logsumexp ``lse [B, H, T]`` (natural log, fp32).
2. ``_bwd_dkdv_kernel``: per key block, ``dv = Σ p^T do`` and ``dk = scale Σ ds^T q`` over the query blocks that
   keep it, with ``p = exp(s - lse)`` recomputed and ``ds = p ⊙ (do v^T - delta)``, ``delta = rowsum(o ⊙ do)``.
3. ``_bwd_dq_kernel``: per query block, ``dq = scale Σ ds k`` over its kept key blocks.

The causal mask is applied in the diagonal block only: kept off-diagonal blocks are fully visible, and only the
diagonal block can hold keys past ``T``. The autograd pair is registered with ``torch.library``
(``tilewise::block_sparse_attention`` and its ``_bwd``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["block_lists", "block_sparse_attention_bwd", "block_sparse_attention_fwd", "block_sparse_attention_triton"]

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(x, base, o_t, T, D: tl.constexpr, DOT: tl.constexpr):
    """``[BT, D]`` rows ``o_t`` of one ``(b, h)`` slice of a ``[B, H, T, D]`` tensor (zeros past ``T``) as ``DOT``."""
    o_d = tl.arange(0, D)
    b_x = tl.load(x + base + o_t[:, None] * D + o_d[None, :], mask=(o_t < T)[:, None], other=0.0)
    return b_x.to(DOT)


@triton.jit
def _store_rows(x, base, o_t, T, b_x, D: tl.constexpr):
    o_d = tl.arange(0, D)
    tl.store(x + base + o_t[:, None] * D + o_d[None, :], b_x.to(x.dtype.element_ty), mask=(o_t < T)[:, None])


@triton.jit
def _fwd_step(b_q, k, v, base, i_s, o_t, T, b_m, b_l, b_acc, qk_scale, D: tl.constexpr, BT: tl.constexpr,
              DIAG: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One key block ``i_s`` of the online softmax: returns the updated ``(max, sum, accumulator)`` (base 2)."""
    o_s = i_s * BT + tl.arange(0, BT)
    b_k = _load_rows(k, base, o_s, T, D, DOT)
    b_v = _load_rows(v, base, o_s, T, D, DOT)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
    if DIAG:
        b_s = tl.where(o_s[None, :] <= o_t[:, None], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(DOT), b_v, input_precision=PREC)
    return b_m_new, b_l, b_acc


@triton.jit
def _fwd_kernel(q, k, v, o, lse, kv_idx, kv_cnt, T, NB, qk_scale, D: tl.constexpr, BT: tl.constexpr,
                DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    # int64: (b * H + h) * T * D can pass 2**31.
    base = i_bh.to(tl.int64) * T * D
    row = i_bh.to(tl.int64) * NB + i_t
    o_t = i_t * BT + tl.arange(0, BT)
    b_q = _load_rows(q, base, o_t, T, D, DOT)
    b_m = tl.full([BT], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BT], dtype=tl.float32)
    b_acc = tl.zeros([BT, D], dtype=tl.float32)
    n = tl.load(kv_cnt + row)
    # Off-diagonal kept blocks (fully visible), then the diagonal block, always kept and last in the list.
    for i_n in range(0, n - 1):
        i_s = tl.load(kv_idx + row * NB + i_n)
        b_m, b_l, b_acc = _fwd_step(b_q, k, v, base, i_s, o_t, T, b_m, b_l, b_acc, qk_scale, D, BT, False, DOT, PREC)
    b_m, b_l, b_acc = _fwd_step(b_q, k, v, base, i_t, o_t, T, b_m, b_l, b_acc, qk_scale, D, BT, True, DOT, PREC)
    _store_rows(o, base, o_t, T, b_acc / b_l[:, None], D)
    tl.store(lse + i_bh.to(tl.int64) * T + o_t, (b_m + tl.log2(b_l)) / 1.4426950408889634, mask=o_t < T)


@triton.jit
def _probs(b_q, b_k, lse, o_t, o_s, T, bh_t, qk_scale, DIAG: tl.constexpr, PREC: tl.constexpr):
    """``p = exp(scale q k^T - lse)`` ``[BT, BT]`` fp32, zero above the diagonal in the diagonal block."""
    b_lse = tl.load(lse + bh_t + o_t, mask=o_t < T, other=0.0) * 1.4426950408889634
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - b_lse[:, None])
    if DIAG:
        b_p = tl.where(o_s[None, :] <= o_t[:, None], b_p, 0.0)
    return b_p


@triton.jit
def _dkdv_step(q, do, lse, delta, base, bh_t, i_t, o_s, T, b_k, b_v, b_dk, b_dv, qk_scale, D: tl.constexpr,
               BT: tl.constexpr, DIAG: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    o_t = i_t * BT + tl.arange(0, BT)
    b_q = _load_rows(q, base, o_t, T, D, DOT)
    b_do = _load_rows(do, base, o_t, T, D, DOT)
    b_p = _probs(b_q, b_k, lse, o_t, o_s, T, bh_t, qk_scale, DIAG, PREC)
    b_dv += tl.dot(tl.trans(b_p.to(DOT)), b_do, input_precision=PREC)
    b_delta = tl.load(delta + bh_t + o_t, mask=o_t < T, other=0.0)
    b_ds = b_p * (tl.dot(b_do, tl.trans(b_v), input_precision=PREC) - b_delta[:, None])
    b_dk += tl.dot(tl.trans(b_ds.to(DOT)), b_q, input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, T, NB, scale, qk_scale, D: tl.constexpr,
                     BT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    base = i_bh.to(tl.int64) * T * D
    bh_t = i_bh.to(tl.int64) * T
    row = i_bh.to(tl.int64) * NB + i_s
    o_s = i_s * BT + tl.arange(0, BT)
    b_k = _load_rows(k, base, o_s, T, D, DOT)
    b_v = _load_rows(v, base, o_s, T, D, DOT)
    b_dk = tl.zeros([BT, D], dtype=tl.float32)
    b_dv = tl.zeros([BT, D], dtype=tl.float32)
    # The diagonal block first in the list, then the query blocks below it that keep this key block.
    b_dk, b_dv = _dkdv_step(
        q, do, lse, delta, base, bh_t, i_s, o_s, T, b_k, b_v, b_dk, b_dv, qk_scale, D, BT, True, DOT, PREC
    )
    n = tl.load(q_cnt + row)
    for i_n in range(1, n):
        i_t = tl.load(q_idx + row * NB + i_n)
        b_dk, b_dv = _dkdv_step(
            q, do, lse, delta, base, bh_t, i_t, o_s, T, b_k, b_v, b_dk, b_dv, qk_scale, D, BT, False, DOT, PREC
        )
    _store_rows(dk, base, o_s, T, b_dk * scale, D)
    _store_rows(dv, base, o_s, T, b_dv, D)


@triton.jit
def _dq_step(b_q, b_do, b_delta, k, v, lse, base, bh_t, i_s, o_t, T, b_dq, qk_scale, D: tl.constexpr,
             BT: tl.constexpr, DIAG: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    o_s = i_s * BT + tl.arange(0, BT)
    b_k = _load_rows(k, base, o_s, T, D, DOT)
    b_v = _load_rows(v, base, o_s, T, D, DOT)
    b_p = _probs(b_q, b_k, lse, o_t, o_s, T, bh_t, qk_scale, DIAG, PREC)
    b_ds = b_p * (tl.dot(b_do, tl.trans(b_v), input_precision=PREC) - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(DOT), b_k, input_precision=PREC)


@triton.jit
def _bwd_dq_kernel(q, k, v, do, lse, delta, dq, kv_idx, kv_cnt, T, NB, scale, qk_scale, D: tl.constexpr,
                   BT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    base = i_bh.to(tl.int64) * T * D
    bh_t = i_bh.to(tl.int64) * T
    row = i_bh.to(tl.int64) * NB + i_t
    o_t = i_t * BT + tl.arange(0, BT)
    b_q = _load_rows(q, base, o_t, T, D, DOT)
    b_do = _load_rows(do, base, o_t, T, D, DOT)
    b_delta = tl.load(delta + bh_t + o_t, mask=o_t < T, other=0.0)
    b_dq = tl.zeros([BT, D], dtype=tl.float32)
    n = tl.load(kv_cnt + row)
    for i_n in range(0, n - 1):
        i_s = tl.load(kv_idx + row * NB + i_n)
        b_dq = _dq_step(b_q, b_do, b_delta, k, v, lse, base, bh_t, i_s, o_t, T, b_dq, qk_scale, D, BT, False, DOT, PREC)
    b_dq = _dq_step(b_q, b_do, b_delta, k, v, lse, base, bh_t, i_t, o_t, T, b_dq, qk_scale, D, BT, True, DOT, PREC)
    _store_rows(dq, base, o_t, T, b_dq * scale, D)


def _dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    """Operand dtype and precision of ``tl.dot``: the input dtype on a GPU (fp32 as IEEE fp32, not TF32); fp32 in
    the interpreter, whose bf16 dot multiplies bit patterns as integers (as in linear_attention)."""
    if device.type != "cuda" or dtype == torch.float32:
        return {"DOT": tl.float32, "PREC": "ieee"}
    return {"DOT": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PREC": "tf32"}


def _launch_args(q: torch.Tensor, block_size: int) -> dict:
    warps = 8 if block_size >= 128 else 4
    return {"D": q.shape[-1], "BT": block_size, "num_warps": warps, **_dot_args(q.dtype, q.device)}


def block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_idx, kv_cnt, q_idx, q_cnt)`` int32 from a bool ``[B, H, NB, NB]`` mask with its diagonal kept.

    ``kv_idx[b, h, i, :kv_cnt[b, h, i]]``: the kept causal key blocks of query block ``i``, ascending (the diagonal
    last); ``q_idx[b, h, j, :q_cnt[b, h, j]]``: the query blocks keeping key block ``j``, ascending (the diagonal
    first). The rest of each row is padding."""
    nb = block_mask.shape[-1]
    m = block_mask & torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril()
    lists = []
    for mm in (m, m.transpose(-1, -2)):
        # A stable sort of "dropped" flags puts the kept indices first, in ascending order.
        idx = torch.sort((~mm).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
        lists += [idx, mm.sum(-1, dtype=torch.int32).contiguous()]
    return tuple(lists)


def block_sparse_attention_fwd(q, k, v, kv_idx, kv_cnt, block_size: int, scale: float):
    """``(o [B, H, T, D] in q's dtype, lse [B, H, T] fp32)``; contiguous inputs, no autograd."""
    batch, heads, seq, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    nb = kv_cnt.shape[-1]
    if o.numel():
        grid = (nb, batch * heads)
        _fwd_kernel[grid](q, k, v, o, lse, kv_idx, kv_cnt, seq, nb, scale * LOG2E, **_launch_args(q, block_size))
    return o, lse


def block_sparse_attention_bwd(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_size: int, scale: float):
    """``(dq, dk, dv)`` in the inputs' dtype; contiguous inputs, no autograd."""
    batch, heads, seq, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not q.numel():
        return dq, dk, dv
    delta = (o.float() * do.float()).sum(-1).contiguous()
    nb = kv_cnt.shape[-1]
    grid, common = (nb, batch * heads), _launch_args(q, block_size)
    _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, seq, nb, scale, scale * LOG2E, **common)
    _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, kv_idx, kv_cnt, seq, nb, scale, scale * LOG2E, **common)
    return dq, dk, dv


@torch.library.custom_op("tilewise::block_sparse_attention", mutates_args=())
def _bsa_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernel: ``(o, lse)`` (see :func:`block_sparse_attention_fwd`)."""
    return block_sparse_attention_fwd(q, k, v, kv_idx, kv_cnt, block_size, scale)


@_bsa_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tilewise::block_sparse_attention_bwd", mutates_args=())
def _bsa_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_bsa_op` with respect to ``q, k, v``."""
    return block_sparse_attention_bwd(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale)


@_bsa_bwd_op.register_fake
def _(q, k, v, o, lse, do, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_idx, kv_cnt, q_idx, q_cnt, block_size, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
    q, k, v, o, lse, kv_idx, kv_cnt, q_idx, q_cnt = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv = _bsa_bwd_op(q, k, v, o, lse, do.contiguous(), kv_idx, kv_cnt, q_idx, q_cnt, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


_bsa_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """Validated arguments in (``block_mask`` bool ``[B, H, NB, NB]``, diagonal kept), ``o [B, H, T, D]`` out;
    differentiable in ``q, k, v`` (the gradient of ``lse`` is not: it is internal)."""
    lists = block_lists(block_mask)
    o, _ = _bsa_op(q.contiguous(), k.contiguous(), v.contiguous(), *lists, int(block_size), float(scale))
    return o
