"""The ``hadamard`` suite: the orthonormal Walsh-Hadamard transform along the last dimension of ``x [rows, n]``.

For each ``n`` (default 128, 1024, 4096, 32768) at ``rows * n`` = 256 M bf16 elements, on the same input:

- tilewise: :func:`tilewise.ops.hadamard` on the chosen backend (Triton on CUDA, the reference on the CPU).
- torch: a dense matrix product ``x @ (H_n / sqrt(n))`` with the matrix in ``x``'s dtype, for ``n <= 4096``
  (the matrix is ``n x n``; ``tflops`` counts ``2 * rows * n**2``), the baseline a user writes first.
- fast_hadamard_transform (Dao-AILab) when installed: ``hadamard_transform(x, scale=n**-0.5)``.

Bytes are ``x`` read + ``y`` written. ``rel_rms`` is each output's relative RMS error against the fp32 reference
transform of the same (bf16) input on the first ``2**20`` elements; ``check`` says whether tilewise's output
equals the reference's, rounded to the same dtype, element for element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tilewise._backend import resolve_backend
from tilewise.bench.runner import (
    Peer,
    count_label,
    default_device,
    device_name,
    error_status,
    free_memory,
    load_peer,
    make_row,
    measure,
    register_suite,
    rel_rms,
    resolve_dtype,
)
from tilewise.ops.hadamard import MAX_N, hadamard
from tilewise.ops.hadamard.reference import hadamard_ref

__all__ = ["DEFAULT_SIZES", "DENSE_MAX_N", "PEERS", "hadamard_suite"]

DEFAULT_SIZES: tuple[int, ...] = (128, 1024, 4096, 32768)
DENSE_MAX_N = 4096
PEERS: dict[str, Peer] = {"fast_hadamard_transform": Peer("fast_hadamard_transform", "fast-hadamard-transform")}
CUDA_NUMEL, CPU_NUMEL = 1 << 28, 1 << 20
CUDA_REPEATS, CPU_REPEATS = 20, 5
_CHECK_NUMEL = 1 << 20


def _dense_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``H_n / sqrt(n)`` (Sylvester, symmetric) in ``dtype``: the reference transform of the identity."""
    return hadamard_ref(torch.eye(n, device=device)).to(dtype)


def _ulp_check(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """``"= ref (1M el.)"`` when equal, else how many elements differ and by at most how many units in the last
    place: fp32 math summed in another order may round a few results to the neighbouring bf16 value (1 ulp)."""
    bad = int(torch.ne(actual, expected).sum())
    if bad == 0:
        return f"= ref ({count_label(actual.numel())} el.)"
    # ulps alone mislead near zero (where a bf16 ulp is tiny), so the largest error relative to the RMS follows
    e = expected.float()
    rms = e.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    worst = ((actual.float() - e).abs().max() / rms).item()
    return f"{bad}/{actual.numel()} off by <= {_max_ulps(actual, expected)} ulp (max err {worst:.1e} x RMS)"


def _max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Largest distance in representable values between same-dtype floats (sign-magnitude bits made monotone)."""
    ints = {2: torch.int16, 4: torch.int32}[actual.element_size()]
    magnitude = (1 << (8 * actual.element_size() - 1)) - 1

    def key(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(ints).to(torch.int64)
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return int((key(actual) - key(expected)).abs().max())


def _base(n: int, rows: int, impl: str, x: torch.Tensor, note: str | None = None) -> dict[str, Any]:
    return {
        "suite": "hadamard",
        "op": "hadamard",
        "n": n,
        "rows": rows,
        "impl": impl,
        "numel": rows * n,
        "dtype": str(x.dtype).removeprefix("torch."),
        "device": str(x.device),
        "device_name": device_name(x.device),
        "note": note,
    }


def _run(
    x: torch.Tensor, label: str, build: Callable[[], Callable[[], torch.Tensor]], repeats: int, flops: float | None
) -> dict[str, Any]:
    """One row: time ``build()``'s call on ``x [rows, n]`` and score its output; errors become the row's status."""
    rows, n = x.shape
    base = _base(n, rows, label, x)
    try:
        fn = build()
        fields = measure(fn, x.device, 2 * x.numel() * x.element_size(), repeats=repeats, flops=flops)
        y = fn()
        k = max(1, min(rows, _CHECK_NUMEL // n))
        want = hadamard_ref(x[:k].float())
        fields["rel_rms"] = rel_rms(y[:k], want)
        if label == "tilewise (reference)":
            fields["check"] = "is the reference"
        elif label.startswith("tilewise"):
            fields["check"] = _ulp_check(y[:k], want.to(x.dtype))
        row = make_row(**base, **fields)
    except Exception as err:
        status, where = error_status(err)
        row = make_row(**base, status=status, error_at=where)
    free_memory(x.device)
    return row


@register_suite("hadamard")
def hadamard_suite(
    *,
    numel: int | None = None,
    repeats: int | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    device: str | torch.device | None = None,
    backend: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    peers: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time the Hadamard transform of ``x [numel // n, n]`` for each ``n`` in ``sizes``: tilewise, a dense torch
    matrix product (``n <= 4096``) and each installed peer, on the same input.

    Args:
        numel: elements of the input, ``rows * n`` (default ``2**28`` on CUDA, ``2**20`` on the CPU; at least one
            row of ``n``).
        repeats: most timed calls per measurement (default 20 on CUDA, 5 on the CPU).
        sizes: transform lengths, powers of two up to 32768.
        device: where everything runs (default ``"cuda"`` when present, else ``"cpu"``).
        backend: tilewise's backend (default ``"auto"`` on CUDA, ``"reference"`` on the CPU).
        dtype: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``.
        peers: which of ``"fast_hadamard_transform"`` to run (default all).
        seed: seed of the N(0, 1) input.
    """
    dev = torch.device(device or default_device())
    on_cuda = dev.type == "cuda"
    numel = numel or (CUDA_NUMEL if on_cuda else CPU_NUMEL)
    bad = [n for n in sizes if not (isinstance(n, int) and 1 <= n <= MAX_N and n & (n - 1) == 0)]
    if bad:
        raise ValueError(f"sizes must be powers of two in [1, {MAX_N}], got {bad}")
    backend = backend or ("auto" if on_cuda else "reference")
    repeats = repeats or (CUDA_REPEATS if on_cuda else CPU_REPEATS)
    torch_dtype = resolve_dtype(dtype)
    chosen = list(PEERS) if peers is None else list(peers)
    if any(p not in PEERS for p in chosen):
        raise ValueError(f"unknown peers {chosen}; the hadamard suite knows {', '.join(PEERS)}")
    loaded = [load_peer(PEERS[p]) for p in chosen]

    gen = torch.Generator(device=dev).manual_seed(seed)
    flat = torch.randn(max(numel, max(sizes)), generator=gen, device=dev, dtype=torch_dtype)
    out = []
    for n in sizes:
        x = flat[: max(1, numel // n) * n].view(-1, n)
        out += _size_rows(x, backend, repeats, loaded)
    return out


def _size_rows(x: torch.Tensor, backend: str, repeats: int, peers: list[Any]) -> list[dict[str, Any]]:
    """The rows of one ``n``: tilewise, dense torch, then each peer."""
    rows, n = x.shape
    try:
        label = f"tilewise ({resolve_backend(backend, x)})"
    except Exception:
        label = f"tilewise ({backend})"
    out = [_run(x, label, lambda: lambda: hadamard(x, backend=backend), repeats, None)]
    if x.device.type != "cuda" and label == "tilewise (reference)":
        out[0]["note"] = "CPU run: tilewise runs its PyTorch reference; these are not GPU kernel speeds"
    dense = f"torch {torch.__version__.split('+')[0]} dense x @ H"
    if n <= DENSE_MAX_N:

        def build_dense() -> Callable[[], torch.Tensor]:
            h, y = _dense_matrix(n, x.dtype, x.device), torch.empty_like(x)
            return lambda: torch.mm(x, h, out=y)

        out.append(_run(x, dense, build_dense, repeats, 2.0 * rows * n * n))
    else:
        note = f"dense n x n matrix only for n <= {DENSE_MAX_N}"
        out.append(make_row(**_base(n, rows, dense, x, note), status="not run (n > 4096)"))
    for peer in peers:
        if peer.module is None:
            out.append(make_row(**_base(n, rows, peer.label, x), status=peer.status))
            continue
        fht = peer.module.hadamard_transform
        out.append(_run(x, peer.label, lambda fht=fht: lambda: fht(x, scale=n**-0.5), repeats, None))
    return out
