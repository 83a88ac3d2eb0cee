"""Triton kernels for chunked causal linear attention (no gate, a scalar or a per-key-dim log-decay gate).

Tokens are cut into chunks of ``BT = 64`` (each packed sequence on its own). Four kernels (README.md has the math):

1. ``_chunk_state_kernel`` walks the chunks of one ``(sequence, head)`` in order and stores the state ``h_n``
   (fp32 ``[Dk, Dv]``) at the start of every chunk; run in reverse over ``(q, do)`` it stores the state gradient
   ``dh_{n+1}`` at the end of every chunk instead.
2. ``_chunk_fwd_o_kernel``: per ``(chunk, head, V block)``,
   ``o = scale * ((q ⊙ e^G) h_n + mask(q k^T ⊙ e^{G_i-G_j}) v)``.
3. ``_chunk_bwd_dqk_kernel`` and ``_chunk_bwd_dv_kernel``: the chunk's ``dq, dk`` (and the gate's ``dG = q·dq - k·dk``)
   and ``dv`` from ``h_n`` and ``dh_{n+1}``.

The vector gate ``[T, H, K]`` (GLA; opt-in, not yet run on a GPU) uses the state kernel with ``VEC_G`` and its own
``_gla_*`` output / gradient kernels, which form the intra-chunk scores one key dim at a time (README.md).

The gate's gradient ``dg`` is the reverse cumulative sum of ``dG`` within each chunk plus the chunk-end state term
``<dh_{n+1}, h_{n+1}>`` (in the dq/dk kernel); the host only adds the K blocks.
The autograd pair is registered with ``torch.library`` (``tilewise::linear_attention_chunk`` and its ``_bwd``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from tilewise.ops._launch import dot_args as _dot_args

__all__ = ["BT", "TUNING", "linear_attention_bwd", "linear_attention_fwd", "linear_attention_triton"]

# Chunk length: the intra-chunk attention is a [BT, BT] block.
BT = 64


@triton.jit
def _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(first token, length, chunk within the sequence)`` of the sequence holding global chunk ``i_c``."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
        i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        NT = tl.cdiv(T, BT)
        i_n, i_t = i_c // NT, i_c % NT
        # int64: (token * H + head) * D can pass 2**31.
        bos = i_n.to(tl.int64) * T
    return bos, T, i_t


@triton.jit
def _load_gate(g, bos, o_t, m_t, i_h, H: tl.constexpr):
    """``(G, G_last)``: inclusive cumulative log decay over the chunk ``[BT]`` (0 past the end) and its total."""
    b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    return tl.cumsum(b_g, 0), tl.sum(b_g, 0)


@triton.jit
def _chunk_state_kernel(
    a,
    b,
    g,
    h_in,
    hs,
    h_out,
    cu_seqlens,
    chunk_offsets,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    VEC_G: tl.constexpr,
    USE_H_IN: tl.constexpr,
    STORE_H_OUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    REVERSE: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """One ``[BK, BV]`` block of the state of one ``(sequence, head)``, chunk by chunk.

    Forward (``a, b = k, v``): store ``h_n`` into ``hs[chunk]``, then ``h <- e^{G_last} h + (k ⊙ e^{G_last-G})^T v``.
    Reverse (``a, b = q, do``, chunks last to first): store ``dh_{n+1}``, then
    ``dh <- e^{G_last} dh + scale (q ⊙ e^G)^T do``. ``h_in``: initial state (forward) or d final state (reverse);
    ``h_out``: final state (forward) or d initial state (reverse). States are ``[N, H, K, V]`` fp32.
    """
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
        NT = tl.cdiv(T, BT)
    else:
        NT = tl.cdiv(T, BT)
        bos = i_n.to(tl.int64) * T
        boh = i_n.to(tl.int64) * NT
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H_IN:
        b_h += tl.load(h_in + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0)
    for i in range(0, NT):
        i_t = NT - 1 - i if REVERSE else i
        tl.store(hs + ((boh + i_t) * H + i_h) * K * V + o_kv, b_h, mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        # a^T [BK, BT], b [BT, BV]
        p_a = a + ((bos + o_t[None, :]) * H + i_h) * K + o_k[:, None]
        b_a = tl.load(p_a, mask=m_t[None, :] & (o_k < K)[:, None], other=0.0).to(tl.float32)
        p_b = b + ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        b_b = tl.load(p_b, mask=m_t[:, None] & (o_v < V)[None, :], other=0.0)
        if USE_G and VEC_G:
            # Vector gate [T, H, K]: G^T [BK, BT] (cumulative over the chunk per key), G_last [BK].
            p_g = g + ((bos + o_t[None, :]) * H + i_h) * K + o_k[:, None]
            b_gr = tl.load(p_g, mask=m_t[None, :] & (o_k < K)[:, None], other=0.0).to(tl.float32)
            b_gc, b_glast = tl.cumsum(b_gr, 1), tl.sum(b_gr, 1)
            if REVERSE:
                b_a = b_a * tl.exp(b_gc) * scale
            else:
                b_a = b_a * tl.exp(b_glast[:, None] - b_gc)
            b_h = b_h * tl.exp(b_glast)[:, None]
        elif USE_G:
            b_gc, b_glast = _load_gate(g, bos, o_t, m_t, i_h, H)
            if REVERSE:
                b_a = b_a * (tl.exp(b_gc) * scale)[None, :]
            else:
                b_a = b_a * tl.exp(b_glast - b_gc)[None, :]
            b_h = b_h * tl.exp(b_glast)
        elif REVERSE:
            b_a = b_a * scale
        b_h += tl.dot(b_a.to(DOT), b_b.to(DOT), input_precision=PREC)
    if STORE_H_OUT:
        tl.store(h_out + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def _chunk_fwd_o_kernel(
    q,
    k,
    v,
    g,
    hs,
    o,
    cu_seqlens,
    chunk_indices,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``o [BT, BV]`` of one ``(chunk, head)``: ``scale * ((q ⊙ e^G) h_n + mask(q k^T ⊙ e^{G_i - G_j}) v)``."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_hs = hs + (i_c.to(tl.int64) * H + i_h) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_q = q + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0.0).to(DOT)
        p_kt = k + ((bos + o_t[None, :]) * H + i_h) * K + o_k[:, None]
        b_kt = tl.load(p_kt, mask=m_t[None, :] & m_k[:, None], other=0.0).to(DOT)
        b_h = tl.load(p_hs + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h.to(DOT), input_precision=PREC)
        b_A += tl.dot(b_q, b_kt, input_precision=PREC)
    m_causal = o_t[:, None] >= o_t[None, :]
    if USE_G:
        b_gc, _ = _load_gate(g, bos, o_t, m_t, i_h, H)
        b_o = b_o * tl.exp(b_gc)[:, None]
        # Mask before exp: G_i - G_j > 0 above the diagonal would overflow.
        b_A = tl.where(m_causal, b_A * tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
    else:
        b_A = tl.where(m_causal, b_A, 0.0)
    p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
    b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_o += tl.dot(b_A.to(DOT), b_v.to(DOT), input_precision=PREC)
    tl.store(o + p_v, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """``(first token, length)`` of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
    return bos, T


@triton.jit
def _chunk_fwd_fused_kernel(
    q,
    k,
    v,
    g,
    h_in,
    o,
    h_out,
    cu_seqlens,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_H_IN: tl.constexpr,
    STORE_H_OUT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The whole forward of one ``(sequence, head, V block)`` in one pass: the state ``h [K, BV]`` stays in fp32
    registers while the chunks go by, so no chunk state touches memory (``KP``: K padded to a power of two).

    Per chunk: ``o = scale * ((q ⊙ e^G) h + mask(q k^T ⊙ e^{G_i - G_j}) v)``, then
    ``h <- e^{G_last} h + (k ⊙ e^{G_last-G})^T v``: the state and output kernels' math, in one loop."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    NT = tl.cdiv(T, BT)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_H_IN:
        b_h += tl.load(h_in + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0)
    for i_t in range(0, NT):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_q = q + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0.0).to(DOT)
        p_kt = k + ((bos + o_t[None, :]) * H + i_h) * K + o_k[:, None]
        b_kt = tl.load(p_kt, mask=m_t[None, :] & m_k[:, None], other=0.0).to(tl.float32)
        p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT)
        b_A = tl.dot(b_q, b_kt.to(DOT), input_precision=PREC)
        b_o = tl.dot(b_q, b_h.to(DOT), input_precision=PREC)
        m_causal = o_t[:, None] >= o_t[None, :]
        if USE_G:
            b_gc, b_glast = _load_gate(g, bos, o_t, m_t, i_h, H)
            b_o = b_o * tl.exp(b_gc)[:, None]
            # Mask before exp: G_i - G_j > 0 above the diagonal would overflow.
            b_A = tl.where(m_causal, b_A * tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
            b_kt = b_kt * tl.exp(b_glast - b_gc)[None, :]
            b_h = b_h * tl.exp(b_glast)
        else:
            b_A = tl.where(m_causal, b_A, 0.0)
        b_o += tl.dot(b_A.to(DOT), b_v, input_precision=PREC)
        tl.store(o + p_v, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_h += tl.dot(b_kt.to(DOT), b_v, input_precision=PREC)
    if STORE_H_OUT:
        tl.store(h_out + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def _chunk_bwd_dqk_kernel(
    q,
    k,
    v,
    g,
    hs,
    dhs,
    do,
    dq,
    dk,
    dg,
    cu_seqlens,
    chunk_indices,
    T,
    T_all,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dq, dk [BT, BK]`` of one ``(chunk, head, K block)``, and this K block's share of ``dg``.

    ``dq = scale (e^G ⊙ do h_n^T + (mask(do v^T) ⊙ e^{G_i-G_j}) k)``,
    ``dk = e^{G_last-G} ⊙ v dh_{n+1}^T + scale (mask(do v^T) ⊙ e^{G_i-G_j})^T q``.

    ``dg_t = <dh_{n+1}, h_{n+1}> + Σ_{s>=t in the chunk} (q_s·dq_s - k_s·dk_s)``: the reverse sum of ``dΓ`` is cut at
    the chunk's end, where it equals the state term ``<dh_{n+1}, h_{n+1}> = e^{G_last} <dh_{n+1}, h_n> +
    Σ_j k_j·(e^{G_last-G_j} v_j dh_{n+1}^T)`` (README, Gate). A sum of ``dΓ`` over the whole sequence would cancel
    to a small number from terms rounded by 16-bit dot operands.
    """
    i_ch, i_k = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    p_qk = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    o_hs = (i_c.to(tl.int64) * H + i_h) * K * V
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    # Σ_v h_n ⊙ dh_{n+1} in fp32, per key of this block (for dg's chunk-end term).
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(DOT)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(DOT)
        # h^T, dh^T [BV, BK]
        o_hT = o_k[None, :] * V + o_v[:, None]
        m_hT = (o_k < K)[None, :] & (o_v < V)[:, None]
        b_hT = tl.load(hs + o_hs + o_hT, mask=m_hT, other=0.0)
        b_dhT = tl.load(dhs + o_hs + o_hT, mask=m_hT, other=0.0)
        if USE_G:
            b_hdh += tl.sum(b_hT * b_dhT, 0)
        b_ds += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dq += tl.dot(b_do, b_hT.to(DOT), input_precision=PREC)
        b_dk += tl.dot(b_v, b_dhT.to(DOT), input_precision=PREC)
    m_causal = o_t[:, None] >= o_t[None, :]
    if USE_G:
        b_gc, b_glast = _load_gate(g, bos, o_t, m_t, i_h, H)
        b_dq = b_dq * tl.exp(b_gc)[:, None]
        b_dk = b_dk * tl.exp(b_glast - b_gc)[:, None]
        # This K block's part of <dh_{n+1}, h_{n+1}>; b_dk is still the state term of dk. Masked rows of k are 0.
        b_dg_end = tl.exp(b_glast) * tl.sum(b_hdh, 0) + tl.sum(tl.sum(b_k * b_dk, 1), 0)
        b_ds = tl.where(m_causal, b_ds * tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
    else:
        b_ds = tl.where(m_causal, b_ds, 0.0)
    b_ds = (b_ds * scale).to(DOT)
    b_dq = b_dq * scale + tl.dot(b_ds, b_k.to(DOT), input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_ds), b_q.to(DOT), input_precision=PREC)
    tl.store(dq + p_qk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_qk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if USE_G:
        # dg for this K block (the host sums the blocks): dΓ = q·dq - k·dk (0 on masked rows, where q, k are 0)
        # summed from the chunk's end, plus the chunk-end term.
        b_dg = tl.cumsum(tl.sum(b_q * b_dq - b_k * b_dk, 1), 0, reverse=True) + b_dg_end
        tl.store(dg + (i_k.to(tl.int64) * T_all + bos + o_t) * H + i_h, b_dg, mask=m_t)


@triton.jit
def _chunk_bwd_dv_kernel(
    q,
    k,
    g,
    dhs,
    do,
    dv,
    cu_seqlens,
    chunk_indices,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dv [BT, BV]`` of one ``(chunk, head, V block)``:
    ``(k ⊙ e^{G_last-G}) dh_{n+1} + scale mask(k q^T ⊙ e^{G_i-G_j}) do`` (the attention transposed: row ``j``,
    column ``i >= j``)."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    if USE_G:
        b_gc, b_glast = _load_gate(g, bos, o_t, m_t, i_h, H)
    o_hs = (i_c.to(tl.int64) * H + i_h) * K * V
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_k = k + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        p_qt = q + ((bos + o_t[None, :]) * H + i_h) * K + o_k[:, None]
        b_qt = tl.load(p_qt, mask=m_t[None, :] & m_k[:, None], other=0.0).to(DOT)
        b_dh = tl.load(dhs + o_hs + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_At += tl.dot(b_k.to(DOT), b_qt, input_precision=PREC)
        if USE_G:
            b_k = b_k * tl.exp(b_glast - b_gc)[:, None]
        b_dv += tl.dot(b_k.to(DOT), b_dh.to(DOT), input_precision=PREC)
    m_causal = o_t[:, None] <= o_t[None, :]
    if USE_G:
        b_At = tl.where(m_causal, b_At * tl.exp(tl.where(m_causal, b_gc[None, :] - b_gc[:, None], 0.0)), 0.0)
    else:
        b_At = tl.where(m_causal, b_At, 0.0)
    p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
    b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dv += tl.dot((b_At * scale).to(DOT), b_do.to(DOT), input_precision=PREC)
    tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _fused_bwd_dq_kernel(
    k,
    v,
    do,
    h_in,
    dq,
    cu_seqlens,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    VP: tl.constexpr,
    USE_H_IN: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """No gate: ``dq [BT, BK]`` of every chunk of one ``(sequence, head, K block)`` in one forward sweep, the state
    rows ``h_n [BK, V]`` kept in fp32 registers: ``dq = scale (do h_n^T + mask(do v^T) k)``, then
    ``h <- h + k^T v``."""
    i_nh, i_k = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = tl.arange(0, VP)
    m_v = o_v < V
    b_h = tl.zeros([BK, VP], dtype=tl.float32)
    if USE_H_IN:
        b_h += tl.load(
            h_in + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT)
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT)
        p_k = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(DOT)
        b_ds = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = tl.where(o_t[:, None] >= o_t[None, :], b_ds, 0.0)
        b_dq = tl.dot(b_do, tl.trans(b_h.to(DOT)), input_precision=PREC)
        b_dq = b_dq * scale + tl.dot((b_ds * scale).to(DOT), b_k, input_precision=PREC)
        tl.store(dq + p_k, b_dq.to(dq.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)


@triton.jit
def _fused_bwd_dk_kernel(
    q,
    v,
    do,
    dht,
    dk,
    dh0,
    cu_seqlens,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    VP: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """No gate: ``dk [BT, BK]`` of every chunk of one ``(sequence, head, K block)``, chunks last to first, the state
    gradient rows ``dh [BK, V]`` in fp32 registers: ``dk = v dh_{n+1}^T + scale mask(do v^T)^T q``, then
    ``dh <- dh + scale q^T do``; the last ``dh`` is ``d initial_state``."""
    i_nh, i_k = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = tl.arange(0, VP)
    m_v = o_v < V
    o_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, VP], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + o_kv, mask=m_k[:, None] & m_v[None, :], other=0.0)
    NT = tl.cdiv(T, BT)
    for i in range(0, NT):
        o_t = (NT - 1 - i) * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT)
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT)
        p_k = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_ds = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = tl.where(o_t[:, None] >= o_t[None, :], b_ds, 0.0)
        b_dk = tl.dot(b_v, tl.trans(b_dh.to(DOT)), input_precision=PREC)
        b_dk += tl.dot(tl.trans((b_ds * scale).to(DOT)), b_q.to(DOT), input_precision=PREC)
        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        b_dh += tl.dot(tl.trans((b_q * scale).to(DOT)), b_do, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + o_kv, b_dh, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _fused_bwd_dv_kernel(
    q,
    k,
    do,
    dht,
    dv,
    cu_seqlens,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """No gate: ``dv [BT, BV]`` of every chunk of one ``(sequence, head, V block)``, chunks last to first, the state
    gradient columns ``dh [K, BV]`` in fp32 registers: ``dv = k dh_{n+1} + scale mask(q k^T)^T do``, then
    ``dh <- dh + scale q^T do``."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = _seq_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dh = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(
            dht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )
    NT = tl.cdiv(T, BT)
    for i in range(0, NT):
        o_t = (NT - 1 - i) * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_k = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(DOT)
        b_q = tl.load(q + p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT)
        # A^T [BT (key j), BT (query i)], kept where j <= i.
        b_At = tl.dot(b_k, tl.trans(b_q.to(DOT)), input_precision=PREC)
        b_At = tl.where(o_t[:, None] <= o_t[None, :], b_At, 0.0)
        b_dv = tl.dot(b_k, b_dh.to(DOT), input_precision=PREC)
        b_dv += tl.dot((b_At * scale).to(DOT), b_do, input_precision=PREC)
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        b_dh += tl.dot(tl.trans((b_q * scale).to(DOT)), b_do, input_precision=PREC)


# ---- Vector gate g [T, H, K] (GLA). The decay differs per key dim, so the intra-chunk scores
# A_ij = Σ_d q_id k_jd e^{G_id - G_jd} (j <= i) cannot be one dot of gated operands over the whole chunk without
# factors e^{-G_j} that overflow. The chunk splits in two halves: across them (j in the first, i in the second) the
# factors around the gate at the second half's first row are both <= 1, so that block is one dot; within a half
# the sums run elementwise in fp32, one key row at a time ([BC, K] per row, exponents masked to <= 0 before exp).
# A is computed once per (chunk, head) (_gla_intra_kernel) and read by the output and dv kernels.


@triton.jit
def _gla_key_row(k, g, bos, i_h, t, T, b_gc, b_gj, below, o_k, m_k, H: tl.constexpr, K: tl.constexpr):
    """Key row ``t`` for the row-by-row within-half sums: ``(k_t, G_t, e^{G_i - G_t})`` over the half's rows ``i``
    (``b_gc``), with ``b_gj`` the cumulative gate before row ``t`` and the exponent masked to ``-inf`` where not
    ``below`` (``i < t``), so it is never positive."""
    m_t = m_k & ((tl.zeros_like(o_k) + t) < T)  # a tensor mask (a scalar one fails in the interpreter)
    p_t = ((bos + t) * H + i_h) * K + o_k
    b_kt = tl.load(k + p_t, mask=m_t, other=0.0).to(tl.float32)
    b_gj += tl.load(g + p_t, mask=m_t, other=0.0).to(tl.float32)
    b_e = tl.exp(tl.where(below[:, None], b_gc - b_gj[None, :], float("-inf")))
    return b_kt, b_gj, b_e


@triton.jit
def _gla_intra_half(q, k, g, bos, i_h, t_start, T, b_q, b_gc, b_gstart, o_c, o_k, m_k, H: tl.constexpr,
                    K: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """``[BC, BC]`` diagonal block of ``A`` for the ``BC`` rows from ``t_start``: ``b_q``, ``b_gc`` their query and
    cumulative gate ``[BC, KP]``, ``b_gstart`` the cumulative gate before the first row ``[KP]``. One key row ``j``
    at a time: column ``j`` is ``Σ_d q_id k_jd e^{G_id - G_jd}`` for ``i >= j`` (the exponent is masked before
    ``exp``, so it is never positive)."""
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    b_gj = b_gstart
    for j in range(0, BC):
        b_kj, b_gj, b_e = _gla_key_row(k, g, bos, i_h, t_start + j, T, b_gc, b_gj, o_c >= j, o_k, m_k, H, K)
        b_col = tl.sum(b_q * b_kj[None, :] * b_e, 1)
        b_A += tl.where((o_c == j)[None, :], b_col[:, None], 0.0)
    return b_A


# Within a half of a chunk, e^{G_i - G_j} = e^{G_i - G_f} e^{G_f - G_j} around the half's first row f: one dot, if
# no factor can overflow. With |G - G_f| <= GATE_SPAN over the half (every key dim), each factor lies in
# [e^-60, e^60] (fp32 reaches e^88), and each product term keeps its relative rounding (the masked entries above
# the diagonal, up to e^60 |q k|, are dropped). Beyond it (decays past e^-60 within 32 tokens) the sums run row by
# row, exactly.
GATE_SPAN = 60.0


@triton.jit
def _gla_intra_diag(q, k, g, bos, i_h, t_start, T, b_q, b_k, b_gc, b_gstart, o_c, o_k, m_k, H: tl.constexpr,
                    K: tl.constexpr, BC: tl.constexpr, SPAN: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Diagonal ``[BC, BC]`` block of ``A`` for the half from ``t_start`` (see ``GATE_SPAN``): one dot when the
    gate's span allows, else :func:`_gla_intra_half`."""
    b_gf = tl.sum(tl.where((o_c == 0)[:, None], b_gc, 0.0), 0)
    if tl.max(tl.abs(b_gc - b_gf[None, :])) <= SPAN:
        b_qf = b_q * tl.exp(b_gc - b_gf[None, :])
        b_kf = b_k * tl.exp(b_gf[None, :] - b_gc)
        b_A = tl.where(o_c[:, None] >= o_c[None, :], tl.dot(b_qf, tl.trans(b_kf), input_precision=PREC), 0.0)
    else:
        b_A = _gla_intra_half(q, k, g, bos, i_h, t_start, T, b_q, b_gc, b_gstart, o_c, o_k, m_k, H, K, BC)
    return b_A


@triton.jit
def _gla_intra_kernel(
    q,
    k,
    g,
    A,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    SPAN: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The intra-chunk scores ``A [BT, BT]`` of one ``(chunk, head)`` with the vector gate, stored fp32 in rows of
    ``A [B*T, H, BT]``: ``A_ij = Σ_d q_id k_jd e^{G_id - G_jd}`` for ``j <= i``, 0 above. The chunk splits in two
    halves of ``BC = BT / 2`` rows. The lower-left block is one dot of ``q ⊙ e^{G - G_r}`` (second half) and
    ``k ⊙ e^{G_r - G}`` (first half) with ``G_r`` the gate at the second half's first row: both exponents are
    ``<= 0``, so the factors cannot overflow (``e^{G_i - G_j}`` itself is their product). The two diagonal blocks
    are one dot each around the half's first row when the gate's span allows (``GATE_SPAN``), else summed
    elementwise, one key row at a time (:func:`_gla_intra_half`)."""
    BC: tl.constexpr = BT // 2
    i_ch = tl.program_id(0)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    t0 = i_t * BT
    t1 = t0 + BC
    m0 = ((t0 + o_c) < T)[:, None] & m_k[None, :]
    m1 = ((t1 + o_c) < T)[:, None] & m_k[None, :]
    p0 = ((bos + t0 + o_c[:, None]) * H + i_h) * K + o_k[None, :]
    p1 = ((bos + t1 + o_c[:, None]) * H + i_h) * K + o_k[None, :]
    b_g0 = tl.load(g + p0, mask=m0, other=0.0).to(tl.float32)
    b_g1 = tl.load(g + p1, mask=m1, other=0.0).to(tl.float32)
    b_gc0 = tl.cumsum(b_g0, 0)
    b_g0sum = tl.sum(b_g0, 0)
    b_gc1 = tl.cumsum(b_g1, 0) + b_g0sum[None, :]
    # G_r: the gate at row t1 (0 past the end, where every q and k is 0 anyway)
    m_r = m_k & ((tl.zeros_like(o_k) + t1) < T)  # a tensor mask (a scalar one fails in the interpreter)
    b_gr = b_g0sum + tl.load(g + ((bos + t1) * H + i_h) * K + o_k, mask=m_r, other=0.0).to(tl.float32)
    b_q1 = tl.load(q + p1, mask=m1, other=0.0).to(tl.float32)
    b_k0 = tl.load(k + p0, mask=m0, other=0.0).to(tl.float32)
    # fp32 operands (PREC: tf32 on a GPU for 16-bit inputs, IEEE for fp32), not rounded to the input dtype
    b_qg = b_q1 * tl.exp(b_gc1 - b_gr[None, :])
    b_kg = b_k0 * tl.exp(b_gr[None, :] - b_gc0)
    b_A10 = tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC)
    b_k1 = tl.load(k + p1, mask=m1, other=0.0).to(tl.float32)
    b_A11 = _gla_intra_diag(q, k, g, bos, i_h, t1, T, b_q1, b_k1, b_gc1, b_g0sum, o_c, o_k, m_k, H, K, BC, SPAN, PREC)
    b_q0 = tl.load(q + p0, mask=m0, other=0.0).to(tl.float32)
    b_A00 = _gla_intra_diag(q, k, g, bos, i_h, t0, T, b_q0, b_k0, b_gc0, tl.zeros([KP], dtype=tl.float32), o_c, o_k,
                            m_k, H, K, BC, SPAN, PREC)  # fmt: skip
    p_a0 = ((bos + t0 + o_c[:, None]) * H + i_h) * BT + o_c[None, :]
    p_a1 = p_a0 + BC * H * BT
    r0 = ((t0 + o_c) < T)[:, None]
    r1 = ((t1 + o_c) < T)[:, None]
    tl.store(A + p_a0, b_A00, mask=r0)
    tl.store(A + p_a0 + BC, tl.zeros([BC, BC], dtype=tl.float32), mask=r0)
    tl.store(A + p_a1, b_A10, mask=r1)
    tl.store(A + p_a1 + BC, b_A11, mask=r1)


@triton.jit
def _gla_fwd_o_kernel(
    q,
    k,
    v,
    g,
    hs,
    A,
    o,
    cu_seqlens,
    chunk_indices,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``o [BT, BV]`` of one ``(chunk, head)`` with the vector gate: ``scale ((q ⊙ e^G) h_n + A v)``, ``A`` from
    :func:`_gla_intra_kernel`."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_hs = hs + (i_c.to(tl.int64) * H + i_h) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_qk = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_gc = tl.cumsum(tl.load(g + p_qk, mask=m_tk, other=0.0).to(tl.float32), 0)
        b_h = tl.load(p_hs + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot((b_q * tl.exp(b_gc)).to(DOT), b_h.to(DOT), input_precision=PREC)
    o_j = tl.arange(0, BT)
    b_A = tl.load(A + ((bos + o_t[:, None]) * H + i_h) * BT + o_j[None, :], mask=m_t[:, None], other=0.0)
    p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
    b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_o += tl.dot(b_A.to(DOT), b_v.to(DOT), input_precision=PREC)
    tl.store(o + p_v, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _gla_dqk_diag(k, g, bos, i_h, t_start, T, b_q, b_k, b_gc, b_gstart, b_ds, b_dq, b_dk, o_c, o_k, m_k,
                  H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, SPAN: tl.constexpr,
                  PREC: tl.constexpr):  # fmt: skip
    """``(dq, dk)`` of the half from ``t_start`` plus its within-half terms ``Σ_j ds_ij k_j ⊙ e^{G_i-G_j}`` and
    ``Σ_i ds_ij q_i ⊙ e^{G_i-G_j}`` (``b_ds`` scaled and masked to ``j <= i``): two dots around the half's first
    row when the gate's span allows (``GATE_SPAN``), else one key row at a time."""
    b_gf = tl.sum(tl.where((o_c == 0)[:, None], b_gc, 0.0), 0)
    if tl.max(tl.abs(b_gc - b_gf[None, :])) <= SPAN:
        b_eq = tl.exp(b_gc - b_gf[None, :])
        b_ek = tl.exp(b_gf[None, :] - b_gc)
        b_dq += b_eq * tl.dot(b_ds, b_k * b_ek, input_precision=PREC)
        b_dk += b_ek * tl.dot(tl.trans(b_ds), b_q * b_eq, input_precision=PREC)
    else:
        b_gj = b_gstart
        for j in range(0, BC):
            b_kj, b_gj, b_e = _gla_key_row(k, g, bos, i_h, t_start + j, T, b_gc, b_gj, o_c >= j, o_k, m_k, H, K)
            b_m = tl.sum(tl.where((o_c == j)[None, :], b_ds, 0.0), 1)[:, None] * b_e
            b_dq += b_m * b_kj[None, :]
            b_dk += tl.where((o_c == j)[:, None], tl.sum(b_m * b_q, 0)[None, :], 0.0)
    return b_dq, b_dk


@triton.jit
def _gla_bwd_dqk_kernel(
    q,
    k,
    v,
    g,
    hs,
    dhs,
    do,
    dq,
    dk,
    dg,
    cu_seqlens,
    chunk_indices,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SPAN: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dq, dk, dg [BT, BK]`` of one ``(chunk, head, K block)`` with the vector gate (README, Gradients):

    ``dq = scale (e^G ⊙ do h_n^T + Σ_j ds_ij k_j ⊙ e^{G_i-G_j})``, ``dk = e^{G_last-G} ⊙ v dh_{n+1}^T +
    scale Σ_i ds_ij q_i ⊙ e^{G_i-G_j}`` with ``ds = mask(do v^T)``, ``dg_t = <dh_{n+1}, h_{n+1}>_v + Σ_{s>=t in the
    chunk} (q_s ⊙ dq_s - k_s ⊙ dk_s)``, per key dim. The chunk is held as two halves of ``BC = BT / 2`` rows (0 and
    1), as in :func:`_gla_intra_kernel`: the cross-half sums are dots of operands gated around ``G_r`` (the gate at
    half 1's first row; every exponent ``<= 0``), the within-half ones :func:`_gla_dqk_diag`.
    """
    BC: tl.constexpr = BT // 2
    i_ch, i_k = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    t0 = i_t * BT
    t1 = t0 + BC
    r0, r1 = (t0 + o_c) < T, (t1 + o_c) < T
    m0, m1 = r0[:, None] & m_k[None, :], r1[:, None] & m_k[None, :]
    p0 = ((bos + t0 + o_c[:, None]) * H + i_h) * K + o_k[None, :]
    p1 = ((bos + t1 + o_c[:, None]) * H + i_h) * K + o_k[None, :]
    b_q0 = tl.load(q + p0, mask=m0, other=0.0).to(tl.float32)
    b_q1 = tl.load(q + p1, mask=m1, other=0.0).to(tl.float32)
    b_k0 = tl.load(k + p0, mask=m0, other=0.0).to(tl.float32)
    b_k1 = tl.load(k + p1, mask=m1, other=0.0).to(tl.float32)
    b_g0 = tl.load(g + p0, mask=m0, other=0.0).to(tl.float32)
    b_g1 = tl.load(g + p1, mask=m1, other=0.0).to(tl.float32)
    b_s0 = tl.sum(b_g0, 0)
    b_gc0 = tl.cumsum(b_g0, 0)
    b_gc1 = tl.cumsum(b_g1, 0) + b_s0[None, :]
    b_glast = b_s0 + tl.sum(b_g1, 0)
    m_r = m_k & ((tl.zeros_like(o_k) + t1) < T)  # a tensor mask (a scalar one fails in the interpreter)
    b_gr = b_s0 + tl.load(g + ((bos + t1) * H + i_h) * K + o_k, mask=m_r, other=0.0).to(tl.float32)
    o_hs = (i_c.to(tl.int64) * H + i_h) * K * V
    b_dq0 = tl.zeros([BC, BK], dtype=tl.float32)
    b_dq1 = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk0 = tl.zeros([BC, BK], dtype=tl.float32)
    b_dk1 = tl.zeros([BC, BK], dtype=tl.float32)
    b_ds00 = tl.zeros([BC, BC], dtype=tl.float32)
    b_ds10 = tl.zeros([BC, BC], dtype=tl.float32)
    b_ds11 = tl.zeros([BC, BC], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        pv0 = ((bos + t0 + o_c[:, None]) * H + i_h) * V + o_v[None, :]
        pv1 = ((bos + t1 + o_c[:, None]) * H + i_h) * V + o_v[None, :]
        b_v0 = tl.load(v + pv0, mask=r0[:, None] & m_v[None, :], other=0.0).to(DOT)
        b_v1 = tl.load(v + pv1, mask=r1[:, None] & m_v[None, :], other=0.0).to(DOT)
        b_do0 = tl.load(do + pv0, mask=r0[:, None] & m_v[None, :], other=0.0).to(DOT)
        b_do1 = tl.load(do + pv1, mask=r1[:, None] & m_v[None, :], other=0.0).to(DOT)
        o_hT = o_k[None, :] * V + o_v[:, None]
        m_hT = m_k[None, :] & m_v[:, None]
        b_hT = tl.load(hs + o_hs + o_hT, mask=m_hT, other=0.0)
        b_dhT = tl.load(dhs + o_hs + o_hT, mask=m_hT, other=0.0)
        b_hdh += tl.sum(b_hT * b_dhT, 0)
        b_ds00 += tl.dot(b_do0, tl.trans(b_v0), input_precision=PREC)
        b_ds10 += tl.dot(b_do1, tl.trans(b_v0), input_precision=PREC)
        b_ds11 += tl.dot(b_do1, tl.trans(b_v1), input_precision=PREC)
        b_dq0 += tl.dot(b_do0, b_hT.to(DOT), input_precision=PREC)
        b_dq1 += tl.dot(b_do1, b_hT.to(DOT), input_precision=PREC)
        b_dk0 += tl.dot(b_v0, b_dhT.to(DOT), input_precision=PREC)
        b_dk1 += tl.dot(b_v1, b_dhT.to(DOT), input_precision=PREC)
    b_dq0 = b_dq0 * tl.exp(b_gc0) * scale
    b_dq1 = b_dq1 * tl.exp(b_gc1) * scale
    b_dk0 = b_dk0 * tl.exp(b_glast[None, :] - b_gc0)
    b_dk1 = b_dk1 * tl.exp(b_glast[None, :] - b_gc1)
    # <dh_{n+1}, h_{n+1}> per key (summed over v), while b_dk is still the state term of dk. Masked rows are 0.
    b_dg_end = tl.exp(b_glast) * b_hdh + tl.sum(b_k0 * b_dk0, 0) + tl.sum(b_k1 * b_dk1, 0)
    # across the halves (i in half 1, j in half 0; fp32 operands, as in _gla_intra_kernel)
    b_e1 = tl.exp(b_gc1 - b_gr[None, :])
    b_e0 = tl.exp(b_gr[None, :] - b_gc0)
    b_ds10 = b_ds10 * scale
    b_dq1 += b_e1 * tl.dot(b_ds10, b_k0 * b_e0, input_precision=PREC)
    b_dk0 += b_e0 * tl.dot(tl.trans(b_ds10), b_q1 * b_e1, input_precision=PREC)
    # within each half
    m_causal = o_c[:, None] >= o_c[None, :]
    b_ds00 = tl.where(m_causal, b_ds00 * scale, 0.0)
    b_ds11 = tl.where(m_causal, b_ds11 * scale, 0.0)
    b_dq0, b_dk0 = _gla_dqk_diag(k, g, bos, i_h, t0, T, b_q0, b_k0, b_gc0, tl.zeros([BK], dtype=tl.float32), b_ds00,
                                 b_dq0, b_dk0, o_c, o_k, m_k, H, K, BC, SPAN, PREC)  # fmt: skip
    b_dq1, b_dk1 = _gla_dqk_diag(k, g, bos, i_h, t1, T, b_q1, b_k1, b_gc1, b_s0, b_ds11, b_dq1, b_dk1, o_c, o_k, m_k,
                                 H, K, BC, SPAN, PREC)  # fmt: skip
    tl.store(dq + p0, b_dq0.to(dq.dtype.element_ty), mask=m0)
    tl.store(dq + p1, b_dq1.to(dq.dtype.element_ty), mask=m1)
    tl.store(dk + p0, b_dk0.to(dk.dtype.element_ty), mask=m0)
    tl.store(dk + p1, b_dk1.to(dk.dtype.element_ty), mask=m1)
    b_x0 = b_q0 * b_dq0 - b_k0 * b_dk0
    b_x1 = b_q1 * b_dq1 - b_k1 * b_dk1
    b_dg1 = tl.cumsum(b_x1, 0, reverse=True) + b_dg_end[None, :]
    tl.store(dg + p1, b_dg1, mask=m1)
    tl.store(dg + p0, tl.cumsum(b_x0, 0, reverse=True) + (tl.sum(b_x1, 0) + b_dg_end)[None, :], mask=m0)


@triton.jit
def _gla_bwd_dv_kernel(
    q,
    k,
    g,
    dhs,
    A,
    do,
    dv,
    cu_seqlens,
    chunk_indices,
    T,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dv [BT, BV]`` with the vector gate: ``(k ⊙ e^{G_last-G}) dh_{n+1} + scale A^T do``, ``A`` from
    :func:`_gla_intra_kernel`."""
    i_ch, i_v = tl.program_id(0), tl.program_id(1)
    i_c, i_h = i_ch // H, i_ch % H
    bos, T, i_t = _chunk_bounds(i_c, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_hs = (i_c.to(tl.int64) * H + i_h) * K * V
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_k = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_gr = tl.load(g + p_k, mask=m_tk, other=0.0).to(tl.float32)
        b_k = b_k * tl.exp(tl.sum(b_gr, 0)[None, :] - tl.cumsum(b_gr, 0))
        b_dh = tl.load(dhs + o_hs + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dv += tl.dot(b_k.to(DOT), b_dh.to(DOT), input_precision=PREC)
    # A^T (A from _gla_intra_kernel): row j, column i >= j.
    o_j = tl.arange(0, BT)
    b_At = tl.trans(tl.load(A + ((bos + o_t[:, None]) * H + i_h) * BT + o_j[None, :], mask=m_t[:, None], other=0.0))
    p_v = ((bos + o_t[:, None]) * H + i_h) * V + o_v[None, :]
    b_do = tl.load(do + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dv += tl.dot((b_At * scale).to(DOT), b_do.to(DOT), input_precision=PREC)
    tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


def _block(d: int, cap: int = 64) -> int:
    """Tile width along a feature dim: a power of two in [32, cap]. ``tl.dot`` accepts 16, but on an H100 with
    triton 3.6 16-bit dots with a 16-wide tile gave wrong outputs (Dv=16, fp16 and bf16, every gate; fp32 and
    16-bit at 32 were right), so feature dims below 32 are padded to 32 (masked)."""
    return min(cap, max(32, triton.next_power_of_2(d)))


# Launch choices (benchmarks/gpu_linear_attention.py --sweep times the alternatives on a GPU; the defaults are the
# H100 winners there). ``fused_fwd``: one pass per (sequence, head, V block) that keeps the state in registers
# (_chunk_fwd_fused_kernel) when at least ``fused_min_programs`` such programs fill the GPU, else the state and
# output kernels (more parallel, but every chunk state goes through memory). ``bwd_bk`` / ``bwd_bv``: the dq/dk
# kernel's K tile and the dv kernel's V tile (one tile for Dk, Dv <= 128 reads v, do and q, k once).
# ``low_precision_states``: with 16-bit inputs and no gate the chunk states go to memory in the input dtype; every
# reader rounds them to that dtype before its dot anyway, so this halves their bytes and changes no result.
# ``gated_low_precision_states``: the same with a scalar gate, where the dq/dk kernel also reads the states for
# dg's chunk-end term <dh, h>, which then sums 16-bit states (a change of result: fla keeps 16-bit states too; the
# GPU tests hold dg to the same bound either way, benchmarks/gpu_linear_attention.py prints both errors).
# H100 B=4 T=8192 H=16 D=128 bf16, no gate (ms, fwd / fwd+bwd): split with fp32 states 0.797 / 2.714, 16-bit states
# 0.556 / 1.834, fused bv64 w4 0.256 / 1.537, + gradient tiles 128 x 128 1.365 (w4) / 1.382 (w8); scalar gate
# fwd+bwd 2.623 (w4) / 2.476 (w8), with 16-bit states 1.813 (w8) (BENCHMARKS.md).
# ``fused_bwd`` (no gate, Dk, Dv <= 128, >= ``fused_min_programs`` programs): the gradients in three sweeps that
# keep their state slices in registers (_fused_bwd_dq/dk/dv_kernel), no chunk state in memory. H100 (same shape,
# no gate): fwd+bwd 0.877 ms with 4 warps (1.111 with 8) against 1.377 for the chunk-state kernels.
# ``fwd_bv_gated``: the fused forward's V tile with a scalar gate, whose per-chunk decay work sits on the state's
# serial chain: more, narrower programs hide it. H100, same shape, scalar gate, fwd: V tile 32 0.447 ms, 64 0.517
# (the no-gate default), 128 0.70 (8 warps); without a gate 64 stays best (0.250 against 0.42 at 32).
TUNING: dict[str, Any] = {
    "fused_fwd": True,
    "fused_min_programs": 64,
    "fwd_bv": 64,
    "fwd_bv_gated": 32,
    "fwd_warps": 4,
    "fwd_stages": None,
    "bwd_bk": 128,
    "bwd_bv": 128,
    "bwd_warps": 8,
    "low_precision_states": True,
    "gated_low_precision_states": True,
    "fused_bwd": True,
    "fused_bwd_warps": 4,
}


def _launch_opts(warps: int, stages: int | None) -> dict:
    return {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}


class _Layout:
    """How tokens split into chunks: ``N`` sequences, ``chunks`` in all, and for packed sequences the int32
    ``chunk_indices [chunks, 2]`` (sequence, chunk within it) and ``chunk_offsets [N]`` (first chunk of each)."""

    def __init__(self, batch: int, seq: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> None:
        self.seq = seq
        self.cu_seqlens = cu_seqlens
        self.chunk_indices = self.chunk_offsets = None
        if cu_seqlens is None:
            self.n = batch
            self.chunks = batch * triton.cdiv(seq, BT)
            return
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu().long()
        self.n = lens.numel()
        counts = (lens + BT - 1) // BT
        offsets = torch.cumsum(counts, 0) - counts
        self.chunks = int(counts.sum())
        seq_id = torch.repeat_interleave(torch.arange(self.n), counts)
        within = torch.arange(self.chunks) - offsets[seq_id]
        self.chunk_indices = torch.stack((seq_id, within), 1).to(device=device, dtype=torch.int32).contiguous()
        self.chunk_offsets = offsets.to(device=device, dtype=torch.int32)
        self.lens = lens

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None


def _state_dtype(x: torch.Tensor, g: torch.Tensor | None) -> torch.dtype:
    """The chunk states' dtype in memory (``x``: flat ``[B*T, H, D]``; ``g`` flat too, 3-D for the vector gate): the
    16-bit dot dtype where ``TUNING`` says so, else fp32 (the gated kernels also read the states for dg)."""
    vector = g is not None and g.dim() == 3
    wanted = TUNING["low_precision_states"] if g is None else TUNING["gated_low_precision_states"] and not vector
    low = wanted and _dot_args(x.dtype, x.device)["DOT"] != tl.float32
    return x.dtype if low else torch.float32


def _states(a, b, g, h_in, layout: _Layout, scale: float, reverse: bool, store_out: bool):
    """Launch ``_chunk_state_kernel``: ``(hs [chunks, H, K, V], h_out [N, H, K, V] fp32 or None)``; ``hs`` in
    :func:`_state_dtype`."""
    _, heads, dk = a.shape
    dv = b.shape[-1]
    hs = torch.empty(layout.chunks, heads, dk, dv, dtype=_state_dtype(a, g), device=a.device)
    h_out = torch.empty(layout.n, heads, dk, dv, dtype=torch.float32, device=a.device) if store_out else None
    bk, bv = _block(dk), _block(dv)
    grid = (layout.n * heads, triton.cdiv(dk, bk), triton.cdiv(dv, bv))
    _chunk_state_kernel[grid](
        a,
        b,
        g,
        h_in,
        hs,
        h_out,
        layout.cu_seqlens,
        layout.chunk_offsets,
        layout.seq,
        scale,
        H=heads,
        K=dk,
        V=dv,
        BT=BT,
        BK=bk,
        BV=bv,
        USE_G=g is not None,
        VEC_G=g is not None and g.dim() == 3,
        USE_H_IN=h_in is not None,
        STORE_H_OUT=store_out,
        IS_VARLEN=layout.varlen,
        REVERSE=reverse,
        num_warps=4,
        **_dot_args(a.dtype, a.device),
    )
    return hs, h_out


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T, H, ...]`` -> contiguous ``[B * T, H, ...]``."""
    return None if x is None else x.reshape(-1, *x.shape[2:]).contiguous()


def _gla_intra(qf, kf, gf, layout: _Layout, seq: int, heads: int, dk: int) -> torch.Tensor:
    """The vector gate's intra-chunk scores, fp32 ``[B*T, H, BT]`` (:func:`_gla_intra_kernel`)."""
    a = torch.empty(qf.shape[0], heads, BT, dtype=torch.float32, device=qf.device)
    _gla_intra_kernel[(layout.chunks * heads,)](
        qf, kf, gf, a, layout.cu_seqlens, layout.chunk_indices, seq, H=heads, K=dk, BT=BT,
        KP=max(32, triton.next_power_of_2(dk)), SPAN=GATE_SPAN, IS_VARLEN=layout.varlen, num_warps=4,
        **_dot_args(qf.dtype, qf.device),
    )  # fmt: skip
    return a


def linear_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host side, no autograd. ``q, k [B, T, H, Dk]``, ``v [B, T, H, Dv]`` (same dtype), ``g`` None or fp32
    ``[B, T, H]`` or ``[B, T, H, Dk]``, ``initial_state`` None or fp32 ``[N, H, Dk, Dv]``. Returns
    ``(o [B, T, H, Dv], final state)``."""
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    layout = _Layout(batch, seq, cu_seqlens, q.device)
    qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat(g)
    h0 = None if initial_state is None else initial_state.contiguous()
    o = torch.empty(batch, seq, heads, dv, dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        vector = g is not None and g.dim() == 4
        fwd_bv = _block(dv, TUNING["fwd_bv_gated" if g is not None else "fwd_bv"] if dk <= 128 else 32)
        programs = layout.n * heads * triton.cdiv(dv, fwd_bv)
        if not vector and TUNING["fused_fwd"] and programs >= TUNING["fused_min_programs"]:
            ht = torch.empty(layout.n, heads, dk, dv, dtype=torch.float32, device=q.device)
            _chunk_fwd_fused_kernel[(layout.n * heads, triton.cdiv(dv, fwd_bv))](
                qf, kf, vf, gf, h0, o, ht, layout.cu_seqlens, seq, scale,
                H=heads, K=dk, V=dv, BT=BT, KP=max(32, triton.next_power_of_2(dk)), BV=fwd_bv,
                USE_G=g is not None, USE_H_IN=h0 is not None, STORE_H_OUT=True, IS_VARLEN=layout.varlen,
                **_launch_opts(TUNING["fwd_warps"], TUNING["fwd_stages"]), **_dot_args(q.dtype, q.device),
            )  # fmt: skip
            return o, ht
        hs, ht = _states(kf, vf, gf, h0, layout, 1.0, reverse=False, store_out=True)
        if layout.chunks:
            bv = _block(dv)
            args = (qf, kf, vf, gf, hs, o, layout.cu_seqlens, layout.chunk_indices, seq, scale)
            meta = {"H": heads, "K": dk, "V": dv, "BT": BT, "BK": _block(dk), "BV": bv}
            meta |= {"IS_VARLEN": layout.varlen, "num_warps": 4, **_dot_args(q.dtype, q.device)}
            grid = (layout.chunks * heads, triton.cdiv(dv, bv))
            if vector:
                a = _gla_intra(qf, kf, gf, layout, seq, heads, dk)
                _gla_fwd_o_kernel[grid](*args[:5], a, *args[5:], **meta)
            else:
                _chunk_fwd_o_kernel[grid](*args, USE_G=g is not None, **meta)
    return o, ht


def linear_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Host side: ``(dq, dk, dv, dg [B, T, H] / [B, T, H, Dk] fp32 or None, d initial_state fp32 or None)``;
    ``dht`` is the gradient of the final state (None when it was not used). The chunk states are recomputed."""
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    layout = _Layout(batch, seq, cu_seqlens, q.device)
    qf, kf, vf, gf, dof = _flat(q), _flat(k), _flat(v), _flat(g), _flat(do)
    h0 = None if initial_state is None else initial_state.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bk, bv = _block(dk), _block(dv)
    nk = triton.cdiv(dk, bk)
    vec = g is not None and g.dim() == 4
    # The plain / scalar-gate gradient kernels' grid tiles may be wide (TUNING) for 16-bit inputs; their inner
    # loops keep 64. fp32 keeps 64: its IEEE dots at 128 asked 256 KB of shared memory on an H100 (227 KB there).
    wide_ok = q.dtype != torch.float32
    bk_w = _block(dk, TUNING["bwd_bk"] if wide_ok else 64)
    bv_w = _block(dv, TUNING["bwd_bv"] if wide_ok else 64)
    nk_w = triton.cdiv(dk, bk_w)
    dgk = torch.empty(nk_w, batch * seq, heads, dtype=torch.float32, device=q.device) if g is not None else None
    common = {"H": heads, "K": dk, "V": dv, "BT": BT, "BK": bk, "BV": bv}
    common |= {"IS_VARLEN": layout.varlen, "num_warps": 4, **_dot_args(q.dtype, q.device)}
    chunk_args = (layout.cu_seqlens, layout.chunk_indices, seq)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        fused = g is None and TUNING["fused_bwd"] and dk <= 128 and dv <= 128
        if fused and layout.n * heads * nk >= TUNING["fused_min_programs"]:
            dh0 = None if h0 is None else torch.empty_like(h0)
            sweep = {"H": heads, "K": dk, "V": dv, "BT": BT, "IS_VARLEN": layout.varlen, **_dot_args(q.dtype, q.device)}
            sweep["num_warps"] = TUNING["fused_bwd_warps"]
            vp, kp = max(32, triton.next_power_of_2(dv)), max(32, triton.next_power_of_2(dk))
            grid_k, grid_v = (layout.n * heads, nk), (layout.n * heads, triton.cdiv(dv, bv))
            _fused_bwd_dq_kernel[grid_k](
                kf, vf, dof, h0, dq, layout.cu_seqlens, seq, scale, BK=bk, VP=vp, USE_H_IN=h0 is not None, **sweep
            )
            _fused_bwd_dk_kernel[grid_k](
                qf, vf, dof, dht, dk_, dh0, layout.cu_seqlens, seq, scale, BK=bk, VP=vp, USE_DHT=dht is not None,
                STORE_DH0=dh0 is not None, **sweep,
            )  # fmt: skip
            _fused_bwd_dv_kernel[grid_v](
                qf, kf, dof, dht, dv_, layout.cu_seqlens, seq, scale, KP=kp, BV=bv, USE_DHT=dht is not None, **sweep
            )
            return dq, dk_, dv_, None, dh0
        hs, _ = _states(kf, vf, gf, h0, layout, 1.0, reverse=False, store_out=False)
        dhs, dh0 = _states(qf, dof, gf, dht, layout, scale, reverse=True, store_out=h0 is not None)
        if vec:
            # dg [B, T, H, Dk] is written whole by the dq/dk kernel (each K block owns its key dims).
            dg = torch.empty(batch, seq, heads, dk, dtype=torch.float32, device=q.device)
            if layout.chunks:
                _gla_bwd_dqk_kernel[(layout.chunks * heads, nk)](
                    qf, kf, vf, gf, hs, dhs, dof, dq, dk_, dg, *chunk_args, scale, SPAN=GATE_SPAN, **common
                )
                a = _gla_intra(qf, kf, gf, layout, seq, heads, dk)
                _gla_bwd_dv_kernel[(layout.chunks * heads, triton.cdiv(dv, bv))](
                    qf, kf, gf, dhs, a, dof, dv_, *chunk_args, scale, **common
                )
            return dq, dk_, dv_, dg, dh0
        common["USE_G"] = g is not None
        if layout.chunks:
            wide = {"num_warps": TUNING["bwd_warps"]}
            _chunk_bwd_dqk_kernel[(layout.chunks * heads, nk_w)](
                qf, kf, vf, gf, hs, dhs, dof, dq, dk_, dgk, *chunk_args, batch * seq, scale,
                **(common | wide | {"BK": bk_w}),
            )  # fmt: skip
            _chunk_bwd_dv_kernel[(layout.chunks * heads, triton.cdiv(dv, bv_w))](
                qf, kf, gf, dhs, dof, dv_, *chunk_args, scale, **(common | wide | {"BV": bv_w})
            )
    # dg per K block, each already summed from its chunk's end (see _chunk_bwd_dqk_kernel): add the blocks.
    dg = None if dgk is None else dgk.sum(0).view(g.shape)
    return dq, dk_, dv_, dg, dh0


@torch.library.custom_op("tilewise::linear_attention_chunk", mutates_args=())
def _chunk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked linear attention with the Triton kernels: ``(o, final state)`` (see :func:`linear_attention_fwd`)."""
    return linear_attention_fwd(q, k, v, g, initial_state, cu_seqlens, scale)


@_chunk_op.register_fake
def _(q, k, v, g, initial_state, cu_seqlens, scale):
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = v.new_empty(*q.shape[:-1], v.shape[-1])
    return o, q.new_empty(n, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)


@torch.library.custom_op("tilewise::linear_attention_chunk_bwd", mutates_args=())
def _chunk_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_chunk_op`; ``dg`` and ``d initial_state`` are empty when ``g`` / the state is None."""
    dq, dk, dv, dg, dh0 = linear_attention_bwd(q, k, v, g, initial_state, do, dht, cu_seqlens, scale)
    return dq, dk, dv, q.new_empty(0) if dg is None else dg, q.new_empty(0) if dh0 is None else dh0


@_chunk_bwd_op.register_fake
def _(q, k, v, g, initial_state, do, dht, cu_seqlens, scale):
    dg = q.new_empty(0) if g is None else torch.empty_like(g)
    dh0 = q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, initial_state, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
    ctx.scale = scale


def _backward(ctx, do: torch.Tensor | None, dht: torch.Tensor | None):
    q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dh0 = _chunk_bwd_op(q, k, v, g, initial_state, do, dht, cu_seqlens, ctx.scale)
    return dq, dk, dv, None if g is None else dg, None if initial_state is None else dh0, None, None


_chunk_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerChunk(torch.autograd.Function):
    """The same forward and backward as :func:`_chunk_op` without the custom-op layers (dispatcher, fake-tensor
    wrapper, the compiler's disable guard): the eager path. At short sequences the GPU waits on the host (H100,
    T=2048: 0.72 ms of host time per fwd+bwd call against 0.36 ms of kernels), so every layer shows; the custom op
    stays for ``torch.compile`` (see :func:`linear_attention_triton`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale):
        o, ht = linear_attention_fwd(q, k, v, g, initial_state, cu_seqlens, scale)
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
        ctx.scale = scale
        # An unused final state gets no zero-filled gradient (dht stays None).
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dh0 = linear_attention_bwd(q, k, v, g, initial_state, do, dht, cu_seqlens, ctx.scale)
        return dq, dk, dv, dg, dh0, None, None


# Tests set this to run the eager calls through the custom op as well (both paths share the host functions).
EAGER_VIA_CUSTOM_OP = False


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated arguments in, ``(o, final state or None)`` out; ``g`` None or ``[H]`` / ``[B, T, H]`` /
    ``[B, T, H, Dk]`` (any float dtype, differentiable), ``initial_state`` any float dtype (differentiable)."""
    batch, seq, heads, _ = q.shape
    if g is not None and g.dim() != 4:
        g = g.float().expand(batch, seq, heads).contiguous()
    elif g is not None:
        g = g.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    args = (q.contiguous(), k.contiguous(), v.contiguous(), g, initial_state, cu_seqlens, float(scale))
    # torch.compile traces the registered custom op (one graph node); eager calls take the leaner Function.
    o, ht = _chunk_op(*args) if torch.compiler.is_compiling() or EAGER_VIA_CUSTOM_OP else _EagerChunk.apply(*args)
    return o, (ht if output_final_state else None)
