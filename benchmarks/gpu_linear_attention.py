"""GPU check and timing of tilewise's chunked linear attention: ``python benchmarks/gpu_linear_attention.py``.

1. Checks the Triton kernels against the chunked PyTorch reference on CUDA at real sizes (forward, final state and
   every gradient; no gate, per-head decay, scalar gate; fp32 and bf16; packed sequences), printing the relative
   RMS error of each tensor. Exits non-zero on a failure.
2. Times forward and forward+backward at ``B=4 H=16 Dk=Dv=128`` bf16, ``T`` in {2048, 8192, 32768}
   (``triton.testing.do_bench``, median) beside torch SDPA (causal softmax attention) and fla's
   ``chunk_linear_attn`` / ``chunk_simple_gla`` when fla is installed (reported as missing otherwise), and prints
   one table: ms and % of the floor. The floor is the time to move the bytes once at the measured copy bandwidth:
   forward reads q, k, v and writes o; forward+backward also reads do and writes dq, dk, dv (8 tensors).

3. ``--sweep``: times tilewise's launch choices (``tilewise.ops.linear_attention.triton.TUNING``: the fused one-pass
   forward vs the state + output kernels, its V tile and warps, 16-bit vs fp32 chunk states, the gradient kernels'
   tile widths and warps) at the first ``--seqlens`` value, no gate and scalar gate, and prints one row per variant.

Options: ``--skip-check``, ``--skip-time``, ``--sweep``, ``--seqlens 2048 8192``, ``--no-peers``,
``--tuning KEY=VALUE ...`` (Python literals; change ``TUNING`` for the whole run, e.g.
``gated_low_precision_states=False``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from tilewise.ops import linear_attention
from tilewise.ops.linear_attention.reference import linear_attention_chunked

GATES = [None, "head", "scalar"]


def _inputs(batch, seq, heads, dk, dv, gate, dtype, n_states=None):
    q, k, v = (torch.randn(batch, seq, heads, d, device="cuda").to(dtype) for d in (dk, dk, dv))
    # L2-normalised keys, as models use them, keep the bf16 state well scaled at long T.
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    g = {
        None: None,
        "head": -torch.rand(heads, device="cuda") * 0.1,
        "scalar": torch.nn.functional.logsigmoid(torch.randn(batch, seq, heads, device="cuda") + 4.0),
        "vector": torch.nn.functional.logsigmoid(torch.randn(batch, seq, heads, dk, device="cuda") + 4.0),
    }[gate]
    h0 = torch.randn(batch if n_states is None else n_states, heads, dk, dv, device="cuda")
    return [t if t is None else t.requires_grad_() for t in (q, k, v, g, h0)]


def _run(fn, leaves, cu_seqlens):
    q, k, v, g, h0 = leaves
    o, ht = fn(q, k, v, g, h0, cu_seqlens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    loss = (o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum()
    loss = loss + (ht * torch.randn(ht.shape, device="cuda", generator=gen)).sum()
    used = [t for t in leaves if t is not None]
    return [o, ht, *torch.autograd.grad(loss, used)]


def _ours(q, k, v, g, h0, cu):
    return linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton")


def _ref(q, k, v, g, h0, cu):
    return linear_attention_chunked(q, k, v, g, None, h0, True, cu)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check() -> bool:
    """Triton vs reference for every gate and dtype, plus packed sequences; returns whether all passed."""
    dtypes = (torch.bfloat16, torch.float32)
    cases = [((2, 2048 + 17, 4, 128, 128), gate, dtype, None) for gate in GATES for dtype in dtypes]
    cu = torch.tensor([0, 1, 700, 2048, 2048, 5000], dtype=torch.int32, device="cuda")
    cases += [((1, 5000, 4, 64, 128), "scalar", torch.bfloat16, cu), ((1, 5000, 2, 256, 64), None, torch.float32, cu)]
    names = ["o", "final", "dq", "dk", "dv", "dg", "dh0"]
    ok = True
    for shape, gate, dtype, cu_seqlens in cases:
        n_states = None if cu_seqlens is None else cu_seqlens.numel() - 1
        leaves = _inputs(*shape, gate, dtype, n_states)
        got, want = _run(_ours, leaves, cu_seqlens), _run(_ref, leaves, cu_seqlens)
        # bf16: the kernels multiply in bf16 (as fla does); fp32: IEEE fp32 dots.
        bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
        present = [n for n in names if n != "dg" or gate is not None]
        errs = {n: _rel_rms(a, b) for n, a, b in zip(present, got, want, strict=True)}
        finite = all(bool(torch.isfinite(t).all()) for t in got)
        passed = finite and all(e <= bound for e in errs.values())
        ok &= passed
        desc = f"{shape} gate={gate} {str(dtype)[6:]} varlen={cu_seqlens is not None}"
        print(("ok  " if passed else "FAIL"), desc, " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    print("check:", "all cases match the reference" if ok else "FAILURES above")
    return ok


def _bench(fn, grad_to_none=None) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _peers():
    """name -> callable(q, k, v, g) -> o, or a string saying why it is missing."""
    out = {}
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        out["fla chunk_linear_attn"] = lambda q, k, v, g: chunk_linear_attn(q, k, v, normalize=False)[0]
    except Exception as e:  # a missing or broken install is reported, not fatal
        out["fla chunk_linear_attn"] = f"missing ({type(e).__name__}: {e})"
    try:
        from fla.ops.gla import chunk_gla

        out["fla chunk_gla (vector gate)"] = lambda q, k, v, g: chunk_gla(q, k, v, g=g)[0]
    except Exception as e:
        out["fla chunk_gla (vector gate)"] = f"missing ({type(e).__name__}: {e})"
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        out["fla chunk_simple_gla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g)[0]
    except Exception as e:
        out["fla chunk_simple_gla"] = f"missing ({type(e).__name__}: {e})"
    return out


def _time_pair(fn, leaves, do) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``fn(*leaves) -> o``."""
    with torch.no_grad():
        fwd = _bench(lambda: fn(*leaves))
    grads = [t for t in leaves if t is not None and t.requires_grad]

    def step():
        fn(*leaves).backward(do)

    return fwd, _bench(step, grad_to_none=grads)


def time_all(seqlens: list[int], batch: int = 4, heads: int = 16, dim: int = 128, peers: bool = True) -> None:
    dtype = torch.bfloat16
    buf = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_ms = _bench(lambda: torch.empty_like(buf).copy_(buf))
    bw = 2 * buf.numel() / copy_ms / 1e6  # GB/s: read + write
    print(f"\ncopy bandwidth {bw:.0f} GB/s; B={batch} H={heads} Dk=Dv={dim} bf16; % = floor / time")
    ours = {
        "tilewise (no gate)": (lambda q, k, v, g: _ours(q, k, v, None, None, None)[0], None),
        "tilewise (scalar gate)": (lambda q, k, v, g: _ours(q, k, v, g, None, None)[0], "scalar"),
        "tilewise reference (scalar gate)": (lambda q, k, v, g: _ref(q, k, v, g, None, None)[0], "scalar"),
        "tilewise (vector gate, GLA)": (lambda q, k, v, g: _ours(q, k, v, g, None, None)[0], "vector"),
        "tilewise reference (vector gate)": (lambda q, k, v, g: _ref(q, k, v, g, None, None)[0], "vector"),
    }
    peers = _peers() if peers else {}
    rows = [(n, fn, gate) for n, (fn, gate) in ours.items()]
    rows.append(("torch SDPA causal", lambda q, k, v, g: _sdpa(q, k, v), None))
    rows += [(n, fn, "vector" if "vector" in n else "scalar" if "gla" in n else None) for n, fn in peers.items()]
    print(f"{'T':>6} {'impl':34} {'fwd ms':>9} {'% floor':>8} {'fwd+bwd ms':>11} {'% floor':>8}")
    for seq in seqlens:
        elem = batch * seq * heads * dim * 2
        floor_fwd = 4 * elem / bw / 1e6
        floor_all = 8 * elem / bw / 1e6
        for name, fn, gate in rows:
            if isinstance(fn, str):
                print(f"{seq:>6} {name:34} {fn}")
                continue
            if "reference" in name and seq > 2048:
                print(f"{seq:>6} {name:34} skipped above T=2048 (slow)")
                continue
            leaves = _inputs(batch, seq, heads, dim, dim, gate, dtype)[:4]
            do = torch.randn(batch, seq, heads, dim, device="cuda", dtype=dtype)
            try:
                fwd, both = _time_pair(fn, leaves, do)
            except Exception as e:  # e.g. out of memory for a peer at long T: report and go on
                print(f"{seq:>6} {name:34} failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            print(
                f"{seq:>6} {name:34} {fwd:9.3f} {100 * floor_fwd / fwd:7.1f}% {both:11.3f} "
                f"{100 * floor_all / both:7.1f}%"
            )
            del leaves, do
            torch.cuda.empty_cache()


# name -> TUNING changes from the defaults; each row is timed with only its changes applied.
SWEEP = {
    "defaults": {},
    "split, fp32 states (before)": {
        "fused_fwd": False,
        "low_precision_states": False,
        "bwd_bk": 64,
        "bwd_bv": 64,
        "fused_bwd": False,
    },
    "chunk-state backward": {"fused_bwd": False},
    "chunk-state backward, w4": {"fused_bwd": False, "bwd_warps": 4},
    "fused bv64 w4 s3": {"fwd_stages": 3},
    "gated 16-bit states, bwd w4": {"gated_low_precision_states": True, "bwd_warps": 4},
    "fused bwd w8 (no gate only)": {"fused_bwd_warps": 8},
}


def sweep(seq: int, batch: int = 4, heads: int = 16, dim: int = 128) -> None:
    from tilewise.ops.linear_attention import triton as la_triton

    defaults = dict(la_triton.TUNING)
    print(f"\nsweep: B={batch} T={seq} H={heads} Dk=Dv={dim} bf16; defaults {defaults}")
    print(f"{'variant':30} {'gate':7} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for name, change in SWEEP.items():
        la_triton.TUNING.clear()
        la_triton.TUNING.update(defaults | change)
        for gate in (None, "scalar"):
            leaves = _inputs(batch, seq, heads, dim, dim, gate, torch.bfloat16)[:4]
            do = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
            try:
                fwd, both = _time_pair(lambda q, k, v, g: _ours(q, k, v, g, None, None)[0], leaves, do)
                print(f"{name:30} {gate or '-':7} {fwd:8.3f} {both:11.3f}", flush=True)
            except Exception as e:  # e.g. out of shared memory for a wide tile: report and go on
                print(f"{name:30} {gate or '-':7} failed ({type(e).__name__}: {str(e)[:90]})", flush=True)
    la_triton.TUNING.clear()
    la_triton.TUNING.update(defaults)


def _sdpa(q, k, v):
    # SDPA wants [B, H, T, D].
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--sweep", action="store_true", help="time the launch choices at the first --seqlens value")
    parser.add_argument("--no-peers", action="store_true", help="leave out fla (its autotuning takes minutes)")
    parser.add_argument("--tuning", nargs="+", default=[], metavar="KEY=VALUE", help="TUNING changes for the run")
    args = parser.parse_args()
    if args.tuning:
        import ast

        from tilewise.ops.linear_attention import triton as la_triton

        for item in args.tuning:
            key, _, value = item.partition("=")
            if key not in la_triton.TUNING:
                parser.error(f"unknown TUNING key {key!r}; known: {sorted(la_triton.TUNING)}")
            la_triton.TUNING[key] = ast.literal_eval(value)
        print("TUNING", la_triton.TUNING)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    ok = True
    if not args.skip_check:
        torch.manual_seed(42)
        ok = check()
    if args.sweep:
        sweep(args.seqlens[0])
    if not args.skip_time:
        time_all(args.seqlens, peers=not args.no_peers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
