"""GPU check and timing of tilewise's fused optimizer step: ``python benchmarks/gpu_optim.py``.

1. Checks ``adam_step_triton`` against ``adam_step_ref`` on CUDA for every state format and fp32/bf16 parameters
   (a few tensors, ``--check-size`` elements in all, 3 steps, amsgrad): fp32 parameters within the tests' fp32
   tolerance, bf16 ones within 1 ulp, codes equal on >= 99.9% of elements, fp32 state and scales within 1e-5
   relative (1e-9 absolute floor).
2. Times one step (``triton.testing.do_bench``, median) over ``--count`` tensors of ``--numel`` elements and prints
   one table: ms, state bytes/param, GB/s of the floor (p, g, m, v read once; p, m, v written once) and % of the
   measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import triton

import tilewise.ops.optim_step.triton as T
from tilewise.ops.optim_step.reference import adam_step_ref, init_state
from tilewise.ops.optim_step.triton import adam_step_triton

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
FORMATS = ("fp32", "bf16", "q8", "q4", "fp8")
STATE_BPP = {"fp32": 8.0, "bf16": 4.0, "q8": 2 + 8 / 256, "q4": 1 + 8 / 128, "fp8": 2 + 8 / 256}


def check(n: int) -> bool:
    """Triton vs reference on CUDA; prints each failure, returns whether all passed."""
    ok = True
    sizes = [1, 255, 4099, n // 4, n // 2 + 77]
    for fmt in FORMATS:
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.randn(s, device="cuda").to(dtype) for s in sizes]
            states = [init_state(p, "adam", fmt, amsgrad=True) for p in params]
            p_ref, s_ref = copy.deepcopy(params), copy.deepcopy(states)
            for _ in range(3):
                grads = [torch.randn_like(p) for p in params]
                adam_step_triton(params, grads, states, **HYPER, amsgrad=True, state_format=fmt)
                adam_step_ref(p_ref, grads, s_ref, **HYPER, amsgrad=True, state_format=fmt)
            for i, (a, e) in enumerate(zip(params, p_ref, strict=True)):
                # fp32: the tests' fp32 tier (the update may differ by an ulp, p then by one or two); bf16: 1 ulp
                tol = 1e-5 + 1.3e-6 * e.abs() if dtype == torch.float32 else torch.finfo(dtype).eps * e.float().abs()
                bad = int(((a.float() - e.float()).abs() > tol).sum())
                if bad:
                    ok = False
                    print(f"FAIL {fmt} {dtype} param {i}: {bad} elements beyond tolerance")
            for i, (sa, se) in enumerate(zip(states, s_ref, strict=True)):
                for key, e in se.items():
                    a = sa[key]
                    if e.dtype == torch.uint8:
                        agree = (a == e).float().mean().item()
                        good = agree >= 0.999 or e.numel() < 1000
                    else:
                        # relative error with a 1e-9 floor: moments that nearly cancel differ by ulps of the inputs
                        rel = (a.float() - e.float()).abs() / (e.float().abs() + 1e-9 / 1e-5)
                        tol = 1e-5 if e.dtype == torch.float32 else 2**-7
                        if key.endswith("_scales"):
                            # a code that flipped at an earlier step (allowed on 0.1% of elements) changes that
                            # element's next moment by one code gap, and the block's absmax with it when it is the
                            # largest: so all but 0.1% of blocks (at least one) within tol, and every block within
                            # the widest relative gap below 1 of the 8-bit maps (fp8 e4m3: 3 mantissa bits, 1/8)
                            outside = int((rel > tol).sum())
                            good = outside <= max(1, rel.numel() // 1000) and rel.max().item() <= 0.125
                            agree = (outside, rel.max().item())
                        else:
                            good, agree = rel.max().item() <= tol, rel.max().item()
                    if not good:
                        ok = False
                        print(f"FAIL {fmt} {dtype} state {i} {key}: {agree}")
    print("check:", "ok" if ok else "FAILED")
    return ok


def time_step(count: int, numel: int, copy_gbps: float, formats: list[str], variants: list[str]) -> None:
    """One line per (param dtype, format, variant); a variant ``TILE:WARPS`` sets the kernel's tile (elements per
    program) and warps for that format (the module's ``_TILE_WARPS``) for that line: a sweep, to pick the defaults."""
    print(f"{'format':6} {'dtype':9} {'variant':>9} {'ms':>8} {'B/param':>8} {'GB/s':>7} {'% copy':>7}")
    default = dict(T._TILE_WARPS)
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(numel, device="cuda").to(dtype) for _ in range(count)]
        grads = [torch.randn_like(p) for p in params]
        for fmt in formats:
            states = [init_state(p, "adam", fmt) for p in params]
            for variant in variants:
                T._TILE_WARPS.clear()
                T._TILE_WARPS.update(default)
                if variant != "default":
                    T._TILE_WARPS[fmt] = tuple(int(v) for v in variant.split(":"))
                    for size in (2, 4):  # the variant applies to every parameter dtype
                        T._TILE_WARPS.pop(f"{fmt}/{size}", None)
                ms = triton.testing.do_bench(
                    lambda p=params, g=grads, s=states, f=fmt: adam_step_triton(p, g, s, **HYPER, state_format=f)
                )
                size = torch.finfo(dtype).bits // 8
                floor = count * numel * (3 * size + 2 * STATE_BPP[fmt])
                gbps = floor / ms / 1e6
                print(
                    f"{fmt:6} {str(dtype)[6:]:9} {variant:>9} {ms:8.3f} {STATE_BPP[fmt]:8.3f} {gbps:7.0f} "
                    f"{100 * gbps / copy_gbps:6.1f}%",
                    flush=True,
                )
            del states
            torch.cuda.empty_cache()
    T._TILE_WARPS.clear()
    T._TILE_WARPS.update(default)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-size", type=int, default=1 << 20, help="elements per format in the check")
    parser.add_argument("--count", type=int, default=64, help="parameter tensors in the timed step")
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements per parameter tensor")
    parser.add_argument("--formats", default="fp32,bf16,q8,q4", help="state formats to time, comma-separated")
    parser.add_argument(
        "--variants", default="default", help="kernel tile:warps variants to time, e.g. default,4096:8,2048:4"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the check against the reference")
    args = parser.parse_args()
    ok = True if args.no_check else check(args.check_size)
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src)) / 1e6
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, triton {triton.__version__}")
    src = dst = None
    torch.cuda.empty_cache()
    time_step(args.count, args.numel, copy_gbps, args.formats.split(","), args.variants.split(","))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
