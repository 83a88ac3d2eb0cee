"""Causal linear attention in plain PyTorch: the spec the Triton kernels are tested against (math in README.md).

``S_t = decay_t ⊙ S_{t-1} + k_t^T v_t`` (``S`` is ``[Dk, Dv]`` in fp32, ``decay_t = exp(g_t)`` broadcast over the
key dim, or per key dim for the vector gate), ``o_t = scale * q_t S_t``.

- :func:`linear_attention_recurrent` steps through time: the definition, used as ground truth in tests.
- :func:`linear_attention_chunked` works in chunks of 64 (intra-chunk masked matmuls, states passed between chunks);
  it is what CPU users get and it is differentiable through plain torch ops.

Both take already validated arguments (see ``tilewise.ops.linear_attention``): ``q, k [B, T, H, Dk]``,
``v [B, T, H, Dv]``, ``g`` None / ``[H]`` / ``[B, T, H]`` / ``[B, T, H, Dk]`` in log space, ``initial_state``
``[N, H, Dk, Dv]``, ``cu_seqlens`` int offsets (then ``B == 1`` and ``N = len(cu_seqlens) - 1``).
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "linear_attention_chunked", "linear_attention_recurrent", "linear_attention_step_ref"]

CHUNK = 64


def _log_decay(g: torch.Tensor | None, batch: int, seq: int, heads: int) -> torch.Tensor | None:
    """``g`` as fp32 ``[B, T, H]`` (scalar gate) or ``[B, T, H, Dk]`` (vector gate); a per-head ``[H]`` broadcasts."""
    if g is None:
        return None
    g = g.float()
    return g.expand(batch, seq, heads) if g.dim() == 1 else g


def _sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """``(batch index, start, end)`` of every sequence: each row of the batch, or each packed segment."""
    if cu_seqlens is None:
        return [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def _run(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """Apply ``fn(q, k, v, g, state) -> (o, state)`` (``[T, H, D]`` slices) to every sequence and reassemble."""
    batch, seq, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    gl = _log_decay(g, batch, seq, heads)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(_sequences(q, cu_seqlens)):
        if initial_state is not None:
            state = initial_state[n].float()
        else:
            state = q.new_zeros(heads, dk, dv, dtype=torch.float32)
        sl = slice(start, end)
        o, state = fn(
            q[b, sl].float() * scale,
            k[b, sl].float(),
            v[b, sl].float(),
            None if gl is None else gl[b, sl],
            state,
        )
        outs.append(o)
        finals.append(state)
    o = torch.cat(outs, 0).view(1, seq, heads, dv) if cu_seqlens is not None else torch.stack(outs, 0)
    return o.to(q.dtype), (torch.stack(finals, 0) if output_final_state else None)


def _recurrent_one(q, k, v, g, state):
    """One sequence, token by token. ``q, k [T, H, Dk]``, ``v [T, H, Dv]``, ``state [H, Dk, Dv]``."""
    outs = []
    for t in range(q.shape[0]):
        if g is not None:
            decay = g[t].exp()
            # [H] -> [H, 1, 1]; [H, Dk] -> [H, Dk, 1]: the decay multiplies rows (the key dim) of the state.
            state = state * (decay[:, None, None] if decay.dim() == 1 else decay[:, :, None])
        state = state + k[t, :, :, None] * v[t, :, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], state))
    o = torch.stack(outs, 0) if outs else v.new_zeros(0, *v.shape[1:])
    return o, state


def _chunk_one(q, k, v, g, state, chunk: int = CHUNK):
    """One sequence in chunks. Within a chunk, ``G`` is the inclusive cumulative sum of the log decay, and

    ``o_i = (q_i ⊙ e^{G_i}) S + Σ_{j<=i} (q_i · (k_j ⊙ e^{G_i - G_j})) v_j``,
    ``S <- e^{G_last} ⊙ S + Σ_j (k_j ⊙ e^{G_last - G_j})^T v_j``.

    Every exponent is ``<= 0`` when ``g <= 0``; ``G_i - G_j`` is masked to ``-inf`` above the diagonal before
    ``exp`` so no large positive exponent is ever formed.
    """
    seq = q.shape[0]
    # [T, H, D] -> [H, T, D]: heads lead, as batched matmul wants.
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    if g is not None:
        g = g.transpose(0, 1)
    outs = []
    for start in range(0, seq, chunk):
        sl = slice(start, min(start + chunk, seq))
        qc, kc, vc = q[:, sl], k[:, sl], v[:, sl]
        n = qc.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if g is None:
            attn = (qc @ kc.transpose(1, 2)).masked_fill(~causal, 0.0)
            o = qc @ state + attn @ vc
            state = state + kc.transpose(1, 2) @ vc
        elif g.dim() == 2:
            gc = g[:, sl].cumsum(-1)  # [H, C]
            last = gc[:, -1:]
            diff = (gc[:, :, None] - gc[:, None, :]).masked_fill(~causal, float("-inf"))
            attn = (qc @ kc.transpose(1, 2)) * diff.exp()
            o = (qc @ state) * gc.exp()[..., None] + attn @ vc
            state = state * last.exp()[..., None] + (kc * (last - gc).exp()[..., None]).transpose(1, 2) @ vc
        else:
            gc = g[:, sl].cumsum(1)  # [H, C, Dk]
            last = gc[:, -1:]
            # [H, C, C, Dk]: the decay between positions i >= j, per key dim.
            diff = (gc[:, :, None] - gc[:, None, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
            attn = torch.einsum("hik,hjk,hijk->hij", qc, kc, diff.exp())
            o = (qc * gc.exp()) @ state + attn @ vc
            state = state * last.transpose(1, 2).exp() + (kc * (last - gc).exp()).transpose(1, 2) @ vc
        outs.append(o)
    o = torch.cat(outs, 1) if outs else v.new_zeros(v.shape[0], 0, v.shape[2])
    return o.transpose(0, 1), state


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence, one token at a time in fp32: ``(o [B, T, H, Dv] in q's dtype, final state or None)``."""
    return _run(_recurrent_one, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunks of 64 in fp32, differentiable: ``(o [B, T, H, Dv] in q's dtype, final state [N, H, Dk, Dv] or None)``."""
    return _run(_chunk_one, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def linear_attention_step_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: ``q, k [B, H, Dk]``, ``v [B, H, Dv]``, ``state [B, H, Dk, Dv]``, ``g`` None or fp32
    ``[B, H]`` / ``[B, H, Dk]``. Returns ``(o [B, H, Dv] in q's dtype, new state in fp32)``."""
    new = state.float()
    if g is not None:
        decay = g.float().exp()
        new = new * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
    new = new + k.float()[..., :, None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float() * scale, new)
    return o.to(q.dtype), new
