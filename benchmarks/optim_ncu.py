"""One fused AdamW step under Nsight Compute: ``ncu ... python benchmarks/optim_ncu.py --fmt q8 --dtype bf16``.

Builds ``--count`` tensors of ``--numel`` elements and takes ``--steps`` steps (profile the last with ncu's
``--launch-skip``); ``--tile T:W`` overrides the kernel's tile and warps for the format.
"""

from __future__ import annotations

import argparse

import torch

import tilewise.ops.optim_step.triton as T
from tilewise.ops.optim_step.reference import init_state

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fmt", default="q8")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tile", default=None, help="TILE:WARPS")
    args = parser.parse_args()
    if args.tile:
        T._TILE_WARPS[args.fmt] = tuple(int(v) for v in args.tile.split(":"))
        for size in (2, 4):
            T._TILE_WARPS.pop(f"{args.fmt}/{size}", None)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    params = [torch.randn(args.numel, device="cuda").to(dtype) for _ in range(args.count)]
    grads = [torch.randn_like(p) for p in params]
    states = [init_state(p, "adam", args.fmt) for p in params]
    for _ in range(args.steps):
        T.adam_step_triton(params, grads, states, **HYPER, state_format=args.fmt)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
