"""Memory accounting and planning: an analytic estimate of a training run's peak, and its measurement.

Example:
    >>> from tilewise.memory import Recipe, estimate
    >>> print(estimate("llama-7b", Recipe(optim="adamw8bit", param_dtype="bf16", batch_size=1)).format_table())
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
