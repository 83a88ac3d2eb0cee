"""SGD with momentum (and Nesterov) with the momentum buffer in fp32, bf16, 8-bit, 4-bit or fp8."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tilewise.ops.optim_step import sgd_step
from tilewise.optim._base import LowBitOptimizer, _check_number

__all__ = ["SGD", "SGD8bit"]


class SGD(LowBitOptimizer):
    """SGD with the semantics of ``torch.optim.SGD`` (momentum, dampening, Nesterov, L2 weight decay, maximize);
    the momentum buffer is kept in the state format. With ``momentum=0`` there is no buffer.

    Args:
        params: parameters or param-group dicts (any argument can be overridden per group).
        lr: learning rate, a float or a 0-dim tensor (default 1e-3).
        momentum: momentum factor, >= 0 (default 0).
        dampening: dampening of the momentum, in [0, 1] (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing it.
        state_bits, state_format, min_quant_numel, stochastic_round, master_weights, skip_nonfinite, backend,
            seed: as for :class:`tilewise.optim.AdamW`.

    Example:
        With fp32 state, three Nesterov steps give ``torch.optim.SGD``'s weights:

        >>> import copy
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> ours = torch.nn.Linear(64, 64)
        >>> theirs = copy.deepcopy(ours)
        >>> x = torch.randn(32, 64)
        >>> hyper = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
        >>> for model, opt in [
        ...     (ours, tilewise.optim.SGD(ours.parameters(), **hyper)),
        ...     (theirs, torch.optim.SGD(theirs.parameters(), **hyper)),
        ... ]:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         model(x).square().mean().backward()
        ...         opt.step()
        >>> torch.allclose(ours.weight, theirs.weight), torch.allclose(ours.bias, theirs.bias)
        (True, True)
    """

    kind = "sgd"

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            **kwargs,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_number("momentum", group["momentum"], 0.0)
        _check_number("dampening", group["dampening"], 0.0, 1.0, high_open=False)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def _step_bucket(self, group, params, grads, states, state_format, seed) -> None:
        sgd_step(
            params,
            grads,
            states,
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            **self._common_step_kwargs(group, state_format, seed),
        )


class SGD8bit(SGD):
    """:class:`SGD` with an 8-bit block-wise momentum buffer by default (``state_bits=8``).

    Example:
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.SGD8bit(model.parameters(), lr=0.1, momentum=0.9)
        >>> x = torch.randn(32, 64)
        >>> losses = []
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = model(x).square().mean()
        ...     loss.backward()
        ...     opt.step()
        ...     losses.append(loss.item())
        >>> losses[0] > losses[1] > losses[2]
        True
        >>> state = opt.state[model.weight]
        >>> state["momentum_codes"].dtype, state["momentum_scales"].shape  # one fp32 scale per 256 codes
        (torch.uint8, torch.Size([16]))
        >>> round(sum(t.nbytes for t in state.values()) / model.weight.numel(), 2)  # bytes per parameter; 4 in fp32
        1.02
    """

    def __init__(self, params: Iterable, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
