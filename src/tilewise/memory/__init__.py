"""Memory accounting and planning: an analytic estimate of a training run's peak, and its measurement.

Example:
    >>> from tilewise.memory import Recipe, estimate
    >>> print(estimate("llama-7b", Recipe(optim="adamw8bit", param_dtype="bf16", batch_size=1)).format_table())
"""

from tilewise.memory.estimate import CATEGORIES, OPTIMIZERS, Breakdown, Recipe, estimate, plan_main
from tilewise.memory.measure import SavedTensorCounter, format_comparison, measure_peak, tensor_bytes

__all__ = [
    "CATEGORIES",
    "OPTIMIZERS",
    "Breakdown",
    "Recipe",
    "SavedTensorCounter",
    "estimate",
    "format_comparison",
    "measure_peak",
    "plan_main",
    "tensor_bytes",
]
