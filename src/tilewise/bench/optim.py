"""The ``optim`` suite: one AdamW step over many parameters, tilewise's state formats beside the peers.

Every implementation steps the same parameters (``count`` tensors of ``shape``, N(0, 1), fp32 or bf16, gradients
present) and only ``opt.step()`` is timed. Each row is credited with the floor of the step: the bytes of ``p``, ``g``
and the moments read once plus ``p`` and the moments written once, in that row's state format (so GB/s is the
fraction of that format's own floor; ``state_bpp`` gives the state bytes per parameter).

Implementations: ``tilewise.optim.AdamW`` (its fused step, :func:`tilewise.ops.optim_step.adam_step`; the
functional step directly where the optimizer classes are missing) for each state format;
``torch.optim.AdamW`` with ``fused=True`` and ``foreach=True``; ``bitsandbytes.optim.AdamW8bit``;
``torchao.optim.AdamW8bit`` and ``AdamW4bit``; ``flashoptim.FlashAdamW``. Missing peers give
``"missing (pip install ...)"`` rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

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
from tilewise.ops.optim_step import adam_step, init_state

__all__ = ["DEFAULT_FORMATS", "optim_suite", "state_bytes_per_param"]

DEFAULT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "q8", "q4")
_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
_BLOCK = {"q8": 256, "fp8": 256, "q4": 128}
CUDA_COUNT, CUDA_SHAPE = 64, (4096, 4096)
CPU_COUNT, CPU_SHAPE = 4, (256, 256)
_CPU_NOTE = "CPU run: tilewise runs its PyTorch reference; these are not GPU kernel speeds"


def state_bytes_per_param(fmt: str) -> float:
    """Bytes of ``m`` and ``v`` per parameter in state format ``fmt`` (codes plus fp32 scales)."""
    if fmt in _BLOCK:
        per = 0.5 if fmt == "q4" else 1.0
        return 2 * (per + 4 / _BLOCK[fmt])
    return 8.0 if fmt == "fp32" else 4.0


def _floor_bytes(numel: int, dtype: torch.dtype, state_bpp: float) -> int:
    """p read + written, g read, the moments read + written."""
    size = torch.finfo(dtype).bits // 8
    return int(numel * (3 * size + 2 * state_bpp))


class _Functional:
    """tilewise's functional step as an optimizer: ``step()`` updates every parameter from its ``.grad``."""

    def __init__(self, params: list[torch.Tensor], fmt: str, backend: str) -> None:
        self.params, self.fmt, self.backend = params, fmt, backend
        self.states = [init_state(p, "adam", fmt) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        adam_step(self.params, grads, self.states, **_HYPER, state_format=self.fmt, backend=self.backend)


def _tilewise_optimizer(params: list[torch.Tensor], fmt: str, backend: str) -> Any:
    """``tilewise.optim.AdamW`` in state format ``fmt`` (every tensor quantized: ``min_quant_numel=0``), or the
    functional step where the optimizer classes are not there."""
    try:
        from tilewise.optim import AdamW
    except ImportError:
        return _Functional(params, fmt, backend)
    return AdamW(params, lr=1e-3, weight_decay=0.01, state_format=fmt, min_quant_numel=0, backend=backend)


def _peer_builders() -> dict[str, tuple[Peer, str, float, Callable[[Any, list], Any]]]:
    """name -> (peer, state format label, state bytes/param, build(module, params))."""
    return {
        "bitsandbytes AdamW8bit": (
            Peer("bitsandbytes", "bitsandbytes"), "q8", 2 + 8 / 256,
            lambda mod, ps: mod.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01, min_8bit_size=0),
        ),
        "torchao AdamW8bit": (
            Peer("torchao", "torchao"), "q8", 2 + 8 / 256,
            lambda mod, ps: importlib.import_module("torchao.optim").AdamW8bit(ps, lr=1e-3, weight_decay=0.01),
        ),
        "torchao AdamW4bit": (
            Peer("torchao", "torchao"), "q4", 1 + 8 / 128,
            lambda mod, ps: importlib.import_module("torchao.optim").AdamW4bit(ps, lr=1e-3, weight_decay=0.01),
        ),
        # flashoptim: 8-bit moments (2.13 B/param with its scales); by default it also keeps 8 extra bits of each
        # bf16 weight (a 24-bit master, +1 B/param) and refuses fp32 parameters in that mode (the row says so)
        "flashoptim FlashAdamW": (
            Peer("flashoptim", "flashoptim"), "q8", 2.13,
            lambda mod, ps: mod.FlashAdamW(ps, lr=1e-3, weight_decay=0.01, master_weight_bits=None),
        ),
        "flashoptim FlashAdamW (24-bit master)": (
            Peer("flashoptim", "flashoptim"), "q8", 3.13,
            lambda mod, ps: mod.FlashAdamW(ps, lr=1e-3, weight_decay=0.01),
        ),
    }  # fmt: skip


def _row(fmt: str, impl: str, params: list[torch.Tensor], build: Callable[[], Any], bpp: float,
         repeats: int) -> dict[str, Any]:  # fmt: skip
    p0 = params[0]
    numel = sum(p.numel() for p in params)
    base = {"suite": "optim", "op": "adamw step", "codebook": fmt, "impl": impl, "numel": numel,
            "dtype": str(p0.dtype).removeprefix("torch."), "device": str(p0.device),
            "device_name": device_name(p0.device), "state_bpp": bpp}  # fmt: skip
    try:
        opt = build()
        opt.step()  # state allocation and compilation happen outside the timing
        fields = measure(opt.step, p0.device, _floor_bytes(numel, p0.dtype, bpp), repeats=repeats)
        del opt
        return make_row(**base, **fields)
    except Exception as err:
        status, where = error_status(err)
        return make_row(**base, status=status, error_at=where)
    finally:
        free_memory(p0.device)


@register_suite("optim")
def optim_suite(
    *,
    count: int | None = None,
    shape: Sequence[int] | None = None,
    numel: int | None = None,
    repeats: int | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    device: str | torch.device | None = None,
    backend: str | None = None,
    peers: bool = True,
) -> list[dict[str, Any]]:
    """Time one AdamW ``step()`` over ``count`` parameters of ``shape`` (default 64 x 4096x4096 = 1.07 B on
    CUDA, 4 x 256x256 on the CPU; ``numel`` instead: 1-D tensors of that many elements, as ``tilewise bench optim
    --numel N``), for each parameter dtype: tilewise per state format, then the peers.

    Returns one row per (dtype, implementation), keys as :data:`runner.ROW_KEYS`; ``gbps``/``pct_copy`` are the
    row's floor bytes (see the module docstring) over the time; ``state_bpp`` its state bytes per parameter.
    """
    dev = torch.device(device or default_device())
    on_cuda = dev.type == "cuda"
    count = count or (CUDA_COUNT if on_cuda else CPU_COUNT)
    shape = tuple(shape or ((numel,) if numel else (CUDA_SHAPE if on_cuda else CPU_SHAPE)))
    repeats = repeats or (10 if on_cuda else 3)
    backend = backend or ("auto" if on_cuda else "reference")
    rows = []
    for name in dtypes:
        rows += _dtype_rows(dev, resolve_dtype(name), count, shape, repeats, formats, backend, peers)
        free_memory(dev)
    return rows


def _dtype_rows(dev: torch.device, dtype: torch.dtype, count: int, shape: tuple, repeats: int,
                formats: Sequence[str], backend: str, peers: bool) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one parameter dtype: tilewise per format, torch's AdamW, then the quantized peers."""
    params = [torch.randn(shape, device=dev).to(dtype).requires_grad_() for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    rows = []
    for fmt in formats:
        build = lambda fmt=fmt: _tilewise_optimizer(params, fmt, backend)  # noqa: E731
        row = _row(fmt, f"tilewise ({backend})", params, build, state_bytes_per_param(fmt), repeats)
        if dev.type == "cpu" and backend == "reference":
            row["note"] = _CPU_NOTE
        rows.append(row)
    for kw in ({"fused": True}, {"foreach": True}):
        label = f"torch AdamW({next(iter(kw))}=True)"
        build = lambda kw=kw: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)  # noqa: E731
        # torch keeps the moments in the parameters' dtype
        size = torch.finfo(dtype).bits // 8
        fmt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        rows.append(_row(fmt, label, params, build, 2.0 * size, repeats))
    for label, (peer, fmt, bpp, make) in _peer_builders().items() if peers else ():
        loaded = load_peer(peer)
        if loaded.module is None:
            rows.append(make_row(suite="optim", op="adamw step", codebook=fmt, impl=label, status=loaded.status,
                                 dtype=str(dtype).removeprefix("torch."), device=str(dev), state_bpp=bpp))  # fmt: skip
            continue
        build = lambda make=make, mod=loaded.module: make(mod, params)  # noqa: E731
        rows.append(_row(fmt, f"{label} {loaded.version}", params, build, bpp, repeats))
    return rows
