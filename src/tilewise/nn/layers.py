"""The StarReLU activation of MetaFormer Baselines, shared by the language and image MetaFormers.

Example:
    >>> import torch
    >>> from tilewise.nn import StarReLU
    >>> act = StarReLU()
    >>> act(torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 4.0]
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StarReLU", "star_relu"]


class _StarReLUFunction(torch.autograd.Function):
    """``s * relu(x)**2 + b`` saving only ``x``: the same activation memory as GELU (autograd on the plain
    expression would keep ``relu(x)`` and ``relu(x)**2`` as well)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        r = x.relu()
        # The [1] parameters are cast so that a bf16 x gives a bf16 y (a [1] fp32 tensor would promote it).
        return torch.addcmul(bias.to(x.dtype), r * r, scale.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale = ctx.saved_tensors
        r = x.relu()
        grad_x = grad_scale = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * (2 * scale.to(x.dtype)) * r
        acc = torch.promote_types(grad.dtype, torch.float32)  # scalar reductions in fp32 at least
        if ctx.needs_input_grad[1]:
            grad_scale = (grad.to(acc) * r.to(acc).square()).sum().reshape(scale.shape).to(scale.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.to(acc).sum().reshape(scale.shape).to(scale.dtype)
        return grad_x, grad_scale, grad_bias


def star_relu(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """StarReLU ``scale * relu(x)**2 + bias`` (MetaFormer Baselines, arXiv:2210.13452), in ``x``'s dtype.

    Args:
        x: any shape.
        scale, bias: ``[1]`` tensors (learnable or not).

    Example:
        >>> import torch
        >>> from tilewise.nn import star_relu
        >>> s, b = torch.tensor([0.5]), torch.tensor([-1.0])
        >>> x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
        >>> y = star_relu(x, s, b)  # 0.5 * relu(x)**2 - 1
        >>> y.tolist()
        [-1.0, -0.875, 3.5]
        >>> y.sum().backward()
        >>> x.grad.tolist()  # 2 * s * relu(x)
        [0.0, 0.5, 3.0]
        >>> star_relu(torch.ones(3, dtype=torch.bfloat16), s, b).dtype  # fp32 scalars do not promote x
        torch.bfloat16
    """
    return _StarReLUFunction.apply(x, scale, bias)


class StarReLU(nn.Module):
    """StarReLU activation ``s * relu(x)**2 + b`` with learnable scalars ``s`` and ``b``.

    The paper's defaults: ``s = 1``, ``b = 0`` at init (the paper's variance-matching values 0.8944 and -0.4472
    are an option). Backward saves only the input, so an MLP using it holds as much as one using GELU.

    Args:
        scale_init: initial ``s``; default 1.
        bias_init: initial ``b``; default 0.
        learnable: train ``s`` and ``b``; default True.

    Shapes: any ``[*] -> [*]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import StarReLU
        >>> act = StarReLU()  # s = 1, b = 0: relu(x)**2
        >>> act(torch.tensor([-1.0, 0.5, 3.0])).tolist()
        [0.0, 0.25, 9.0]
        >>> [name for name, p in act.named_parameters() if p.requires_grad]
        ['scale', 'bias']
        >>> frozen = StarReLU(scale_init=2.0, bias_init=-1.0, learnable=False)
        >>> frozen(torch.tensor([-1.0, 3.0])).tolist()  # 2 * relu(x)**2 - 1
        [-1.0, 17.0]
        >>> frozen.scale.requires_grad
        False
    """

    def __init__(self, scale_init: float = 1.0, bias_init: float = 0.0, learnable: bool = True) -> None:
        super().__init__()
        self.scale_init, self.bias_init = scale_init, bias_init
        self.scale = nn.Parameter(torch.empty(1), requires_grad=learnable)
        self.bias = nn.Parameter(torch.empty(1), requires_grad=learnable)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.scale.fill_(self.scale_init)
        self.bias.fill_(self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return star_relu(x, self.scale, self.bias)
