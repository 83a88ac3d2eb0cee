"""Run-directory checkpoints: the model as safetensors, the optimizer and trainer state as plain tensors.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNNN`` holding ``model.safetensors`` (the model's state dict),
``optimizer.pt`` (the optimizer's state dict keyed by parameter name, as
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` gives it) and ``trainer.pt`` (step, RNG
states), the last two loadable with ``torch.load(weights_only=True)``. It is written into a hidden temporary folder
beside it and renamed into place, so a reader (or a resume after a crash) never sees half of one.

The safetensors file is written and read here (the format is an 8-byte header length, a JSON header, then the raw
bytes), so the core package needs no dependency beyond torch; the ``safetensors`` package reads it unchanged.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "latest_checkpoint",
    "list_checkpoints",
    "load_safetensors",
    "prune_checkpoints",
    "read_checkpoint",
    "save_safetensors",
    "write_checkpoint",
]

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_PREFIX = "step-"


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``tensors`` (name -> tensor, any device, no shared storage needed) to a safetensors file at ``path``.

    Example:
        >>> import json
        >>> import struct
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from tilewise.train import save_safetensors
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp, "model.safetensors")
        ...     save_safetensors({"w": torch.ones(2, 3), "step": torch.tensor(7)}, path)
        ...     raw = path.read_bytes()
        >>> (n,) = struct.unpack("<Q", raw[:8])  # the format: header length, JSON header, then the data
        >>> json.loads(raw[8 : 8 + n])["w"]
        {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [8, 32]}
        >>> len(raw) == 8 + n + 8 + 24, n % 8  # int64 step (8 bytes), then w (24 bytes); aligned header
        (True, 0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, Path(tmp, "z.safetensors"))
        Traceback (most recent call last):
        ...
        TypeError: tensor 'z' has dtype torch.complex64, which safetensors cannot store here
    """
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, tensor in sorted(tensors.items()):
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store here")
        t = tensor.detach().to("cpu").contiguous()
        blob = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for blob in blobs:
            f.write(blob)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors (name -> tensor).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from tilewise.train import load_safetensors, save_safetensors
        >>> tensors = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "mask": torch.tensor([True, False])}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_safetensors(tensors, Path(tmp, "model.safetensors"))
        ...     loaded = load_safetensors(Path(tmp, "model.safetensors"))
        >>> sorted(loaded), loaded["w"].dtype, loaded["w"].shape
        (['mask', 'w'], torch.bfloat16, torch.Size([2, 3]))
        >>> all(torch.equal(loaded[name], tensors[name]) for name in tensors)
        True
    """
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    dtypes = {v: k for k, v in _DTYPES.items()}
    out = {}
    for name, info in header.items():
        start, end = (8 + n + o for o in info["data_offsets"])
        dtype = dtypes[info["dtype"]]
        flat = torch.frombuffer(bytearray(raw[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "trainer.pt").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tilewise.train import latest_checkpoint
        >>> with tempfile.TemporaryDirectory() as run:
        ...     print(latest_checkpoint(run))
        ...     for step in (200, 1000, 400):
        ...         folder = Path(run, "checkpoints", f"step-{step:07d}")
        ...         folder.mkdir(parents=True)
        ...         (folder / "trainer.pt").touch()  # written last: its presence marks a complete checkpoint
        ...     Path(run, "checkpoints", "step-0001200").mkdir()  # no trainer.pt: incomplete, ignored
        ...     print(latest_checkpoint(run).name)
        None
        step-0001000
    """
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>`` atomically (temporary folder, then rename); returns its path."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        save_safetensors(model_state, tmp / "model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state, trainer_state)`` of a checkpoint folder, on the CPU."""
    model_state = load_safetensors(folder / "model.safetensors")
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    trainer_state = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    return model_state, optimizer_state, trainer_state


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints of a run."""
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
