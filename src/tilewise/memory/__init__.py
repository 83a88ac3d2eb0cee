"""Memory accounting and planning: an analytic estimate of a training run's peak, and its measurement.

Example:
    >>> from tilewise.memory import Recipe, estimate
    >>> print(estimate("llama-7b", Recipe(optim="adamw8bit", param_dtype="bf16", batch_size=1)).format_table())
    llama-7b (attention, 6,738,415,616 params), adamw8bit, bf16, B=1 T=1024
    category                  MiB       GiB      %
    weights               12852.5    12.551   29.0
    gradients             12852.5    12.551   29.0
    optimizer_state       13053.3    12.747   29.5
    activations            5481.3     5.353   12.4
    other                    64.0     0.062    0.1
    total                 44303.6    43.265  100.0
"""

from tilewise.memory.estimate import (
    CATEGORIES,
    OPTIMIZERS,
    Breakdown,
    Recipe,
    estimate,
    fit_recipe,
    format_command,
    parse_size,
    plan_main,
    smallest_recipe,
)
from tilewise.memory.measure import SavedTensorCounter, format_comparison, measure_peak, tensor_bytes

__all__ = [
    "CATEGORIES",
    "OPTIMIZERS",
    "Breakdown",
    "Recipe",
    "SavedTensorCounter",
    "estimate",
    "fit_recipe",
    "format_command",
    "format_comparison",
    "measure_peak",
    "parse_size",
    "plan_main",
    "smallest_recipe",
    "tensor_bytes",
]
