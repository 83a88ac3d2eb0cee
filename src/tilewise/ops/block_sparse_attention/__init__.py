"""Block-sparse causal softmax attention and an XAttention-style block selector.

The spec is ``reference.py`` (math in README.md beside it); ``triton.py`` is the GPU path, loaded only when the
Triton backend is chosen.
"""

from __future__ import annotations

import torch

from tilewise._backend import resolve_backend
from tilewise.ops.block_sparse_attention.reference import (
    _keep_top_mass,
    block_mass_ref,
    block_sparse_attention_ref,
    with_diagonal,
)

__all__ = ["HEAD_DIMS", "block_sparse_attention", "select_blocks"]

HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D] (4-D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}; cast it first")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put q, k, v on one device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast q, k, v to one dtype")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} ([B, H, T, D]), got {tuple(t.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the head dim D must be one of {HEAD_DIMS}, got {q.shape[-1]}; pad q, k, v to one")


def _check_block_size(block_size: int, low: int = 16, high: int | None = None) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    top = f" and <= {high}" if high else ""
    if block_size < low or block_size & (block_size - 1) or (high and block_size > high):
        raise ValueError(f"block_size must be a power of two >= {low}{top} (e.g. 64), got {block_size}")
    return block_size


def _check_block_mask(block_mask: torch.Tensor, q: torch.Tensor, block_size: int) -> torch.Tensor:
    """``block_mask`` expanded to ``[B, H, NB, NB]`` (size-1 batch / head dims broadcast, a view), on q's device."""
    batch, heads, seq, _ = q.shape
    nb = -(-seq // block_size)
    want = (batch, heads, nb, nb)
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a bool torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {block_mask.dtype}; use mask.bool() or mask != 0")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}; move it to q's device")
    shape = tuple(block_mask.shape)
    if len(shape) != 4 or shape[2:] != want[2:] or shape[0] not in (1, batch) or shape[1] not in (1, heads):
        raise ValueError(
            f"block_mask must be [B, H, NB, NB] = {list(want)} (NB = ceil(T / block_size) = ceil({seq} / "
            f"{block_size}); B and H may be 1 to broadcast), got {list(shape)}"
        )
    return block_mask.expand(want)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention over the kept ``(query block, key block)`` pairs only.

    ``o_i = sum_j p_ij v_j`` with ``p_i = softmax_j(scale q_i . k_j)`` over keys ``j <= i`` whose block pair
    ``(i // block_size, j // block_size)`` is kept in ``block_mask``; blocks above the diagonal are ignored.

    Args:
        q, k, v: ``[B, H, T, D]``, one dtype (float32, float16 or bfloat16), ``D`` in {32, 64, 128}, any ``T``.
        block_mask: bool ``[B, H, NB, NB]``, ``NB = ceil(T / block_size)`` (``B`` or ``H`` may be 1 to
            broadcast). The diagonal blocks are always attended (every query sees itself), kept or not. See
            :func:`select_blocks`.
        block_size: tokens per block, a power of two in [32, 128]; default 64.
        scale: multiplies ``q . k``; default ``D ** -0.5``.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports, else the dense masked PyTorch
            reference), ``"triton"`` or ``"reference"``; ``TILEWISE_BACKEND`` overrides ``"auto"``.

    Returns:
        ``o [B, H, T, D]`` in q's dtype (fp32 softmax and accumulation). Differentiable in ``q, k, v``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: a shape, dtype or device does not fit (the message names the argument).
        RuntimeError: ``backend="triton"`` cannot run here.

    Example:
        >>> import torch
        >>> from tilewise.ops import block_sparse_attention
        >>> q = k = v = torch.randn(1, 2, 128, 32)
        >>> mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
        >>> block_sparse_attention(q, k, v, mask).shape
        torch.Size([1, 2, 128, 32])
    """
    _check_qkv(q, k, v)
    # >= 32: 16-wide 16-bit tl.dot tiles were wrong on an H100 with triton 3.6 (see linear_attention);
    # <= 128: a [block, 128] fp32 accumulator per program is the most the kernels are laid out for.
    block_size = _check_block_size(block_size, 32, 128)
    block_mask = _check_block_mask(block_mask, q, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_backend(backend, q, k, v) == "reference":
        # the Triton path's block lists add the diagonal themselves; the reference takes this copy
        return block_sparse_attention_ref(q, k, v, with_diagonal(block_mask), block_size, scale)
    from tilewise.ops.block_sparse_attention.triton import block_sparse_attention_triton

    return block_sparse_attention_triton(q, k, v, block_mask, block_size, scale)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    stride: int = 8,
    threshold: float = 0.9,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """XAttention-style block mask: the causal key blocks holding ``threshold`` of each query block's estimated
    attention mass.

    Attention mass is estimated from antidiagonal sums of the logits in ``stride x stride`` tiles (``T / stride``
    strided rows and columns), softmaxed causally per row and summed per block (README.md); each row then keeps its
    heaviest blocks until their mass reaches ``threshold``.

    Args:
        q, k: ``[B, H, T, D]``, as for :func:`block_sparse_attention` (math in fp32).
        block_size: tokens per block, a power of two >= 16, a multiple of ``stride``; default 64.
        stride: antidiagonal sampling stride, a power of two dividing ``block_size``; default 8.
        threshold: in ``(0, 1]``; 1.0 keeps every causal block. Default 0.9.
        scale: multiplies ``q . k``; default ``D ** -0.5``.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton imports, else the PyTorch reference),
            ``"triton"`` (one fused kernel computes the block mass without storing the logits) or
            ``"reference"``; ``TILEWISE_BACKEND`` overrides ``"auto"``. Both rank the mass the same way.

    Returns:
        bool ``[B, H, NB, NB]``, ``NB = ceil(T / block_size)``: causal, the diagonal and block 0 always kept.
        Not differentiable (a selection).

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: a shape, dtype, device or value does not fit (the message names the argument).
        RuntimeError: ``backend="triton"`` cannot run here.

    Example:
        Every query below is drawn to the keys of block 1, so beside the always-kept diagonal and block 0 that is
        the only block selected; attending over it alone nearly matches dense causal attention:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from tilewise.ops import block_sparse_attention, select_blocks
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(1, 2, 512, 32, generator=g) for _ in range(3))
        >>> q[..., 0] += 8.0
        >>> k[:, :, 64:128, 0] += 8.0
        >>> mask = select_blocks(q, k, block_size=64, threshold=0.9)
        >>> mask.shape, mask.dtype  # NB = 512 / 64 = 8 blocks a side
        (torch.Size([1, 2, 8, 8]), torch.bool)
        >>> mask[0, 0].int()
        tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0, 0],
                [1, 1, 0, 1, 0, 0, 0, 0],
                [1, 1, 0, 0, 1, 0, 0, 0],
                [1, 1, 0, 0, 0, 1, 0, 0],
                [1, 1, 0, 0, 0, 0, 1, 0],
                [1, 1, 0, 0, 0, 0, 0, 1]], dtype=torch.int32)
        >>> o = block_sparse_attention(q, k, v, mask, block_size=64)
        >>> dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.allclose(o, dense, atol=1e-2)
        True

        ``threshold=1.0`` keeps every causal block, so the result is ordinary causal attention:

        >>> full = select_blocks(q, k, block_size=64, threshold=1.0)
        >>> torch.equal(full[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())
        True
        >>> torch.allclose(block_sparse_attention(q, k, v, full, block_size=64), dense, atol=1e-5)
        True
    """
    _check_qkv(q, k, None)
    block_size = _check_block_size(block_size)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or stride & (stride - 1):
        raise ValueError(f"stride must be a power of two >= 1 (e.g. 8), got {stride!r}")
    if block_size % stride:
        raise ValueError(f"stride={stride} must divide block_size={block_size}; pick a smaller stride")
    if not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1] (e.g. 0.9), got {threshold!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        if resolve_backend(backend, q, k) == "reference":
            mass = block_mass_ref(q, k, block_size, stride, scale)
        else:
            from tilewise.ops.block_sparse_attention.triton import select_blocks_mass_triton

            mass = select_blocks_mass_triton(q, k, block_size, stride, scale)
        return _keep_top_mass(mass, float(threshold))
