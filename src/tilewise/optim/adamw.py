"""AdamW and Adam with fp32, bf16, 8-bit, 4-bit (block-wise or rank-1) or fp8 optimizer state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tilewise.ops.optim_step import adam_step
from tilewise.optim._base import LowBitOptimizer, _check_number

__all__ = ["Adam", "Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit"]


class AdamW(LowBitOptimizer):
    """AdamW (decoupled weight decay) with the semantics of ``torch.optim.AdamW``, on low-bit optimizer state.

    With ``state_bits=32`` the parameters match ``torch.optim.AdamW``'s; with ``state_bits=8`` the two moments take
    about 2 bytes per parameter instead of 8, with ``state_bits=4`` about 1.

    Args:
        params: parameters or param-group dicts (any argument below can be overridden per group).
        lr: learning rate, a float or a 0-dim tensor (default 1e-3).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay coefficient (default 1e-2).
        amsgrad: keep the running maximum of the second moment (same format) and divide by it.
        maximize: maximize the objective instead of minimizing it.
        state_bits: 32 (fp32 moments, default), 16 (bf16), 8 (block-wise 8-bit: dynamic8 / udynamic8 codes, block
            256) or 4 (dynamic4 / ulinear4 codes, block 128).
        state_format: ``"fp32"``, ``"bf16"``, ``"q8"``, ``"q4"``, ``"fp8"`` (e4m3 codes, block 256) or ``"q4r1"``
            (``q4`` with the second moment of a >= 2-D parameter normalized by min(row max, column max), Li et
            al. 2023; PyTorch reference only); when given, it replaces ``state_bits``.
        min_quant_numel: parameters with fewer elements (of the full tensor, for a DTensor) keep fp32 state under
            a quantized format (default 4096).
        stochastic_round: round updated bf16 parameters stochastically instead of to nearest.
        master_weights: keep an fp32 copy of each bf16/fp16 parameter in the state; the update goes there and is
            rounded to the parameter (4 more bytes per parameter).
        skip_nonfinite: skip a parameter's update and leave its state untouched when its gradient has NaN/inf;
            ``skipped_steps()`` counts the skips.
        backend: ``"auto"`` (the fused Triton kernel on CUDA when available), ``"triton"`` or ``"reference"``.
        seed: seeds stochastic rounding (with a per-step counter saved in the state_dict).

    Example:
        With fp32 state, three steps give ``torch.optim.AdamW``'s weights:

        >>> import copy
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> ours = torch.nn.Linear(64, 64)
        >>> theirs = copy.deepcopy(ours)
        >>> x = torch.randn(32, 64)
        >>> for model, opt in [
        ...     (ours, tilewise.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)),
        ...     (theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)),
        ... ]:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         model(x).square().mean().backward()
        ...         opt.step()
        >>> torch.allclose(ours.weight, theirs.weight), torch.allclose(ours.bias, theirs.bias)
        (True, True)

        With 8-bit state a step still lowers the loss, and the moments take about 2 bytes per parameter:

        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.AdamW(model.parameters(), lr=1e-2, state_bits=8)
        >>> loss = model(x).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> bool(model(x).square().mean() < loss)
        True
        >>> state = opt.state[model.weight]
        >>> state["exp_avg_codes"].dtype, state["exp_avg_codes"].shape
        (torch.uint8, torch.Size([4096]))
        >>> round(sum(t.nbytes for t in state.values()) / model.weight.numel(), 2)  # 8 with fp32 state
        2.03
    """

    kind = "adam"
    _decoupled = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        state_bits: int = 32,
        state_format: str | None = None,
        min_quant_numel: int = 4096,
        stochastic_round: bool = False,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
        backend: str = "auto",
        seed: int = 0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "state_bits": state_bits,
            "state_format": state_format,
            "min_quant_numel": min_quant_numel,
            "stochastic_round": stochastic_round,
            "master_weights": master_weights,
            "skip_nonfinite": skip_nonfinite,
            "backend": backend,
            "seed": seed,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_number("eps", group["eps"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("beta1 (betas[0])", betas[0], 0.0, 1.0)
        _check_number("beta2 (betas[1])", betas[1], 0.0, 1.0)
        if not isinstance(group["amsgrad"], bool):
            raise ValueError(f"amsgrad must be True or False, got {group['amsgrad']!r}")

    def _step_bucket(self, group, params, grads, states, state_format, seed) -> None:
        beta1, beta2 = group["betas"]
        adam_step(
            params,
            grads,
            states,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            decoupled=self._decoupled,
            amsgrad=group["amsgrad"],
            **self._common_step_kwargs(group, state_format, seed),
        )


class Adam(AdamW):
    """Adam with the semantics of ``torch.optim.Adam``: L2 weight decay added to the gradient (default 0).

    Arguments as :class:`AdamW`.

    Example:
        With fp32 state and L2 weight decay, three steps give ``torch.optim.Adam``'s weights:

        >>> import copy
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> ours = torch.nn.Linear(64, 64)
        >>> theirs = copy.deepcopy(ours)
        >>> x = torch.randn(32, 64)
        >>> for model, opt in [
        ...     (ours, tilewise.optim.Adam(ours.parameters(), lr=1e-2, weight_decay=0.1)),
        ...     (theirs, torch.optim.Adam(theirs.parameters(), lr=1e-2, weight_decay=0.1)),
        ... ]:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         model(x).square().mean().backward()
        ...         opt.step()
        >>> torch.allclose(ours.weight, theirs.weight), torch.allclose(ours.bias, theirs.bias)
        (True, True)
    """

    _decoupled = False

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit block-wise state by default (``state_bits=8``).

    Example:
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.AdamW8bit(model.parameters(), lr=1e-2)
        >>> opt.param_groups[0]["state_bits"]
        8
        >>> x = torch.randn(32, 64)
        >>> loss = model(x).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> bool(model(x).square().mean() < loss)
        True
        >>> state = opt.state[model.weight]
        >>> state["exp_avg_codes"].dtype, state["exp_avg_sq_codes"].dtype
        (torch.uint8, torch.uint8)
        >>> round(sum(t.nbytes for t in state.values()) / model.weight.numel(), 2)  # bytes per parameter
        2.03
    """

    def __init__(self, params: Iterable, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)


class AdamW4bit(AdamW):
    """:class:`AdamW` with 4-bit block-wise state by default (``state_bits=4``).

    Example:
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.AdamW4bit(model.parameters(), lr=1e-2)
        >>> x = torch.randn(32, 64)
        >>> loss = model(x).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> bool(model(x).square().mean() < loss)
        True
        >>> state = opt.state[model.weight]
        >>> state["exp_avg_codes"].shape  # two 4-bit codes per byte
        torch.Size([2048])
        >>> round(sum(t.nbytes for t in state.values()) / model.weight.numel(), 2)  # bytes per parameter
        1.06
    """

    def __init__(self, params: Iterable, *args: Any, state_bits: int = 4, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)


class Adam8bit(Adam):
    """:class:`Adam` with 8-bit block-wise state by default (``state_bits=8``).

    Example:
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.Adam8bit(model.parameters(), lr=1e-2, weight_decay=1e-3)  # L2, as Adam's
        >>> x = torch.randn(32, 64)
        >>> loss = model(x).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> bool(model(x).square().mean() < loss)
        True
        >>> state = opt.state[model.weight]
        >>> state["exp_avg_codes"].dtype, state["exp_avg_scales"].shape  # one fp32 scale per 256 codes
        (torch.uint8, torch.Size([16]))
        >>> round(sum(t.nbytes for t in state.values()) / model.weight.numel(), 2)  # bytes per parameter
        2.03
    """

    def __init__(self, params: Iterable, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
