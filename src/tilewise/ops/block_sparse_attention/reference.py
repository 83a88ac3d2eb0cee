"""Block-sparse causal softmax attention in plain PyTorch: the spec the Triton kernel is tested against, and an
XAttention-style block selector (math in README.md).

- :func:`block_sparse_attention_ref`: dense masked attention. The block mask is expanded to a token mask, combined
  with the causal mask, and the softmax runs in fp32 over the kept keys only. Differentiable through torch ops.
- :func:`block_mass_ref`: scores every (query block, key block) pair from strided antidiagonal sums of ``q k^T``
  (softmaxed per strided row, pooled per block); :func:`select_blocks_ref` keeps the most probable blocks of each
  row until their mass reaches ``threshold`` (``_keep_top_mass``, shared with the Triton path).

Both take validated arguments (see ``tilewise.ops.block_sparse_attention``): ``q, k, v [B, H, T, D]``,
``block_mask`` bool ``[B, H, NB, NB]`` with ``NB = ceil(T / block_size)``.
"""

from __future__ import annotations

import torch

__all__ = [
    "block_mass_ref",
    "block_sparse_attention_ref",
    "causal_block_mask",
    "select_blocks_ref",
    "token_mask",
    "with_diagonal",
]


def causal_block_mask(n_blocks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[NB, NB]``: ``True`` on and below the diagonal (the blocks a causal query block can see)."""
    return torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=device).tril()


def with_diagonal(block_mask: torch.Tensor) -> torch.Tensor:
    """``block_mask`` with its diagonal blocks kept: every query sees at least itself, whether the mask keeps its
    block or not (an OR on the device, where a check would cost a host sync per call)."""
    nb = block_mask.shape[-1]
    return block_mask | torch.eye(nb, dtype=torch.bool, device=block_mask.device)


def token_mask(block_mask: torch.Tensor, seq: int, block_size: int) -> torch.Tensor:
    """bool ``[B, H, T, T]``: key ``j`` is visible to query ``i`` when ``j <= i`` and their blocks are kept."""
    m = block_mask.repeat_interleave(block_size, dim=-1).repeat_interleave(block_size, dim=-2)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=block_mask.device).tril()
    return m[..., :seq, :seq] & causal


def block_sparse_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """``o = softmax(scale q k^T + log mask) v`` in fp32, in q's dtype. ``[B, H, T, D]`` in and out."""
    seq = q.shape[-2]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask(block_mask, seq, block_size), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def _antidiagonal_logits(q: torch.Tensor, k: torch.Tensor, stride: int, scale: float) -> torch.Tensor:
    """fp32 ``[B, H, T/S, T/S]``: entry ``(a, b)`` is the mean of ``scale q_{Sa+S-1-i} . k_{Sb+i}`` over ``i < S``,
    the antidiagonal of the ``S x S`` tile of logits, computed as one matmul of strided reshapes (XAttention)."""
    batch, heads, seq, dim = q.shape
    qr = q.float().reshape(batch, heads, seq // stride, stride, dim).flip(3).reshape(batch, heads, seq // stride, -1)
    kr = k.float().reshape(batch, heads, seq // stride, stride * dim)
    return torch.matmul(qr, kr.transpose(-1, -2)) * (scale / stride)


def block_mass_ref(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float) -> torch.Tensor:
    """fp32 ``[B, H, NB, NB]``: the estimated attention mass of each (query block, key block) pair, what
    :func:`select_blocks_ref` ranks. The antidiagonal logits are softmaxed causally per strided row and summed per
    block pair, averaged over the block's real (non-padding) strided rows: each query block's row sums to 1 over its
    causal blocks, and blocks above the diagonal hold 0. ``block_size % stride == 0``."""
    batch, heads, seq, _ = q.shape
    nb = -(-seq // block_size)
    pad = nb * block_size - seq
    if pad:
        q, k = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k))
    n = nb * block_size // stride
    logits = _antidiagonal_logits(q, k, stride, scale)
    # Causal at the strided resolution; key groups that are all padding never count.
    o_r = torch.arange(n, device=q.device)
    visible = (o_r[None, :] <= o_r[:, None]) & (o_r[None, :] * stride < seq)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    # Rows that are all padding carry no mass; each block's mass is the mean over its real rows.
    real = (o_r * stride < seq).float()
    per = block_size // stride
    mass = (probs * real[:, None]).view(batch, heads, nb, per, nb, per).sum(dim=(3, 5))
    return mass / real.view(nb, per).sum(-1).clamp_min(1)[:, None]


def select_blocks_ref(
    q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, threshold: float, scale: float
) -> torch.Tensor:
    """bool ``[B, H, NB, NB]``: per query block, the fewest causal key blocks whose estimated attention mass
    (:func:`block_mass_ref`) reaches ``threshold``, plus the diagonal and the first (sink) block.
    ``block_size % stride == 0``."""
    return _keep_top_mass(block_mass_ref(q, k, block_size, stride, scale), threshold)


def _keep_top_mass(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool like ``mass [B, H, NB, NB]``: in each row, blocks in decreasing mass while the mass before them is below
    ``threshold`` (so the kept mass reaches it), only causal blocks, always the diagonal and block 0."""
    nb = mass.shape[-1]
    causal = causal_block_mask(nb, mass.device)
    if threshold >= 1.0:
        return causal.expand_as(mass).clone()
    order = torch.sort(mass.masked_fill(~causal, -1.0), dim=-1, descending=True, stable=True)
    before = torch.cumsum(order.values.clamp_min(0), dim=-1) - order.values.clamp_min(0)
    keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, order.indices, before < threshold)
    keep = keep & causal
    keep[..., 0] = True
    keep.diagonal(dim1=-2, dim2=-1).fill_(True)
    return keep
