"""Optimizers with low-bit state: ``torch.optim.Optimizer`` subclasses on fp32, bf16, 8-bit, 4-bit or fp8 moments.

Each param group picks its state with ``state_bits`` (32, 16, 8, 4) or ``state_format`` (``"fp32"``, ``"bf16"``,
``"q8"``, ``"q4"``, ``"fp8"``); see README.md beside this file for the formats and their bytes per parameter.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> opt = tilewise.optim.AdamW8bit(model.parameters(), lr=3e-4, weight_decay=0.01)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
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
