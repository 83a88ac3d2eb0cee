"""Test helpers: the four tolerance tiers, NaN poisoning, and skip markers. Test-only (imports pytest).

Pick the tightest tier that the math allows:

1. :func:`assert_exact` -- bit-for-bit: quantization codes, scales, packing, anything with a defined exact result.
2. :func:`assert_close` -- per-dtype ``atol``/``rtol`` from :data:`TOLERANCES`: elementwise math.
3. :func:`assert_rel_rms` -- relative RMS error with an absolute floor: scans and long reductions, where the
   rounding of a different summation order accumulates.
4. :func:`assert_snr` -- a signal-to-noise floor in dB: lossy paths (quantize then dequantize).

A tolerance loosened beyond its tier carries a one-line reason at the call site.
"""

from __future__ import annotations

import math

import pytest
import torch

from tilewise._backend import triton_available

__all__ = [
    "TOLERANCES",
    "assert_close",
    "assert_exact",
    "assert_rel_rms",
    "assert_snr",
    "poison_",
    "poison_like",
    "requires_cuda",
    "requires_triton",
]

# dtype -> (atol, rtol) for elementwise math whose result is rounded to that dtype. rtol is a few units of the
# dtype's rounding error u (half an ulp): results computed in a different order or with FMA may differ by that.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # u = 2**-53 ~ 1.1e-16: 1e-7 leaves room for long float64 chains and is still 13x tighter than fp32.
    torch.float64: (1e-7, 1e-7),
    # u = 2**-24 ~ 6e-8: rtol ~ 20 u covers reassociation/FMA in a short chain; atol for results near zero.
    torch.float32: (1e-5, 1.3e-6),
    # u = 2**-11 ~ 4.9e-4: rtol ~ 2 u, one rounding each side of the fp32 math; atol for results near zero.
    torch.float16: (1e-5, 1e-3),
    # u = 2**-8 ~ 3.9e-3: rtol ~ 4 u, as bf16 inputs and outputs each round once and fp32 math in between.
    torch.bfloat16: (1e-5, 1.6e-2),
}


def _flat_index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    """``flat`` as a multi-index into ``shape`` (row-major)."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _check_meta(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    prefix = f"{msg}: " if msg else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{prefix}dtype {actual.dtype} != expected {expected.dtype}")


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Tier 1: same shape, dtype and every element equal (``torch.equal``; a NaN never equals anything).

    Raises:
        AssertionError: naming the number of mismatches and the first one, with both values.
    """
    _check_meta(actual, expected, msg)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if torch.equal(a, e):
        return
    bad = (a != e).reshape(-1)
    count = int(bad.sum())
    first = int(bad.nonzero()[0])
    where = _flat_index(first, a.shape)
    prefix = f"{msg}: " if msg else ""
    raise AssertionError(
        f"{prefix}{count} of {a.numel()} elements differ; first at index {where}: "
        f"{a.reshape(-1)[first].item()!r} != expected {e.reshape(-1)[first].item()!r}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    reason: str = "",
    msg: str = "",
) -> None:
    """Tier 2: ``|actual - expected| <= atol + rtol * |expected|`` elementwise, with the tier's tolerances.

    Args:
        actual, expected: tensors of the same shape and dtype (NaN anywhere fails).
        dtype: whose tolerances apply (default ``actual.dtype``); pass the lowest precision the computation
            went through, e.g. ``torch.bfloat16`` for fp32 outputs computed from bf16 inputs.
        atol, rtol: override the tier; then ``reason`` must say why, in one line.
        msg: prefix for the failure message.

    Raises:
        AssertionError: values differ beyond the tolerance (torch.testing's report: count, greatest error, index).
        ValueError: a tolerance was overridden without a reason, or ``dtype`` has no tier.
    """
    _check_meta(actual, expected, msg)
    tier = dtype if dtype is not None else actual.dtype
    if tier not in TOLERANCES:
        raise ValueError(f"assert_close: no tolerance tier for {tier}; use assert_exact for integer tensors")
    if (atol is not None or rtol is not None) and not reason:
        raise ValueError("assert_close: a tolerance looser than its tier needs reason='...' saying why")
    tier_atol, tier_rtol = TOLERANCES[tier]
    torch.testing.assert_close(
        actual.detach().cpu(),
        expected.detach().cpu(),
        atol=tier_atol if atol is None else atol,
        rtol=tier_rtol if rtol is None else rtol,
        msg=lambda m: f"{msg}: {m}" if msg else m,
    )


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float(t.square().mean())) if t.numel() else 0.0


def _float64_pair(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors as float64 on the CPU, after checking shapes and that ``actual`` holds no NaN or inf."""
    prefix = f"{msg}: " if msg else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    finite = torch.isfinite(a)
    if not bool(finite.all()):
        first = int((~finite).reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{prefix}{int((~finite).sum())} non-finite elements (unwritten output?); "
            f"first at index {_flat_index(first, a.shape)}"
        )
    return a, e


def assert_rel_rms(actual: torch.Tensor, expected: torch.Tensor, rel: float, floor: float = 0.0, msg: str = "") -> None:
    """Tier 3: ``rms(actual - expected) <= max(rel * rms(expected), floor)``, computed in float64.

    ``floor`` is an absolute RMS error that always passes, for ``expected`` near zero where a relative bound
    means nothing. Dtypes may differ (compare a low-precision result against an fp32 reference).

    Raises:
        AssertionError: the error is above the bound, or ``actual`` has NaN/inf, or the shapes differ.
    """
    a, e = _float64_pair(actual, expected, msg)
    err, ref = _rms(a - e), _rms(e)
    bound = max(rel * ref, floor)
    if not err <= bound:
        prefix = f"{msg}: " if msg else ""
        raise AssertionError(
            f"{prefix}RMS error {err:.3e} > bound {bound:.3e} (relative {err / ref if ref else math.inf:.3e} "
            f"vs allowed {rel:.3e}; reference RMS {ref:.3e}, floor {floor:.3e})"
        )


def assert_snr(actual: torch.Tensor, expected: torch.Tensor, min_db: float, msg: str = "") -> None:
    """Tier 4: signal-to-noise ratio ``10 log10(sum(expected**2) / sum((actual - expected)**2)) >= min_db``.

    An exact match counts as infinite SNR. Dtypes may differ (dequantized bf16 against the fp32 original).

    Raises:
        AssertionError: the SNR is below ``min_db``, or ``actual`` has NaN/inf, or the shapes differ.
    """
    a, e = _float64_pair(actual, expected, msg)
    noise = float((a - e).square().sum())
    signal = float(e.square().sum())
    if noise == 0.0:
        return
    snr = 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
    if not snr >= min_db:
        prefix = f"{msg}: " if msg else ""
        raise AssertionError(f"{prefix}SNR {snr:.2f} dB < {min_db:.2f} dB")


def _sentinel(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point or dtype.is_complex:
        return math.nan
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with a value no kernel should leave there and return it: NaN for floats, the
    largest value for integers (255 for uint8), ``True`` for bools. An unwritten element then fails the test."""
    return t.fill_(_sentinel(t.dtype))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``t`` (shape, dtype, device) filled as by :func:`poison_`."""
    return poison_(torch.empty_like(t))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install 'tilewise[triton]')")
