"""List what autograd saves for backward in one MetaFormer block forward, per device: shapes, dtypes and new
storage bytes in save order: ``python benchmarks/saved_tensors.py [--model small] [--device cuda]``.

Used to fit the memory estimator's per-mixer activation formulas (``tilewise.memory.estimate``) on a device whose
kernels save different tensors than the CPU's (e.g. CUDA flash attention)."""

from __future__ import annotations

import argparse

import torch

from tilewise.nn import CONFIGS, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--mixer", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=3)  # B*T unlike any weight dimension: casts stand out
    parser.add_argument("--seq", type=int, default=160)
    args = parser.parse_args()
    cfg = CONFIGS[args.model]
    if args.mixer:
        cfg = type(cfg)(**{**cfg.__dict__, "mixer": args.mixer})
    model = build_model(cfg, device=args.device)
    block = model.layers[0]
    x = torch.randn(args.batch, args.seq, cfg.dim, device=args.device, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0
    tokens = args.batch * args.seq

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        new = key not in seen and key not in params
        seen.add(key)
        nbytes = t.untyped_storage().nbytes() if new else 0
        total += nbytes
        tag = "param" if key in params else ("new" if new else "shared")
        print(f"  {tag:6} {tuple(t.shape)!s:24} {t.dtype!s:15} {nbytes:12,d} B")
        return t

    for autocast in (False, True):
        seen.clear()
        total = 0
        print(f"{args.device} {args.model} block 0, autocast bf16 = {autocast}")
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
            block(x)
        per = total / tokens
        print(f"  total {total:,d} B = {per:.1f} B/token ({per / cfg.dim:.2f} x dim), weight casts included")


if __name__ == "__main__":
    main()
