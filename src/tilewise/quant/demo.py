"""The quantization demo behind ``tilewise demo``: every codebook on one tensor, side by side.

A deterministic bf16 tensor with heavy tails and a few outlier channels (the shape of real LLM weights and
activations) is quantized block-wise with each codebook, with and without the Hadamard rotation, and each result
is scored: storage (bits per element, scales included), compression against bf16, relative RMS error, SNR, time.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from tilewise.quant import quantize

__all__ = ["DEFAULT_CODEBOOKS", "format_demo_table", "make_input", "run_demo"]

DEFAULT_CODEBOOKS: tuple[str, ...] = ("int8", "dynamic8", "nf4", "fp4", "int4")
# make_input's tensor is read as rows of _CHANNELS channels; these channels are _OUTLIER_GAIN times larger.
_CHANNELS = 1024
_OUTLIER_CHANNELS = (11, 300, 777)
_OUTLIER_GAIN = 25.0

Progress = Callable[[int, int, str], None]
T = TypeVar("T")


def make_input(numel: int, seed: int = 42, device: str | torch.device = "cpu") -> torch.Tensor:
    """A deterministic bf16 test tensor ``[numel]``, the same on every machine for the same ``seed``.

    Values: N(0, 1), of which 10% are drawn 4x wider (heavy tails); read as rows of 1024 channels, channels 11,
    300 and 777 are 25x larger (outlier channels, as in LLM activations). Generated on the CPU, then moved.
    """
    if numel < 1:
        raise ValueError(f"make_input: numel must be at least 1, got {numel}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen)
    wide = torch.rand(numel, generator=gen) < 0.1
    x = torch.where(wide, 4.0 * x, x)
    channel = torch.arange(numel) % _CHANNELS
    x = torch.where(torch.isin(channel, torch.tensor(_OUTLIER_CHANNELS)), _OUTLIER_GAIN * x, x)
    return x.to(device=device, dtype=torch.bfloat16)


def _median_ms(fn: Callable[[], T], device: torch.device, repeats: int) -> tuple[T, float]:
    """``fn()``'s result and its median wall time in ms over ``repeats`` calls, after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return result, statistics.median(times)


def _score(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Relative RMS error and SNR (dB) of ``y`` against ``x``, in float64."""
    x64, err = x.double(), (y.double() - x.double())
    noise, signal = float(err.square().sum()), float(x64.square().sum())
    rel_rms = math.sqrt(noise / signal) if signal else math.inf
    snr_db = 10 * math.log10(signal / noise) if noise else math.inf
    return rel_rms, snr_db


def run_demo(
    codebooks: Sequence[str] = DEFAULT_CODEBOOKS,
    numel: int = 1 << 20,
    block_size: int = 256,
    *,
    device: str | torch.device = "cpu",
    rotations: Sequence[bool] = (False, True),
    double_quant: bool = False,
    repeats: int = 3,
    seed: int = 42,
    backend: str = "auto",
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Quantize :func:`make_input`'s tensor with each codebook and rotation; one scored row per pair.

    Args:
        codebooks: codebook names (see :func:`tilewise.quant.codebook_names`).
        numel: elements in the test tensor (default 2**20).
        block_size: elements per scale.
        device: where the tensor lives and the work runs.
        rotations: which ``rotate=`` settings to run, in order.
        double_quant: quantize the scales too (QLoRA).
        repeats: timed calls per measurement, after one warm-up; the median is reported.
        seed: seed of the test tensor.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``, passed to quantize and dequantize.
        progress: called as ``progress(done, total, label)`` before each row and once at the end.

    Returns:
        Dicts with keys ``codebook``, ``rotate``, ``double_quant``, ``block_size``, ``numel``, ``bits_per_element``
        (codes and scales), ``compression_vs_bf16``, ``rel_rms``, ``snr_db``, ``quantize_ms``, ``dequantize_ms``.
    """
    if repeats < 1:
        raise ValueError(f"run_demo: repeats must be at least 1, got {repeats}")
    x = make_input(numel, seed, device)
    reference = x.float()
    jobs = [(name, rotate) for name in codebooks for rotate in rotations]
    rows = []
    for i, (name, rotate) in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), f"{name}{' rotated' if rotate else ''}")

        quant = functools.partial(
            quantize, x, codebook=name, block_size=block_size, rotate=rotate, double_quant=double_quant, backend=backend
        )
        q, quantize_ms = _median_ms(quant, x.device, repeats)
        y, dequantize_ms = _median_ms(
            functools.partial(q.dequantize, torch.float32, backend=backend), x.device, repeats
        )
        rel_rms, snr_db = _score(reference, y)
        bits = 8 * q.nbytes / numel
        rows.append(
            {
                "codebook": name,
                "rotate": rotate,
                "double_quant": double_quant,
                "block_size": block_size,
                "numel": numel,
                "bits_per_element": bits,
                "compression_vs_bf16": 16 / bits,
                "rel_rms": rel_rms,
                "snr_db": snr_db,
                "quantize_ms": quantize_ms,
                "dequantize_ms": dequantize_ms,
            }
        )
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    return rows


def format_demo_table(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`run_demo`'s rows as a fixed-width text table."""
    header = ("codebook", "rotate", "bits/elem", "vs bf16", "rel RMS err", "SNR dB", "quant ms", "dequant ms")
    body = [
        (
            r["codebook"] + (" +dq" if r["double_quant"] else ""),
            "yes" if r["rotate"] else "no",
            f"{r['bits_per_element']:.3f}",
            f"{r['compression_vs_bf16']:.2f}x",
            f"{r['rel_rms']:.4f}",
            f"{r['snr_db']:.2f}",
            f"{r['quantize_ms']:.2f}",
            f"{r['dequantize_ms']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(row[j]) for row in (header, *body)) for j in range(len(header))]
    lines = [_table_line(row, widths) for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """One table line: the two text columns left-aligned, the numbers right-aligned."""
    pairs = enumerate(zip(cells, widths, strict=True))
    return "  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in pairs)
