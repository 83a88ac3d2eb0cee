"""The ``mixers`` suite: sequence mixers (attention-like ops and the long FFT convolution), forward and backward.

For each sequence length ``T`` (default 2048, 8192, 32768 on CUDA at ``B=4, H=16, D=128`` bf16; 128 and 256 at
``B=1, H=2, D=32`` on the CPU) every implementation runs on the same inputs, twice: op ``"fwd"`` (the forward
alone, under ``torch.no_grad``) and op ``"fwd+bwd"`` (forward, then ``torch.autograd.grad`` of the output against
a fixed ``do``). ``n`` is ``T``; ``numel`` is the elements of one input (``B*H*T*D``, or ``B*C*T`` for the conv).

Implementations, attention-like (``q, k, v [B, H, T, D]``, or ``[B, T, H, D]`` where the op takes that layout):

- tilewise :func:`tilewise.ops.linear_attention` with ``g=None``, with a scalar gate ``g [B, T, H]`` and with a
  vector gate ``g [B, T, H, D]`` (GLA);
- tilewise :func:`tilewise.ops.block_sparse_attention` with a fixed seeded block mask keeping about 10% of the
  causal blocks (always the diagonal and the first key block; ``check`` gives the kept fraction);
- torch SDPA, causal (dense: the baseline the sparse and linear ops must beat);
- FlexAttention with the same block mask (``create_block_mask``; ``torch.compile``-d on CUDA, eager on the CPU,
  where its backward does not run: such rows say ``"skipped on CPU"``);
- fla's ``chunk_linear_attn``, ``chunk_simple_gla`` and ``chunk_gla`` when ``fla`` imports (else ``"missing (pip
  install ...)"``).

The long convolution (``u [B, C, T]``, ``k [C, T]``, ``C = 768`` on CUDA, 16 on the CPU; ``T <= 65536``):
tilewise :func:`tilewise.ops.fft_conv` (its Triton kernel on CUDA where ``T <= MAX_TRITON_N``) beside the
``torch.fft`` reference :func:`tilewise.ops.fft_conv.reference.fft_conv_ref`.

Bytes (the same for every implementation of a group; GB/s and % of copy are against that floor): attention-like
``fwd`` q, k, v read + o written; ``fwd+bwd`` adds do read and dq, dk, dv written. Conv ``fwd`` u, k read + y
written; ``fwd+bwd`` adds dy read and du, dk written. A length whose tensors do not fit gives error rows
(``torch.cuda.OutOfMemoryError`` is caught like any error).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tilewise._backend import resolve_backend
from tilewise.bench.runner import (
    Peer,
    default_device,
    device_name,
    error_status,
    free_memory,
    load_peer,
    make_row,
    measure,
    register_suite,
    resolve_dtype,
)
from tilewise.ops.block_sparse_attention import block_sparse_attention
from tilewise.ops.fft_conv import AUTO_TRITON_MIN_N, MAX_TRITON_N, fft_conv
from tilewise.ops.fft_conv.reference import fft_conv_ref
from tilewise.ops.linear_attention import linear_attention

__all__ = ["CONV_MAX_T", "CPU_SEQLENS", "CUDA_SEQLENS", "PEERS", "keep_mask", "mixers_suite"]

CUDA_SEQLENS: tuple[int, ...] = (2048, 8192, 32768)
CPU_SEQLENS: tuple[int, ...] = (128, 256)
CUDA_SHAPE, CPU_SHAPE = (4, 16, 128), (1, 2, 32)  # B, H, D
CUDA_CONV_CHANNELS, CPU_CONV_CHANNELS = 768, 16
CUDA_BLOCK, CPU_BLOCK = 128, 32  # block_sparse_attention / FlexAttention block size
CUDA_REPEATS, CPU_REPEATS = 10, 3
CONV_MAX_T = 65536
KEEP_FRACTION = 0.1
PEERS: dict[str, Peer] = {"fla": Peer("fla", "flash-linear-attention")}
OPS = ("fwd", "fwd+bwd")
_CPU_NOTE = "CPU run: tilewise runs its PyTorch reference at tiny sizes; these are not GPU kernel speeds"


def keep_mask(t: int, block: int, fraction: float = KEEP_FRACTION, seed: int = 0) -> torch.Tensor:
    """A fixed bool ``[NB, NB]`` block mask (``NB = ceil(t / block)``) keeping about ``fraction`` of the causal
    blocks: every diagonal block, every block of the first key block column, and a seeded random choice of the
    rest (CPU generator, so the mask is the same on every machine)."""
    nb = -(-t // block)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    must = torch.eye(nb, dtype=torch.bool)
    must[:, 0] = True
    n_causal, n_must = nb * (nb + 1) // 2, int(must.sum())
    p = max(0.0, fraction * n_causal - n_must) / max(1, n_causal - n_must)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.rand(nb, nb, generator=gen) < p
    return (must | rand) & causal


def _kept_fraction(mask: torch.Tensor) -> float:
    nb = mask.shape[-1]
    return float(mask.sum()) / (nb * (nb + 1) // 2)


def _timed_call(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], op: str,
                grad_out: torch.Tensor) -> Callable[[], Any]:  # fmt: skip
    """The call to time: ``fn(*inputs)`` on detached inputs without autograd (``"fwd"``), or forward then the
    input gradients (``"fwd+bwd"``)."""
    if op == "fwd":
        detached = [x.detach() for x in inputs]

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(*detached)

        return forward

    def forward_backward() -> tuple[torch.Tensor, ...]:
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, grad_out)

    return forward_backward


class _Group:
    """The shared fields of one (T, family) row group and the call that turns one impl into a row."""

    def __init__(self, base: dict[str, Any], nbytes: dict[str, int], repeats: int, device: torch.device) -> None:
        self.base, self.nbytes, self.repeats, self.device = base, nbytes, repeats, device

    def row(self, op: str, impl: str, make: Callable[[], Callable[[], Any]], *, check: str | None = None,
            note: str | None = None, cpu_skip: bool = False) -> dict[str, Any]:  # fmt: skip
        fields = {**self.base, "op": op, "impl": impl, "check": check, "note": note}
        try:
            call = make()
            fields.update(measure(call, self.device, self.nbytes[op], repeats=self.repeats))
            return make_row(**fields)
        except Exception as err:
            status, where = error_status(err)
            if cpu_skip and self.device.type == "cpu":
                status, where = "skipped on CPU", f"{status.removeprefix('error: ')} ({where})"
            return make_row(**fields, status=status, error_at=where)
        finally:
            free_memory(self.device)

    def missing(self, op: str, impl: str, status: str) -> dict[str, Any]:
        return make_row(**{**self.base, "op": op, "impl": impl, "status": status})


def _attention_rows(dev: torch.device, dtype: torch.dtype, t: int, shape: tuple[int, int, int], block: int,
                    backend: str, repeats: int, peers: Sequence[str], seed: int) -> list[dict[str, Any]]:  # fmt: skip
    b, h, d = shape
    size = dtype.itemsize
    numel = b * h * t * d
    base = {"suite": "mixers", "n": t, "numel": numel, "dtype": str(dtype).removeprefix("torch."),
            "device": str(dev), "device_name": device_name(dev)}  # fmt: skip
    group = _Group(base, {"fwd": 4 * numel * size, "fwd+bwd": 8 * numel * size}, repeats, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    # [B, H, T, D] for the softmax ops, [B, T, H, D] (contiguous copies) for the linear ones
    q, k, v, do = (torch.randn(b, h, t, d, device=dev, generator=gen, dtype=dtype) for _ in range(4))
    q_t, k_t, v_t, do_t = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
    g = F.logsigmoid(4 + torch.randn(b, t, h, device=dev, generator=gen))  # scalar gate, decay ~0.98
    gv = F.logsigmoid(4 + torch.randn(b, t, h, d, device=dev, generator=gen))  # vector gate, the same per key dim
    for x in (q, k, v, q_t, k_t, v_t):
        x.requires_grad_()
    mask = keep_mask(t, block, seed=seed).to(dev)
    kept = f"kept {100 * _kept_fraction(mask):.1f}% of causal blocks ({block}-token)"
    la_backend = resolve_backend(backend, q_t)
    bs_backend = resolve_backend(backend, q)
    cpu_note = _CPU_NOTE if dev.type == "cpu" else None

    def linear(gate: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        return lambda q, k, v: linear_attention(q, k, v, gate, backend=backend)[0]

    def sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q, k, v, mask[None, None], block_size=block, backend=backend)

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def flex() -> Callable[..., torch.Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(bi: Any, hi: Any, qi: Any, ki: Any) -> Any:
            return (qi >= ki) & mask[qi // block, ki // block]

        bm = create_block_mask(mask_mod, None, None, t, t, device=str(dev), BLOCK_SIZE=block)
        if dev.type == "cuda":
            compiled = torch.compile(flex_attention, dynamic=False)
            return lambda q, k, v: compiled(q, k, v, block_mask=bm)

        def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():  # "called without torch.compile()": the row label says eager
                warnings.simplefilter("ignore", UserWarning)
                return flex_attention(q, k, v, block_mask=bm)

        return eager

    rows = []
    for op in OPS:

        def timed(fn: Callable[..., torch.Tensor], layout: str, op: str = op) -> Callable[[], Callable[[], Any]]:
            ins, grad = ((q_t, k_t, v_t), do_t) if layout == "bthd" else ((q, k, v), do)
            return lambda: _timed_call(fn, ins, op, grad)

        rows.append(group.row(op, f"tilewise linear_attention g=None ({la_backend})", timed(linear(None), "bthd"),
                              note=cpu_note))  # fmt: skip
        rows.append(group.row(op, f"tilewise linear_attention g=[B,T,H] ({la_backend})", timed(linear(g), "bthd"),
                              note=cpu_note))  # fmt: skip
        rows.append(group.row(op, f"tilewise linear_attention g=[B,T,H,D] ({la_backend})", timed(linear(gv), "bthd"),
                              note=cpu_note))  # fmt: skip
        rows.append(group.row(op, f"tilewise block_sparse_attention ({bs_backend})", timed(sparse, "bhtd"),
                              check=kept, note=cpu_note))  # fmt: skip
        rows.append(group.row(op, "torch SDPA causal", timed(sdpa, "bhtd"), check="dense causal"))
        label = "torch flex_attention" + (" (compiled)" if dev.type == "cuda" else " (eager)")
        rows.append(group.row(op, label, lambda op=op: _timed_call(flex(), (q, k, v), op, do), check=kept,
                              cpu_skip=True))  # fmt: skip
        if "fla" in peers:
            rows += _fla_rows(group, op, (q_t, k_t, v_t), do_t, g, gv)
    return rows


def _fla_rows(group: _Group, op: str, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor, g: torch.Tensor,
              gv: torch.Tensor) -> list[dict[str, Any]]:  # fmt: skip
    """fla's chunked linear attention (unnormalized, as ours), simple GLA (scalar gate ``g``) and GLA (vector gate
    ``gv``), ``[B, T, H, D]``."""
    loaded = load_peer(PEERS["fla"])
    names = ("fla chunk_linear_attn", "fla chunk_simple_gla", "fla chunk_gla")
    if loaded.module is None:
        return [group.missing(op, name, loaded.status) for name in names]
    version = f" {loaded.version}" if loaded.version else ""

    def linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chunk = importlib.import_module("fla.ops.linear_attn").chunk_linear_attn
        return chunk(q, k, v, normalize=False)[0]

    def simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chunk = importlib.import_module("fla.ops.simple_gla").chunk_simple_gla
        return chunk(q, k, v, g=g)[0]

    def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chunk = importlib.import_module("fla.ops.gla").chunk_gla
        return chunk(q, k, v, g=gv)[0]

    return [
        group.row(op, name + version, lambda fn=fn: _timed_call(fn, inputs, op, grad))
        for name, fn in zip(names, (linear_attn, simple_gla, gla), strict=True)
    ]


def _conv_rows(dev: torch.device, dtype: torch.dtype, t: int, batch: int, channels: int, backend: str,
               repeats: int, seed: int) -> list[dict[str, Any]]:  # fmt: skip
    size = dtype.itemsize
    numel = batch * channels * t
    base = {"suite": "mixers", "n": t, "numel": numel, "dtype": str(dtype).removeprefix("torch."),
            "device": str(dev), "device_name": device_name(dev)}  # fmt: skip
    fwd = (2 * numel + channels * t) * size  # u, k read + y written
    group = _Group(base, {"fwd": fwd, "fwd+bwd": fwd + (2 * numel + channels * t) * size}, repeats, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    u = torch.randn(batch, channels, t, device=dev, generator=gen, dtype=dtype).requires_grad_()
    k = (torch.randn(channels, t, device=dev, generator=gen, dtype=dtype) / t**0.5).requires_grad_()
    dy = torch.randn(batch, channels, t, device=dev, generator=gen, dtype=dtype)
    ours = backend
    chosen = resolve_backend(ours, u)
    if chosen == "triton" and not AUTO_TRITON_MIN_N <= t <= MAX_TRITON_N and ours != "triton":
        chosen = "reference"  # what fft_conv's auto runs there with a gradient: torch.fft (README.md of fft_conv)
    note = _CPU_NOTE if dev.type == "cpu" else None
    rows = []
    for op in OPS:
        rows.append(group.row(op, f"tilewise fft_conv ({chosen})",
                              lambda op=op: _timed_call(lambda u, k: fft_conv(u, k, backend=ours), (u, k), op, dy),
                              note=note))  # fmt: skip
        rows.append(group.row(op, "torch.fft reference conv", lambda op=op: _timed_call(fft_conv_ref, (u, k), op, dy)))
    return rows


@register_suite("mixers")
def mixers_suite(
    *,
    seqlens: Sequence[int] | None = None,
    batch: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    conv_channels: int | None = None,
    block_size: int | None = None,
    repeats: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    peers: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time the sequence mixers at each ``T`` in ``seqlens``, forward and forward + backward (see the module
    docstring); defaults: CUDA ``T`` 2048/8192/32768 at ``B=4, H=16, D=128``, conv channels 768, blocks of 128;
    CPU ``T`` 128/256 at ``B=1, H=2, D=32``, conv channels 16, blocks of 32.

    Returns one row per (T, implementation, op), keys as :data:`runner.ROW_KEYS`; ``n`` is ``T``.
    """
    dev = torch.device(device or default_device())
    on_cuda = dev.type == "cuda"
    b0, h0, d0 = CUDA_SHAPE if on_cuda else CPU_SHAPE
    shape = (batch or b0, heads or h0, head_dim or d0)
    channels = conv_channels or (CUDA_CONV_CHANNELS if on_cuda else CPU_CONV_CHANNELS)
    block = block_size or (CUDA_BLOCK if on_cuda else CPU_BLOCK)
    repeats = repeats or (CUDA_REPEATS if on_cuda else CPU_REPEATS)
    backend = backend or "auto"
    peers = tuple(PEERS if peers is None else peers)
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {sorted(PEERS)}")
    torch_dtype = resolve_dtype(dtype)
    rows: list[dict[str, Any]] = []
    for t in seqlens or (CUDA_SEQLENS if on_cuda else CPU_SEQLENS):
        for family, build in (
            ("attention", lambda t=t: _attention_rows(dev, torch_dtype, t, shape, block, backend, repeats, peers,
                                                      seed)),
            ("fft_conv", lambda t=t: _conv_rows(dev, torch_dtype, t, shape[0], channels, backend, repeats, seed)),
        ):  # fmt: skip
            if family == "fft_conv" and t > CONV_MAX_T:
                continue
            try:
                rows += build()
            except Exception as err:  # the inputs did not fit (OOM) or could not be made: one row says so
                status, where = error_status(err)
                rows.append(make_row(suite="mixers", op="inputs", impl=family, n=t, status=status, error_at=where,
                                     dtype=str(torch_dtype).removeprefix("torch."), device=str(dev)))  # fmt: skip
            free_memory(dev)
    return rows
