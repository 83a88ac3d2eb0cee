"""Optimizer steps (Adam/AdamW, Lion, SGD) on fp32, bf16 or block-quantized state, updating in place.

The spec is ``reference.py`` and README.md beside it; ``triton.py`` is the fused multi-tensor GPU path. Each call
updates one group: parameters of one dtype on one device, all with state in one ``state_format``. Most users want
the optimizers of :mod:`tilewise.optim`, which group their parameters and call these.

Example:
    >>> p, g = torch.randn(4096), torch.randn(4096)
    >>> st = init_state(p, "adam", "q8")
    >>> adam_step([p], [g], [st], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, state_format="q8")
    >>> st["step"]
    tensor(1.)
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tilewise._backend import resolve_backend
from tilewise.ops.optim_step.reference import (
    QUANT_FORMATS,
    RANK1_FORMATS,
    STATE_FORMATS,
    adam_step_ref,
    buffer_keys,
    check_state_format,
    init_state,
    lion_step_ref,
    round_bf16_stochastic,
    sgd_step_ref,
)

__all__ = [
    "QUANT_FORMATS",
    "RANK1_FORMATS",
    "STATE_FORMATS",
    "adam_step",
    "buffer_keys",
    "init_state",
    "lion_step",
    "round_bf16_stochastic",
    "sgd_step",
]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_unfused: set[str] = set()  # rank-1 formats already warned about (once per process)


def _triton_function(name: str) -> Callable[..., None] | None:
    """``tilewise.ops.optim_step.triton.<name>_triton`` (or ``<name>``), or None when that module or function
    does not exist (imported only when the Triton backend was chosen)."""
    try:
        module = importlib.import_module("tilewise.ops.optim_step.triton")
    except ImportError:
        return None
    return getattr(module, f"{name}_triton", None) or getattr(module, name, None)


def _check_inputs(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict], state_format: str, lr: Any
) -> None:
    check_state_format(state_format)
    if not len(params) == len(grads) == len(states):
        raise ValueError(
            f"params, grads and states must be lists of the same length, got {len(params)}, {len(grads)} "
            f"and {len(states)}"
        )
    if not isinstance(lr, (float, int, torch.Tensor)) or (isinstance(lr, torch.Tensor) and lr.numel() != 1):
        raise TypeError(f"lr must be a float or a one-element tensor, got {lr!r}")
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, but params[{i}] has {tuple(p.shape)}")


def _dispatch(name: str, reference: Callable[..., None], backend: str, params: Sequence[torch.Tensor], **kw) -> None:
    """Run the Triton function ``name`` if the backend resolves to Triton and it exists, else the reference.
    ``backend="triton"`` (or ``TILEWISE_BACKEND=triton``) raises ``RuntimeError`` when it does not exist.
    A rank-1 state format (``"q4r1"``) always runs the reference, with a one-time warning where Triton was chosen."""
    chosen = resolve_backend(backend, *params)
    fmt = kw.get("state_format")
    if fmt in RANK1_FORMATS:
        if chosen == "triton" and fmt not in _warned_unfused:
            _warned_unfused.add(fmt)
            warnings.warn(
                f"{name}: state_format={fmt!r} has no fused Triton kernel yet; running the PyTorch reference "
                "(one op per tensor, slower)",
                stacklevel=3,
            )
        reference(params, **kw)
        return
    if chosen == "triton":
        fn = _triton_function(name)
        if fn is not None:
            fn(params, **kw)
            return
        if backend == "triton":
            raise RuntimeError(f"{name}: backend='triton' was asked for, but the Triton kernel is not available")
    reference(params, **kw)


def adam_step(
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
    backend: str = "auto",
) -> None:
    """One AdamW (``decoupled=True``) or Adam (L2 weight decay) step for each parameter, in place.

    Args:
        params, grads: same-length lists of tensors (any shapes, ``grads[i].shape == params[i].shape``), one
            parameter dtype (fp32/bf16/fp16) on one device.
        states: one :func:`init_state` dict per parameter, all in ``state_format``; ``step`` is incremented.
        lr: a float or a 0-dim tensor.
        stochastic_round: round updated bf16 parameters stochastically (see :func:`round_bf16_stochastic`);
            ignored where a state holds an fp32 ``master`` copy (then that is updated and rounded to nearest).
        skip_nonfinite: leave a parameter and its state untouched when its gradient holds NaN/inf, and add one to
            its ``skips`` counter.
        seed: stochastic rounding draws from ``seed + i`` for parameter ``i`` in the reference (None: the global
            RNG).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
    """
    _check_inputs(params, grads, states, state_format, lr)
    _dispatch(
        "adam_step",
        adam_step_ref,
        backend,
        params,
        grads=grads,
        states=states,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        state_format=state_format,
        stochastic_round=stochastic_round,
        skip_nonfinite=skip_nonfinite,
        seed=seed,
    )


def lion_step(
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
    backend: str = "auto",
) -> None:
    """One Lion step for each parameter, in place (arguments as in :func:`adam_step`; states from
    ``init_state(p, "lion", state_format)``)."""
    _check_inputs(params, grads, states, state_format, lr)
    _dispatch(
        "lion_step",
        lion_step_ref,
        backend,
        params,
        grads=grads,
        states=states,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
        state_format=state_format,
        stochastic_round=stochastic_round,
        skip_nonfinite=skip_nonfinite,
        seed=seed,
    )


def sgd_step(
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
    backend: str = "auto",
) -> None:
    """One SGD step (``torch.optim.SGD`` semantics) for each parameter, in place (arguments as in
    :func:`adam_step`; states from ``init_state(p, "sgd", state_format, momentum=momentum != 0)``)."""
    _check_inputs(params, grads, states, state_format, lr)
    _dispatch(
        "sgd_step",
        sgd_step_ref,
        backend,
        params,
        grads=grads,
        states=states,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        state_format=state_format,
        stochastic_round=stochastic_round,
        skip_nonfinite=skip_nonfinite,
        seed=seed,
    )
