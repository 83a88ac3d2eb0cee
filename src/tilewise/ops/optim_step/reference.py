"""Optimizer steps on block-quantized state in plain PyTorch: the spec (see README.md beside this file).

One parameter at a time, fp32 math, any device. A quantized moment is dequantized, updated in fp32 and quantized
again with the nearest rounding of ``ops/blockquant`` (reference backend). Parameters, gradients and states are
updated **in place**; ``states[i]["step"]`` counts the steps taken by parameter ``i``.

The state layout (names, dtypes, sizes, codebooks) is defined here once: :data:`QUANT_FORMATS`,
:func:`buffer_keys` and :func:`init_state`; ``triton.py`` imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from tilewise.ops.blockquant import dequantize_blockwise, quantize_blockwise
from tilewise.ops.blockquant.reference import midpoints, pack_nibbles, unpack_nibbles
from tilewise.quant.codebooks import _build as _codebook_table  # cached, shared: read only

__all__ = [
    "QUANT_FORMATS",
    "RANK1_FORMATS",
    "STATE_FORMATS",
    "adam_step_ref",
    "buffer_keys",
    "dequantize_rank1",
    "init_state",
    "lion_step_ref",
    "quantize_rank1",
    "rank1_dims",
    "round_bf16_stochastic",
    "sgd_step_ref",
]

Kind = Literal["adam", "lion", "sgd"]
STATE_FORMATS: tuple[str, ...] = ("fp32", "bf16", "q8", "q4", "fp8", "q4r1")
# state_format -> (codebook of signed moments, codebook of non-negative moments, block size, bits per code)
QUANT_FORMATS: dict[str, tuple[str, str, int, int]] = {
    "q8": ("dynamic8", "udynamic8", 256, 8),
    "q4": ("dynamic4", "ulinear4", 128, 4),
    "fp8": ("fp8_e4m3", "fp8_e4m3", 256, 8),
    "q4r1": ("dynamic4", "ulinear4", 128, 4),
}
# quantized formats whose non-negative moments (Adam's v) use rank-1 normalization (Li et al. 2023) instead of
# blocks, for parameters that are 2-D in effect (see :func:`rank1_dims`); Adam only, reference backend only
RANK1_FORMATS: tuple[str, ...] = ("q4r1",)
# buffer name -> (prefix of its quantized keys, whether it holds non-negative values)
_BUFFERS: dict[str, tuple[str, bool]] = {
    "exp_avg": ("exp_avg", False),
    "exp_avg_sq": ("exp_avg_sq", True),
    "max_exp_avg_sq": ("max_exp_avg_sq", True),
    "momentum_buffer": ("momentum", False),
}


def check_state_format(state_format: str) -> None:
    """Raise ``ValueError`` unless ``state_format`` is one of :data:`STATE_FORMATS`."""
    if state_format not in STATE_FORMATS:
        raise ValueError(f"state_format={state_format!r} is unknown; use one of {', '.join(STATE_FORMATS)}")


def rank1_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """``(R, C) = (shape[0], prod(shape[1:]))`` when a rank-1 format normalizes a moment of this shape by row and
    column maxima: ``ndim >= 2`` and ``R, C >= 2``; None otherwise (1-D in effect: blocks of 128, as ``"q4"``)."""
    if len(shape) < 2:
        return None
    rows, cols = int(shape[0]), 1
    for d in shape[1:]:
        cols *= int(d)
    return (rows, cols) if rows >= 2 and cols >= 2 else None


def _is_rank1(name: str, state_format: str, shape: Sequence[int] | None) -> bool:
    """Whether buffer ``name`` of a parameter of ``shape`` is stored with rank-1 normalization."""
    return state_format in RANK1_FORMATS and _BUFFERS[name][1] and shape is not None and rank1_dims(shape) is not None


def buffer_keys(name: str, state_format: str, shape: Sequence[int] | None = None) -> tuple[str, ...]:
    """The state keys that hold buffer ``name`` (``"exp_avg"``, ``"exp_avg_sq"``, ``"max_exp_avg_sq"`` or
    ``"momentum_buffer"``) in ``state_format``: ``(name,)`` for fp32/bf16, ``(prefix_codes, prefix_scales)``
    for the quantized formats (prefix ``"momentum"`` for the momentum buffer). Under ``"q4r1"`` the
    non-negative buffers of a parameter of ``shape`` with :func:`rank1_dims` are ``(prefix_codes, prefix_row,
    prefix_col)`` (``shape=None``: the block-wise keys)."""
    if state_format in QUANT_FORMATS:
        prefix = _BUFFERS[name][0]
        if _is_rank1(name, state_format, shape):
            return f"{prefix}_codes", f"{prefix}_row", f"{prefix}_col"
        return f"{prefix}_codes", f"{prefix}_scales"
    return (name,)


def quantize_rank1(
    x: torch.Tensor, code: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (read as ``[R, C] = rank1_dims(x.shape)``) with rank-1 normalization onto the sorted
    codebook ``code [K]``: ``r_i = max_j |x_ij|``, ``c_j = max_i |x_ij|``, ``s_ij = min(r_i, c_j)`` (0 -> 1 for
    the rounding), and ``code_ij = #{k : x_ij > fp32(s_ij * mid_k)}`` with ``mid = midpoints(code)``: the
    threshold rule of ``ops/blockquant`` with ``s_ij`` in place of the block absmax. Returns ``(codes, r, c)``:
    codes ``uint8 [n]`` (packed ``[ceil(n/2)]`` for ``bits=4``, row-major), fp32 ``r [R]`` and ``c [C]``."""
    dims = rank1_dims(x.shape)
    if dims is None:
        raise ValueError(f"rank-1 quantization needs a tensor with R, C >= 2, got shape {tuple(x.shape)}")
    a = x.reshape(dims).to(torch.float32)
    rows, cols = a.abs().amax(dim=1), a.abs().amax(dim=0)
    s = torch.minimum(rows[:, None], cols[None, :])
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.zeros(dims, dtype=torch.uint8, device=x.device)
    for mid in midpoints(code.to(device=x.device)):  # K - 1 compares (fp32 * fp32 0-dim): exact, no [n, K] table
        codes += a > s * mid
    codes = codes.view(-1)
    return (pack_nibbles(codes) if bits == 4 else codes), rows, cols


def dequantize_rank1(
    codes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, code: torch.Tensor, bits: int = 4
) -> torch.Tensor:
    """Inverse of :func:`quantize_rank1`: ``fp32(code[codes_ij] * min(r_i, c_j))`` as ``[R, C]`` (a zero row or
    column gives zeros)."""
    n = rows.numel() * cols.numel()
    idx = unpack_nibbles(codes, n) if bits == 4 else codes[:n]
    values = code.to(device=codes.device, dtype=torch.float32)[idx.long()].view(rows.numel(), cols.numel())
    return values * torch.minimum(rows[:, None], cols[None, :]).to(torch.float32)


def _buffer_names(kind: Kind, *, amsgrad: bool, momentum: bool) -> list[str]:
    if kind == "adam":
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    if kind == "lion":
        return ["exp_avg"]
    if kind == "sgd":
        return ["momentum_buffer"] if momentum else []
    raise ValueError(f"kind={kind!r} is unknown; use 'adam', 'lion' or 'sgd'")


def init_state(
    param: torch.Tensor,
    kind: Kind,
    state_format: str,
    *,
    amsgrad: bool = False,
    master: bool = False,
    momentum: bool = True,
) -> dict[str, torch.Tensor]:
    """A fresh optimizer state for ``param`` (``n`` elements): zero moments in ``state_format``.

    fp32/bf16 buffers have ``param``'s shape; a quantized buffer is ``uint8 [n]`` codes (``[ceil(n/2)]`` packed
    for ``"q4"``/``"q4r1"``) plus fp32 scales ``[ceil(n / block)]``; under ``"q4r1"`` (Adam only) ``exp_avg_sq``
    and ``max_exp_avg_sq`` of a parameter with :func:`rank1_dims` ``(R, C)`` have fp32 ``<prefix>_row [R]`` and
    ``<prefix>_col [C]`` instead of scales. ``step`` and ``skips`` are fp32 zero scalars on
    ``param``'s device. ``master=True`` adds ``master``, an fp32 copy of ``param`` (for bf16/fp16 parameters).
    ``momentum=False`` (SGD without momentum) stores no buffer.

    Example:
        >>> init_state(torch.zeros(1000), "adam", "q4")["exp_avg_codes"].shape
        torch.Size([500])
    """
    check_state_format(state_format)
    if state_format in RANK1_FORMATS and kind != "adam":
        raise ValueError(
            f"state_format={state_format!r} normalizes Adam's second moment only; use 'q4' for kind={kind!r}"
        )
    n, device = param.numel(), param.device
    state: dict[str, torch.Tensor] = {
        "step": torch.zeros((), dtype=torch.float32, device=device),
        "skips": torch.zeros((), dtype=torch.float32, device=device),
    }
    for name in _buffer_names(kind, amsgrad=amsgrad, momentum=momentum):
        if state_format in QUANT_FORMATS:
            _, _, block, bits = QUANT_FORMATS[state_format]
            keys = buffer_keys(name, state_format, param.shape)
            state[keys[0]] = torch.zeros((n + 1) // 2 if bits == 4 else n, dtype=torch.uint8, device=device)
            if len(keys) == 3:  # rank-1: row and column maxima
                rows, cols = rank1_dims(param.shape)  # type: ignore[misc]
                state[keys[1]] = torch.zeros(rows, dtype=torch.float32, device=device)
                state[keys[2]] = torch.zeros(cols, dtype=torch.float32, device=device)
            else:
                state[keys[1]] = torch.zeros(-(-n // block), dtype=torch.float32, device=device)
        else:
            dtype = torch.float32 if state_format == "fp32" else torch.bfloat16
            state[name] = torch.zeros(param.shape, dtype=dtype, device=device)
    if master:
        state["master"] = param.detach().to(torch.float32, copy=True)
    return state


def _load(state: dict[str, torch.Tensor], name: str, state_format: str, like: torch.Tensor) -> torch.Tensor:
    """Buffer ``name`` as a new fp32 tensor shaped like ``like``."""
    if state_format not in QUANT_FORMATS:
        return state[name].to(torch.float32, copy=True)
    signed_cb, unsigned_cb, block, bits = QUANT_FORMATS[state_format]
    codebook = _codebook_table(unsigned_cb if _BUFFERS[name][1] else signed_cb)
    if _is_rank1(name, state_format, like.shape):
        codes_key, row_key, col_key = buffer_keys(name, state_format, like.shape)
        return dequantize_rank1(state[codes_key], state[row_key], state[col_key], codebook, bits).view(like.shape)
    codes_key, scales_key = buffer_keys(name, state_format)
    flat = dequantize_blockwise(
        state[codes_key], state[scales_key], codebook, block, like.numel(), bits=bits, backend="reference"
    )
    return flat.view(like.shape)


def _store(state: dict[str, torch.Tensor], name: str, state_format: str, value: torch.Tensor) -> None:
    """Write the fp32 ``value`` into buffer ``name``: cast (fp32/bf16, nearest) or quantized (nearest)."""
    if state_format not in QUANT_FORMATS:
        state[name].copy_(value)
        return
    signed_cb, unsigned_cb, block, bits = QUANT_FORMATS[state_format]
    codebook = _codebook_table(unsigned_cb if _BUFFERS[name][1] else signed_cb)
    if _is_rank1(name, state_format, value.shape):
        keys = buffer_keys(name, state_format, value.shape)
        for key, t in zip(keys, quantize_rank1(value, codebook, bits), strict=True):
            state[key].copy_(t)
        return
    codes, scales = quantize_blockwise(value, codebook, block, bits=bits, check_finite=False, backend="reference")
    codes_key, scales_key = buffer_keys(name, state_format)
    state[codes_key].copy_(codes)
    state[scales_key].copy_(scales)


def round_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bf16 stochastically, unbiased: add a uniform integer in ``[0, 2**16)`` to the fp32 bit
    pattern and truncate the low 16 bits. ``x`` rounds up (in magnitude) with probability equal to its distance
    from the bf16 value below, as a fraction of one bf16 ulp. Inf and NaN stay inf and NaN."""
    bits = x.to(torch.float32).view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 == 0xFFFF0000: exact cast


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """Parameter ``index``'s generator for stochastic rounding: seeded with ``seed + index`` (None: global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed + index) % (1 << 63))


def _read_param(param: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weights to update: the ``master`` copy itself when present, else a new fp32 copy of ``param``."""
    if "master" in state:
        return state["master"]
    return param.detach().to(torch.float32, copy=True)


def _write_param(
    param: torch.Tensor,
    weights: torch.Tensor,
    state: dict[str, torch.Tensor],
    stochastic_round: bool,
    generator: torch.Generator | None,
) -> None:
    """Round the updated fp32 ``weights`` into ``param``: stochastically for a bf16 parameter without a master
    copy when ``stochastic_round``, else to nearest (``master``, when present, already holds ``weights``)."""
    if stochastic_round and param.dtype == torch.bfloat16 and "master" not in state:
        param.copy_(round_bf16_stochastic(weights, generator))
    else:
        param.copy_(weights)


def _skip(grad: torch.Tensor, state: dict[str, torch.Tensor], skip_nonfinite: bool) -> bool:
    """Whether this parameter's step is skipped (a non-finite gradient under ``skip_nonfinite``); counts it."""
    if skip_nonfinite and not bool(torch.isfinite(grad).all()):
        state["skips"] += 1
        return True
    return False


def _lr_terms(lr: float | torch.Tensor, weight_decay: float, bias_correction1: float = 1.0) -> tuple[float, float]:
    """``(1 - lr * weight_decay, lr / bias_correction1)`` computed as ``torch.optim.AdamW`` computes them: in float64
    for a Python ``lr``; for a tensor ``lr``, as tensor ops in ``lr``'s dtype on ``lr``'s device (fp32: each float
    operand rounded to fp32 first, every op rounded to fp32; see README.md for what CUDA gives)."""
    if not isinstance(lr, torch.Tensor):
        return 1 - lr * weight_decay, lr / bias_correction1
    lr = lr.detach().reshape(())
    return float(1 - lr * weight_decay), float(lr / bias_correction1)


def _check_lists(params: Sequence, grads: Sequence, states: Sequence) -> None:
    if not len(params) == len(grads) == len(states):
        raise ValueError(
            f"params, grads and states must be lists of the same length, got {len(params)}, {len(grads)} "
            f"and {len(states)}"
        )


def adam_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    state_format: str,
    stochastic_round: bool = False,
    skip_nonfinite: bool = False,
    seed: int | None = None,
) -> None:
    """One Adam (``decoupled=False``) or AdamW step per parameter, in the op order of ``torch.optim.AdamW``."""
    _check_lists(params, grads, states)
    for i, (p, grad, st) in enumerate(zip(params, grads, states, strict=True)):
        g = -grad.float() if maximize else grad.float()
        if _skip(g, st, skip_nonfinite):
            continue
        w = _read_param(p, st)
        m, v = _load(st, "exp_avg", state_format, w), _load(st, "exp_avg_sq", state_format, w)
        step = float(st["step"]) + 1
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # pow, as torch.optim: differs from math.sqrt in the last bit
        decay, step_size = _lr_terms(lr, weight_decay, bias_correction1)
        if weight_decay != 0:
            if decoupled:
                w.mul_(decay)
            else:
                g = g.add(w, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        st["step"] += 1
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(_load(st, "max_exp_avg_sq", state_format, w), v)
            _store(st, "max_exp_avg_sq", state_format, v_hat)
        denom = (v_hat.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        _store(st, "exp_avg", state_format, m)
        _store(st, "exp_avg_sq", state_format, v)
        _write_param(p, w, st, stochastic_round, _generator(seed, i, p.device))


def lion_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    state_format: str,
    stochastic_round: bool = False,
    skip_nonfinite: bool = False,
    seed: int | None = None,
) -> None:
    """One Lion step per parameter: ``p = p (1 - lr wd) - lr sign(lerp(m, g, 1 - beta1))``, then
    ``m = lerp(m, g, 1 - beta2)``."""
    _check_lists(params, grads, states)
    decay, lr = _lr_terms(lr, weight_decay)
    for i, (p, grad, st) in enumerate(zip(params, grads, states, strict=True)):
        g = -grad.float() if maximize else grad.float()
        if _skip(g, st, skip_nonfinite):
            continue
        w = _read_param(p, st)
        m = _load(st, "exp_avg", state_format, w)
        if weight_decay != 0:
            w.mul_(decay)
        w.add_(torch.lerp(m, g, 1 - beta1).sign_(), alpha=-lr)
        m.lerp_(g, 1 - beta2)
        st["step"] += 1
        _store(st, "exp_avg", state_format, m)
        _write_param(p, w, st, stochastic_round, _generator(seed, i, p.device))


def sgd_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
    state_format: str,
    stochastic_round: bool = False,
    skip_nonfinite: bool = False,
    seed: int | None = None,
) -> None:
    """One SGD step per parameter with ``torch.optim.SGD``'s semantics: the momentum buffer starts as the first
    gradient (``step == 0``), then ``buf = momentum buf + (1 - dampening) g``; Nesterov uses ``g + momentum buf``.
    With ``momentum == 0`` the states hold no buffer."""
    _check_lists(params, grads, states)
    lr = float(lr)
    for i, (p, grad, st) in enumerate(zip(params, grads, states, strict=True)):
        g = -grad.float() if maximize else grad.float()
        if _skip(g, st, skip_nonfinite):
            continue
        w = _read_param(p, st)
        if weight_decay != 0:
            g = g.add(w, alpha=weight_decay)
        if momentum != 0:
            if float(st["step"]) == 0:
                buf = g.clone()
            else:
                buf = _load(st, "momentum_buffer", state_format, w).mul_(momentum).add_(g, alpha=1 - dampening)
            _store(st, "momentum_buffer", state_format, buf)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        w.add_(g, alpha=-lr)
        st["step"] += 1
        _write_param(p, w, st, stochastic_round, _generator(seed, i, p.device))
