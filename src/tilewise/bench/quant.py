"""The ``quant`` suite: block-wise quantize and dequantize, tilewise beside bitsandbytes and torchao.

For each (codebook, block) -- by default int8/256, dynamic8/256, nf4/64, fp4/64 -- every implementation quantizes
the same input ``x [numel]`` (N(0, 1), bf16 by default) and dequantizes its own codes back to ``x``'s dtype. Both
ops are credited with the bytes of ANCHORS.md: ``x`` + codes + fp32 scales (read ``x``, write codes and scales;
the reverse for dequantize), the same for every implementation of a row group.

Implementations:

- tilewise: :func:`tilewise.ops.quantize_blockwise` / :func:`tilewise.ops.dequantize_blockwise` on the chosen
  backend (Triton on CUDA; the PyTorch reference on the CPU, labelled so). ``check`` compares its codes, scales
  and dequantized values bit for bit with the reference on the first ``2**20`` elements.
- bitsandbytes: ``quantize_blockwise``/``dequantize_blockwise`` (its linear map for int8, its dynamic map for
  dynamic8) and ``quantize_4bit``/``dequantize_4bit`` (nf4, fp4). Its quantize has no real ``out=`` (it copies
  into one after allocating), so it allocates as its users see; dequantize writes into a preallocated ``out=`` on
  CUDA, where its ``.out`` kernels exist.
- torchao: the 8-bit dynamic-map optimizer-state quantization of ``torchao.optim.subclass_8bit``
  (``scale_tensor`` + ``quantize_8bit_with_qmap``, ``dequant_with_qmap``) under ``torch.compile``, for dynamic8;
  and ``to_nf4`` / ``NF4Tensor.get_original_weight`` (eager, scales double-quantized) for nf4.

Every implementation reports ``rel_rms``: the relative RMS error of its round trip against ``x`` (first ``2**24``
elements), so a reader sees that the rows do comparable work.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tilewise._backend import resolve_backend
from tilewise.bench.runner import (
    LoadedPeer,
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
from tilewise.ops.blockquant import check_block_size, dequantize_blockwise, quantize_blockwise
from tilewise.quant import codebook, codebook_bits

__all__ = ["DEFAULT_BLOCKS", "DEFAULT_CODEBOOKS", "PEERS", "quant_suite"]

DEFAULT_CODEBOOKS: tuple[str, ...] = ("int8", "dynamic8", "nf4", "fp4")
DEFAULT_BLOCKS: dict[str, int] = {"int8": 256, "dynamic8": 256, "nf4": 64, "fp4": 64}
PEERS: dict[str, Peer] = {"bitsandbytes": Peer("bitsandbytes", "bitsandbytes"), "torchao": Peer("torchao", "torchao")}
# Which peers have a matching op for each codebook.
_PEER_CODEBOOKS: dict[str, tuple[str, ...]] = {
    "bitsandbytes": ("int8", "dynamic8", "nf4", "fp4"),
    "torchao": ("dynamic8", "nf4"),
}
CUDA_NUMEL, CPU_NUMEL = 1 << 28, 1 << 20
CUDA_REPEATS, CPU_REPEATS = 20, 5
_CHECK_NUMEL = 1 << 20  # elements compared bit for bit with the reference
_RMS_NUMEL = 1 << 24  # elements of the round-trip error
_CPU_NOTE = "CPU run: tilewise runs its PyTorch reference; these are not GPU kernel speeds"


@dataclass(frozen=True)
class Case:
    """One row group: ``x`` quantized with ``codebook`` in blocks of ``block``."""

    codebook: str
    block: int
    numel: int
    dtype: torch.dtype
    device: torch.device
    repeats: int

    @property
    def bits(self) -> int:
        return codebook_bits(self.codebook)

    @property
    def code_bytes(self) -> int:
        return self.numel if self.bits == 8 else (self.numel + 1) // 2

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block)

    @property
    def nbytes(self) -> int:
        """``x`` + codes + fp32 scales: what quantize reads and writes, and dequantize writes and reads."""
        return self.numel * self.dtype.itemsize + self.code_bytes + 4 * self.n_blocks


@dataclass(frozen=True)
class Impl:
    """How one library runs a case: ``quantize(x) -> state``, ``dequantizer(state) -> (() -> y)`` (the returned
    call is timed, so it holds any preallocated output), and optional bit-exactness checks for the table."""

    label: str
    quantize: Callable[[torch.Tensor], Any]
    dequantizer: Callable[[Any], Callable[[], torch.Tensor]]
    check_quantize: Callable[[Any], str] | None = None
    check_dequantize: Callable[[Any, torch.Tensor], str] | None = None
    note: str | None = None


def _resolve_blocks(codebooks: Sequence[str], block_sizes: int | Mapping[str, int] | None) -> dict[str, int]:
    """Block size per codebook: ``block_sizes`` (one int for all, or per name), else the defaults (256 for 8-bit
    codebooks, 64 for 4-bit ones)."""
    blocks = {}
    for name in codebooks:
        bits = codebook_bits(name)  # ValueError for an unknown name
        if isinstance(block_sizes, int):
            block = block_sizes
        elif block_sizes is not None and name in block_sizes:
            block = block_sizes[name]
        else:
            block = DEFAULT_BLOCKS.get(name, 256 if bits == 8 else 64)
        check_block_size(block)
        blocks[name] = block
    return blocks


def _check_slice(case: Case) -> int:
    """Elements compared with the reference: all of a small input, else the first ``2**20`` (whole blocks)."""
    return case.numel if case.numel <= _CHECK_NUMEL else _CHECK_NUMEL - _CHECK_NUMEL % case.block


def _differ(actual: torch.Tensor, expected: torch.Tensor) -> int:
    return int(torch.ne(actual.reshape(-1), expected.reshape(-1).to(actual.device)).sum())


def _ours(case: Case, backend: str, x: torch.Tensor, check_finite: bool = True) -> Impl:
    """tilewise's raw ops on ``backend``, with bit-exact checks against the reference on a leading slice.
    ``check_finite=False`` times quantize without its NaN/inf check (which syncs the device on every call)."""
    chosen = resolve_backend(backend, x)
    code = codebook(case.codebook).to(case.device)
    m = _check_slice(case)
    m_codes, m_scales = (m if case.bits == 8 else (m + 1) // 2), -(-m // case.block)

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_blockwise(x, code, case.block, bits=case.bits, check_finite=check_finite, backend=backend)

    def dequantizer(state: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], torch.Tensor]:
        codes, scales = state
        args = (codes, scales, code, case.block, case.numel)
        return lambda: dequantize_blockwise(*args, bits=case.bits, dtype=case.dtype, backend=backend)

    def check_quantize(state: tuple[torch.Tensor, torch.Tensor]) -> str:
        want_codes, want_scales = quantize_blockwise(x[:m], code, case.block, bits=case.bits, backend="reference")
        bad_codes = _differ(state[0][:m_codes], want_codes)
        bad_scales = _differ(state[1][:m_scales], want_scales)
        if bad_codes == bad_scales == 0:
            return f"exact ({count_label(m)} el.)"
        return f"MISMATCH: {bad_codes}/{m_codes} code bytes, {bad_scales}/{m_scales} scales"

    def check_dequantize(state: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> str:
        codes, scales = state[0][:m_codes], state[1][:m_scales]
        want = dequantize_blockwise(
            codes, scales, code, case.block, m, bits=case.bits, dtype=case.dtype, backend="reference"
        )
        bad = _differ(y[:m], want)
        return f"exact ({count_label(m)} el.)" if bad == 0 else f"MISMATCH: {bad}/{m} values"

    if chosen == "reference":
        spec = "is the reference"
        return Impl("tilewise (reference)", quantize, dequantizer, lambda s: spec, lambda s, y: spec)
    label = f"tilewise ({chosen})" if check_finite else f"tilewise ({chosen}, check_finite=False)"
    return Impl(label, quantize, dequantizer, check_quantize, check_dequantize)


def _bitsandbytes(case: Case, peer: LoadedPeer) -> Impl:
    """bitsandbytes.functional's public calls; ``out=`` for dequantize on CUDA (its ``.out`` kernels)."""
    fn = importlib.import_module("bitsandbytes.functional")
    on_cuda = case.device.type == "cuda"
    out = torch.empty(case.numel, dtype=case.dtype, device=case.device) if on_cuda else None
    if case.bits == 8:
        maps = {"int8": "create_linear_map", "dynamic8": "create_dynamic_map"}
        code = getattr(fn, maps[case.codebook])(signed=True).to(device=case.device, dtype=torch.float32)

        def quantize(x: torch.Tensor) -> Any:
            return fn.quantize_blockwise(x, code=code, blocksize=case.block)

        def dequantizer(state: Any) -> Callable[[], torch.Tensor]:
            codes, qstate = state
            return lambda: fn.dequantize_blockwise(codes, quant_state=qstate, out=out)

        note = "bitsandbytes int8 row: its linear map (create_linear_map), same kernel as its dynamic map"
        return Impl(peer.label, quantize, dequantizer, note=note if case.codebook == "int8" else None)

    def quantize4(x: torch.Tensor) -> Any:
        return fn.quantize_4bit(x, blocksize=case.block, quant_type=case.codebook)

    def dequantizer4(state: Any) -> Callable[[], torch.Tensor]:
        packed, qstate = state
        return lambda: fn.dequantize_4bit(packed, quant_state=qstate, out=out)

    note = "bitsandbytes fp4 is its own e2m1 variant (max 12, subnormal 0.0625)" if case.codebook == "fp4" else None
    return Impl(peer.label, quantize4, dequantizer4, note=note)


def _torchao(case: Case, peer: LoadedPeer) -> Impl:
    """torchao's compiled 8-bit optimizer-state quantization (dynamic8) or its eager NF4 tensor (nf4)."""
    if case.codebook == "nf4":
        to_nf4 = _torchao_to_nf4()

        def quantize(x: torch.Tensor) -> Any:
            return to_nf4(x, case.block, 256)

        note = "torchao nf4 (to_nf4) double-quantizes its scales and runs eagerly"
        return Impl(peer.label, quantize, lambda t: t.get_original_weight, note=note)
    s8 = importlib.import_module("torchao.optim.subclass_8bit")
    qmap_list = s8.get_qmap_signed() if hasattr(s8, "get_qmap_signed") else s8.create_dynamic_map(signed=True)
    qmap = torch.tensor(qmap_list, dtype=torch.float32, device=case.device)
    block, dtype = case.block, case.dtype

    def quantize8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the optimizer quantizes fp32 state; the cast fuses into the compiled kernel
        scaled, scale = s8.scale_tensor(x.float(), block)
        return s8.quantize_8bit_with_qmap(scaled, qmap), scale

    def dequantize8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return s8.dequant_with_qmap(codes, qmap, scale).to(dtype)

    compiled_q = torch.compile(quantize8, dynamic=False)
    compiled_d = torch.compile(dequantize8, dynamic=False)
    label = f"{peer.label} (compiled)"
    return Impl(label, compiled_q, lambda state: lambda: compiled_d(*state))


def _torchao_to_nf4() -> Callable[..., Any]:
    """``to_nf4``: ``torchao.dtypes.nf4tensor`` before 0.15-ish, ``torchao.quantization`` since."""
    for module in ("torchao.dtypes.nf4tensor", "torchao.quantization"):
        try:
            return importlib.import_module(module).to_nf4
        except (ImportError, AttributeError):
            continue
    raise ImportError("torchao has no to_nf4 in torchao.dtypes.nf4tensor nor torchao.quantization")


_PEER_BUILDERS: dict[str, Callable[[Case, LoadedPeer], Impl]] = {"bitsandbytes": _bitsandbytes, "torchao": _torchao}


def _base(case: Case, op: str, impl: str, note: str | None) -> dict[str, Any]:
    return {
        "suite": "quant",
        "op": op,
        "codebook": case.codebook,
        "block": case.block,
        "impl": impl,
        "numel": case.numel,
        "dtype": str(case.dtype).removeprefix("torch."),
        "device": str(case.device),
        "device_name": device_name(case.device),
        "note": note,
    }


def _error_row(case: Case, op: str, impl: str, err: BaseException, note: str | None = None) -> dict[str, Any]:
    status, where = error_status(err)
    return make_row(**_base(case, op, impl, note), status=status, error_at=where)


def _run_impl(case: Case, x: torch.Tensor, build: Callable[[], Impl], label: str) -> list[dict[str, Any]]:
    """The quantize and dequantize rows of one implementation; any exception becomes an error row."""
    try:
        impl = build()
    except Exception as err:
        return [_error_row(case, op, label, err) for op in ("quantize", "dequantize")]
    rows = []
    try:
        q = measure(lambda: impl.quantize(x), case.device, case.nbytes, repeats=case.repeats)
        state = impl.quantize(x)
        q["check"] = impl.check_quantize(state) if impl.check_quantize else None
    except Exception as err:
        free_memory(case.device)
        not_run = make_row(**_base(case, "dequantize", impl.label, impl.note), status="not run (quantize failed)")
        return [_error_row(case, "quantize", impl.label, err, impl.note), not_run]
    try:
        dequantize = impl.dequantizer(state)
        d = measure(dequantize, case.device, case.nbytes, repeats=case.repeats)
        y = dequantize()
        d["check"] = impl.check_dequantize(state, y) if impl.check_dequantize else None
        k = min(case.numel, _RMS_NUMEL)
        q["rel_rms"] = d["rel_rms"] = rel_rms(y.reshape(-1)[:k], x[:k])
        rows = [make_row(**_base(case, "quantize", impl.label, impl.note), **q)]
        rows.append(make_row(**_base(case, "dequantize", impl.label, impl.note), **d))
    except Exception as err:
        rows = [make_row(**_base(case, "quantize", impl.label, impl.note), **q)]
        rows.append(_error_row(case, "dequantize", impl.label, err, impl.note))
    del state
    free_memory(case.device)
    return rows


def _peer_rows(case: Case, x: torch.Tensor, name: str, peer: LoadedPeer) -> list[dict[str, Any]]:
    if peer.module is None:
        return [make_row(**_base(case, op, peer.label, None), status=peer.status) for op in ("quantize", "dequantize")]
    return _run_impl(case, x, lambda: _PEER_BUILDERS[name](case, peer), peer.label)


@register_suite("quant")
def quant_suite(
    *,
    numel: int | None = None,
    repeats: int | None = None,
    codebooks: Sequence[str] = DEFAULT_CODEBOOKS,
    block_sizes: int | Mapping[str, int] | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    peers: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time block-wise quantize and dequantize: tilewise and each installed peer on the same input.

    Args:
        numel: elements of the input (default ``2**28`` = 256 M on CUDA, ``2**20`` on the CPU).
        repeats: most timed calls per measurement, median reported (default 20 on CUDA, 5 on the CPU).
        codebooks: tilewise codebook names (default int8, dynamic8, nf4, fp4).
        block_sizes: one block size for all codebooks, or a ``{codebook: block}`` map (default 256 for 8-bit
            codebooks, 64 for 4-bit ones).
        device: where everything runs (default ``"cuda"`` when present, else ``"cpu"``).
        backend: tilewise's backend (default ``"auto"`` on CUDA, ``"reference"`` on the CPU).
        dtype: the input's dtype, ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``.
        peers: which of ``"bitsandbytes"``, ``"torchao"`` to run (default both); missing ones give
            ``"missing (pip install ...)"`` rows.
        seed: seed of the N(0, 1) input.

    Returns:
        Two rows (quantize, dequantize) per (codebook, implementation), keys as :data:`runner.ROW_KEYS`.
    """
    dev = torch.device(device or default_device())
    on_cuda = dev.type == "cuda"
    numel = numel or (CUDA_NUMEL if on_cuda else CPU_NUMEL)
    if numel < 1:
        raise ValueError(f"numel must be at least 1, got {numel}")
    backend = backend or ("auto" if on_cuda else "reference")
    blocks = _resolve_blocks(codebooks, block_sizes)
    torch_dtype = resolve_dtype(dtype)
    chosen = list(PEERS) if peers is None else list(peers)
    unknown = [p for p in chosen if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; the quant suite knows {', '.join(PEERS)}")
    loaded = {name: load_peer(PEERS[name]) for name in chosen}
    repeats = repeats or (CUDA_REPEATS if on_cuda else CPU_REPEATS)

    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(numel, generator=gen, device=dev, dtype=torch_dtype)
    rows = []
    for name, block in blocks.items():
        case = Case(name, block, numel, torch_dtype, dev, repeats)
        ours = _run_impl(case, x, lambda case=case: _ours(case, backend, x), f"tilewise ({backend})")
        if not on_cuda:
            for row in ours:
                row["note"] = row["note"] or (_CPU_NOTE if backend == "reference" else None)
        rows += ours
        if on_cuda and resolve_backend(backend, x) == "triton":
            label = f"tilewise ({backend}, check_finite=False)"
            rows += _run_impl(case, x, lambda case=case: _ours(case, backend, x, check_finite=False), label)
        for peer_name, peer in loaded.items():
            if name in _PEER_CODEBOOKS[peer_name]:
                rows += _peer_rows(case, x, peer_name, peer)
    return _order(rows)


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quantize rows of all codebooks first, then dequantize rows, each in run order: the table reads as two
    blocks, one per op."""
    return [r for r in rows if r["op"] == "quantize"] + [r for r in rows if r["op"] == "dequantize"]
