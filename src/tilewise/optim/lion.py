"""Lion (EvoLved Sign Momentum) with fp32, bf16, 8-bit, 4-bit or fp8 optimizer state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tilewise.ops.optim_step import lion_step
from tilewise.optim._base import LowBitOptimizer, _check_number

__all__ = ["Lion", "Lion8bit"]


class Lion(LowBitOptimizer):
    """Lion (Chen et al. 2023): ``p -= lr * sign(beta1 m + (1 - beta1) g)`` with decoupled weight decay, then
    ``m = beta2 m + (1 - beta2) g``. One moment, so 4 bytes per parameter in fp32 state, about 1 at 8 bits.

    Args:
        params: parameters or param-group dicts (any argument can be overridden per group).
        lr: learning rate, a float or a 0-dim tensor (default 1e-4; Lion wants 3-10x less than AdamW).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.99)).
        weight_decay: decoupled weight decay coefficient (default 0).
        maximize: maximize the objective instead of minimizing it.
        state_bits, state_format, min_quant_numel, stochastic_round, master_weights, skip_nonfinite, backend,
            seed: as for :class:`tilewise.optim.AdamW`.

    Example:
        The update is a sign, so (without weight decay) a step moves every weight by exactly ``lr``:

        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)
        >>> before = model.weight.detach().clone()
        >>> opt = tilewise.optim.Lion(model.parameters(), lr=1e-3)
        >>> x = torch.randn(32, 64)
        >>> loss = model(x).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> torch.allclose((model.weight - before).abs(), torch.full_like(before, 1e-3))
        True
        >>> bool(model(x).square().mean() < loss)
        True
        >>> sorted(opt.state[model.weight])  # one moment, fp32: 4 bytes per parameter
        ['exp_avg', 'skips', 'step']
    """

    kind = "lion"

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize, **kwargs}
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("beta1 (betas[0])", betas[0], 0.0, 1.0)
        _check_number("beta2 (betas[1])", betas[1], 0.0, 1.0)

    def _step_bucket(self, group, params, grads, states, state_format, seed) -> None:
        beta1, beta2 = group["betas"]
        lion_step(
            params,
            grads,
            states,
            beta1=float(beta1),
            beta2=float(beta2),
            **self._common_step_kwargs(group, state_format, seed),
        )


class Lion8bit(Lion):
    """:class:`Lion` with 8-bit block-wise state by default (``state_bits=8``).

    Example:
        >>> import torch
        >>> import tilewise
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(64, 64, bias=False)  # 4096 weights: not below min_quant_numel
        >>> opt = tilewise.optim.Lion8bit(model.parameters(), lr=1e-3, weight_decay=0.1)
        >>> x = torch.randn(32, 64)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(x).square().mean().backward()
        ...     opt.step()
        >>> state = opt.state[model.weight]
        >>> state["exp_avg_codes"].dtype, int(state["step"])
        (torch.uint8, 3)
        >>> round(sum(t.nbytes for t in state.values()) / model.weight.numel(), 2)  # bytes per parameter
        1.02
    """

    def __init__(self, params: Iterable, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
