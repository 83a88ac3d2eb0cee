"""What this machine offers tilewise: Python, torch, CUDA, Triton, GPUs, runnable backends and installed peers.

Behind ``tilewise env``. Peers are looked up by their installed metadata, never imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from tilewise import __version__
from tilewise._backend import ENV_VAR, interpreting, triton_available

__all__ = ["PEERS", "collect", "format_env"]

# Distributions a user might pick instead of tilewise, or that tilewise works with (PyPI names).
PEERS: tuple[str, ...] = (
    "bitsandbytes",
    "torchao",
    "flash-linear-attention",
    "fla-core",
    "flashoptim",
    "galore-torch",
    "apollo-torch",
    "timm",
    "kvpress",
    "safetensors",
    "matplotlib",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[dict[str, Any]]:
    """Name, memory (GiB) and compute capability of each CUDA device; empty without one."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return gpus


def _backends(has_cuda: bool, triton_version: str | None) -> dict[str, dict[str, Any]]:
    """Which backends can run here, and why (not)."""
    if not triton_available():
        if not sys.platform.startswith("linux"):
            why = f"Triton has no wheels for {platform.system()}"
        elif triton_version is None:
            why = "triton is not installed: pip install 'tilewise[triton]'"
        else:
            why = f"triton {triton_version} is installed but fails to import"
        triton = {"available": False, "why": why}
    elif has_cuda:
        triton = {"available": True, "why": "triton imports and a CUDA GPU is present"}
    else:
        triton = {
            "available": False,
            "why": "triton imports but there is no CUDA GPU; set TRITON_INTERPRET=1 to run kernels on the CPU, slowly",
        }
    interp = os.environ.get("TRITON_INTERPRET")
    return {
        "reference": {"available": True, "why": "pure PyTorch, runs on every device"},
        "triton": triton,
        "interpret": {
            "available": interpreting() and triton_available(),
            "why": f"TRITON_INTERPRET={interp}" if interp is not None else "TRITON_INTERPRET is not set",
        },
    }


def collect() -> dict[str, Any]:
    """Gather the facts ``tilewise env`` prints, as a JSON-serialisable dict.

    Keys: ``tilewise``, ``python``, ``platform``, ``torch``, ``torch_cuda`` (CUDA version torch was built with, or
    None), ``cudnn`` (version int or None), ``triton`` (version or None), ``gpus`` (list of dicts: ``index``,
    ``name``, ``memory_gib``, ``capability``), ``backends`` (``reference``/``triton``/``interpret`` ->
    ``{"available": bool, "why": str}``), ``backend_override`` (``TILEWISE_BACKEND`` or None), and ``peers``
    (distribution name -> version or None). Initialises CUDA when a GPU is present, to read its properties.
    """
    has_cuda = torch.cuda.is_available()
    triton_version = _version("triton")
    return {
        "tilewise": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if has_cuda else None,
        "triton": triton_version,
        "gpus": _gpus(),
        "backends": _backends(has_cuda, triton_version),
        "backend_override": os.environ.get(ENV_VAR) or None,
        "peers": {dist: _version(dist) for dist in PEERS},
    }


def format_env(info: dict[str, Any]) -> str:
    """``info`` from :func:`collect` as aligned ``key: value`` lines for a terminal."""
    gpus = [(f"GPU {g['index']}", f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})") for g in info["gpus"]]
    lines = [
        ("tilewise", info["tilewise"]),
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("torch", info["torch"]),
        ("CUDA (torch build)", info["torch_cuda"] or "none (CPU build)"),
        ("cuDNN", info["cudnn"] or "none"),
        ("triton", info["triton"] or "not installed"),
        *(gpus or [("GPU", "none")]),
        ("TILEWISE_BACKEND", info["backend_override"] or "not set"),
    ]
    for name, b in info["backends"].items():
        lines.append((f"backend {name}", f"{'yes' if b['available'] else 'no'} ({b['why']})"))
    for dist, version in info["peers"].items():
        lines.append((f"peer {dist}", version or "not installed"))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)
