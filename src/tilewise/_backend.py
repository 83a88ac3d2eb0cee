"""Which implementation of an op runs: the Triton kernel or the pure-PyTorch reference.

Every public op takes ``backend="auto" | "triton" | "reference"`` and calls :func:`resolve_backend` with its
tensor arguments. The rules:

- ``"auto"`` picks ``"triton"`` when every tensor is on a CUDA device and Triton imports, else ``"reference"``
  (quietly: ``auto`` never runs the slow Triton interpreter on CPU tensors, and with no tensors it picks the
  reference).
- The environment variable ``TILEWISE_BACKEND`` (read at every call) replaces ``"auto"``; a backend named
  explicitly in the call wins over it.
- ``"triton"`` by name, from the call or the environment, raises ``RuntimeError`` when it cannot run: Triton is
  missing, or a tensor is on the CPU and Triton's interpreter is off (``TRITON_INTERPRET=1`` runs the kernels on
  the CPU, for tests).
- ``"reference"`` always runs.

Nothing here imports Triton or touches CUDA at import time.
"""

from __future__ import annotations

import os
import sys
from typing import Literal, get_args

import torch

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "interpreting", "resolve_backend", "triton_available"]

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
ENV_VAR = "TILEWISE_BACKEND"
# Values Triton itself reads as true for TRITON_INTERPRET (it uses the same set, case-insensitively).
_TRUE = frozenset({"1", "true", "on", "yes"})


# The answer of triton_available(), once known. A plain global rather than functools.cache: torch.compile traces
# ops that call resolve_backend, and Dynamo warns about (and skips) lru_cache wrappers.
_triton_importable: bool | None = None


def triton_available() -> bool:
    """Whether ``import triton`` works here (cached). Always ``False`` off Linux, where Triton has no wheels."""
    global _triton_importable
    if _triton_importable is None:
        _triton_importable = sys.platform.startswith("linux") and _import_triton()
    return _triton_importable


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET`` is set to ``1`` (or another
    value Triton reads as true). Triton reads it when a kernel module is imported, so set it before importing
    tilewise."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def _check_name(backend: str, source: str) -> None:
    if backend not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{source}={backend!r} is not a backend; use one of {valid}")


def _triton_or_raise(tensors: tuple[torch.Tensor, ...], source: str) -> str:
    """``"triton"`` if the kernels can run on these tensors, else a ``RuntimeError`` that says how to fix it."""
    if not triton_available():
        raise RuntimeError(
            f"{source} asks for Triton, but triton cannot be imported here; install it with "
            "`pip install 'tilewise[triton]'` (Linux only), or use backend='reference'"
        )
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu":
            if interpreting():
                continue
            raise RuntimeError(
                f"{source} got a CPU tensor, and Triton kernels need a CUDA tensor: move the inputs to the GPU, "
                "use backend='reference', or set TRITON_INTERPRET=1 before importing tilewise to run Triton "
                "kernels on CPU (slow; meant for tests)"
            )
        raise RuntimeError(
            f"{source} got a tensor on device {t.device}, where Triton kernels cannot run; "
            "move it to a CUDA device or use backend='reference'"
        )
    return "triton"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Pick the implementation an op runs for ``tensors``: ``"triton"`` or ``"reference"``.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` as passed by the caller of the op.
        *tensors: the op's tensor arguments (inputs and any preallocated outputs).

    Returns:
        ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: ``backend`` (or ``TILEWISE_BACKEND``) is not one of the names above.
        RuntimeError: Triton was asked for by name and cannot run on these tensors.
    """
    _check_name(backend, "backend")
    source = f"backend={backend!r}"
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced:
            _check_name(forced, ENV_VAR)
            backend, source = forced, f"{ENV_VAR}={forced}"
    if backend == "reference":
        return "reference"
    if backend == "triton":
        return _triton_or_raise(tensors, source)
    on_cuda = bool(tensors) and all(t.device.type == "cuda" for t in tensors)
    return "triton" if on_cuda and triton_available() else "reference"
