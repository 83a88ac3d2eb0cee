"""tilewise: block-wise quantization, low-bit optimizers and efficient token mixers for PyTorch.

Subpackages load on first use (``tilewise.quant``, ``tilewise.ops``, ...), so ``import tilewise`` is cheap: it
imports neither Triton nor any kernel, and it does not initialise CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__version__ = "0.1.0"

# Subpackages and modules reachable as attributes of `tilewise`; each is imported on first access, and only
# those present in this installation resolve.
_LAZY = ("quant", "ops", "optim", "nn", "kv", "memory", "train", "bench", "envinfo")

__all__ = ["__version__"]


def _exists(name: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{name}") is not None


def __getattr__(name: str) -> ModuleType:
    """Import ``tilewise.<name>`` on first attribute access (PEP 562)."""
    if name in _LAZY and _exists(name):
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(name for name in _LAZY if _exists(name))})
