"""Optimizers with low-bit state: ``torch.optim.Optimizer`` subclasses on fp32, bf16, 8-bit, 4-bit or fp8 moments.

Each param group picks its state with ``state_bits`` (32, 16, 8, 4) or ``state_format`` (``"fp32"``, ``"bf16"``,
``"q8"``, ``"q4"``, ``"fp8"``); see README.md beside this file for the formats and their bytes per parameter.

Example:
    8-bit state for the matrices, fp32 for the biases, and an ordinary LR scheduler:

    >>> import torch
    >>> import tilewise
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    >>> opt = tilewise.optim.AdamW(
    ...     [
    ...         {"params": [p for p in model.parameters() if p.ndim == 2]},
    ...         {"params": [p for p in model.parameters() if p.ndim == 1], "state_bits": 32, "weight_decay": 0.0},
    ...     ],
    ...     lr=1e-2,
    ...     weight_decay=0.01,
    ...     state_bits=8,
    ... )
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> x, y = torch.randn(16, 64), torch.randn(16, 64)
    >>> losses = []
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     opt.step()
    ...     sched.step()
    ...     losses.append(loss.item())
    >>> losses[0] > losses[1] > losses[2]
    True
    >>> [group["lr"] for group in opt.param_groups]  # halved after each of the 3 steps
    [0.00125, 0.00125]
    >>> opt.state[model[0].weight]["exp_avg_codes"].dtype, opt.state[model[0].bias]["exp_avg"].dtype
    (torch.uint8, torch.float32)
"""

from tilewise.optim._base import LowBitOptimizer
from tilewise.optim.adamw import Adam, Adam8bit, AdamW, AdamW4bit, AdamW8bit
from tilewise.optim.lion import Lion, Lion8bit
from tilewise.optim.sgd import SGD, SGD8bit

__all__ = [
    "SGD",
    "Adam",
    "Adam8bit",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "Lion",
    "Lion8bit",
    "LowBitOptimizer",
    "SGD8bit",
]
