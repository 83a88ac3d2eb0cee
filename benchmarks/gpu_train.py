"""`tilewise train` on the GPU: one table per run of tokens/s, peak memory and final bits/byte, with the memory
estimator's prediction beside the measured peak: ``python benchmarks/gpu_train.py [--steps N] [--out DIR]``.

Runs (all on the built-in corpus, bf16 autocast, as `tilewise train` does on CUDA):

- ``small`` for every optimizer of :data:`tilewise.train.trainer.OPTIMIZERS` (the issue's table);
- ``base`` with torch AdamW and 8-bit AdamW, with and without activation checkpointing (plan vs measured at a
  larger size).

The measured numbers come from the trainer's own ``{"memory": ...}`` row of ``metrics.jsonl`` (one instrumented
step: ``torch.cuda.max_memory_allocated``; weights, gradients and optimizer state counted exactly; activations =
bytes saved for backward) and its ``tokens_per_s`` rows (median after the first 10 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tilewise.train.report import read_metrics
from tilewise.train.trainer import OPTIMIZERS, TrainConfig, train

MIB = 2**20


def _run(name: str, out: Path, **kw) -> dict:
    run_dir = out / name
    t0 = time.perf_counter()
    try:
        train(TrainConfig(out=str(run_dir), device="cuda", log_every=50, **kw))
    except Exception as err:  # one failing run must not hide the others
        return {"name": name, "error": f"{type(err).__name__}: {err}"[:200]}
    rows = read_metrics(run_dir / "metrics.jsonl")
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 10]
    val = [r for r in rows if "val_bpb" in r]
    memory = [r["memory"] for r in rows if "memory" in r][-1]
    return {
        "name": name,
        "tokens_per_s": statistics.median(speed) if speed else float("nan"),
        "val_bpb": val[-1]["val_bpb"] if val else float("nan"),
        "measured": memory["measured"],
        "predicted": memory["predicted"],
        "seconds": time.perf_counter() - t0,
    }


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | error: {r['error']} |"
    m, p = r["measured"], r["predicted"] or {}
    peak = m.get("peak", m.get("total", 0))
    pred = p.get("total", 0)
    cats = " / ".join(f"{m.get(c, 0) / MIB:.0f}" for c in ("weights", "gradients", "optimizer_state", "activations"))
    pcat = " / ".join(f"{p.get(c, 0) / MIB:.0f}" for c in ("weights", "gradients", "optimizer_state", "activations"))
    ratio = f"{pred / peak:.3f}" if peak and pred else "-"
    return (
        f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['val_bpb']:.3f} | {peak / MIB:,.0f} | {pred / MIB:,.0f} | "
        f"{ratio} | {cats} | {pcat} | {r['seconds']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/gpu-train")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args()
    out = Path(args.out)
    small = {"model": "small", "steps": args.steps, "batch_size": 32, "seq_len": 256, "eval_every": args.steps}
    base = {"model": "base", "steps": 30, "batch_size": 16, "seq_len": 1024, "eval_every": 30, "save_every": 1000}
    runs = {f"small {o}": {**small, "optim": o} for o in OPTIMIZERS}
    for o in ("adamw", "adamw8bit"):
        runs[f"base {o}"] = {**base, "optim": o}
        runs[f"base {o} ckpt"] = {**base, "optim": o, "activation_checkpointing": True}
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = []
    for name, kw in runs.items():
        results.append(_run(name.replace(" ", "-"), out, **kw))
        results[-1]["name"] = name
        print(json.dumps(results[-1], default=str), flush=True)
    print()
    print(
        "| run | tokens/s | val bits/byte | measured peak MiB | predicted MiB | predicted/measured | "
        "measured W/G/O/A MiB | predicted W/G/O/A MiB | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(_line(r))


if __name__ == "__main__":
    main()
