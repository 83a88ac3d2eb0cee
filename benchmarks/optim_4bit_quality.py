"""How 4-bit AdamW state loses quality, and what storing the second moment differently buys (CPU, reference math).

AdamW in fp32 math (the op order of ``ops/optim_step/reference.py``) with each moment kept in a pluggable store:

- ``fp32``: as it is;
- ``block``: the q4 format: ``dynamic4`` (m) / ``ulinear4`` (v) codes, absmax per block of 128, nearest rounding
  (``ops/blockquant``), as ``tilewise.optim.AdamW(state_bits=4)`` stores it;
- ``sqrt-block``: ``sqrt(v)`` on ``ulinear4`` per block of 128, squared when read: ulinear4's smallest level is 1/16
  of the block's absmax, so ``v`` itself floors at ``absmax / 16`` and ``sqrt(v)`` at ``absmax / 256`` (in v);
- ``rank1`` / ``sqrt-rank1``: the same codebook with the rank-1 normalization of Li et al. 2023 ("Memory Efficient
  Optimizers with 4-bit States"): a 2-D moment is divided by ``min(row absmax, column absmax)`` per element instead
  of a block absmax (1-D moments fall back to blocks of 128).

Tensors under 4096 elements keep fp32 state (the optimizers' ``min_quant_numel``). A ``tilewise q4`` row runs
``tilewise.optim.AdamW(state_bits=4)`` itself: it must equal the ``m block, v block`` row (checks this harness).
Problems: noisy linear regression with anisotropic features (excess test MSE over the noise floor), a noisy
two-layer teacher-student regression (test MSE), and the tests' next-character MLP on ``os.py`` (held-out
cross-entropy). Each is run over a few seeds; the table gives the mean and the ratio to fp32 state.

Run: PYTHONPATH=src python benchmarks/optim_4bit_quality.py [--seeds 3] [--steps-scale 1.0]

Measured (CPU, torch 2.13, default steps; linear regression over 6 seeds, char MLP over 5): excess test MSE of the
linear regression, fp32 state 0.0090; q4 0.0207 (2.29x; total MSE +4.5%); sqrt-block 0.0137 (1.52x); rank1 0.0131
(1.45x); sqrt-rank1 0.0128 (1.42x); m fp32 + v block 0.0147; m block + v fp32 0.0114 (both moments cost, v more).
The paired per-seed differences have standard errors of 1e-4, so the order is firm. Char MLP held-out CE: every
variant within 2.018-2.033 against fp32's 2.032 (seed spread 0.03-0.05: no difference resolved); the 2-seed
teacher-student MLP likewise (0.0257-0.0270 against 0.0267).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable

import torch

import tilewise.optim as to
from tilewise.ops.blockquant import dequantize_blockwise, quantize_blockwise
from tilewise.quant.codebooks import codebook

BLOCK, MIN_QUANT_NUMEL = 128, 4096


class Store:
    """One moment buffer in fp32 (``kind="fp32"``) or 4-bit codes: ``block`` / ``rank1`` normalization, of ``v``
    itself or of ``sqrt(v)`` (``sqrt=True``, non-negative moments only)."""

    def __init__(self, like: torch.Tensor, kind: str, signed: bool, sqrt: bool = False) -> None:
        self.shape, self.kind, self.sqrt = like.shape, kind, sqrt
        self.code = codebook("dynamic4" if signed else "ulinear4")
        if kind == "rank1" and like.ndim != 2:
            self.kind = "block"
        self.value = torch.zeros_like(like, dtype=torch.float32)  # fp32 only; else the dequantized codes' stand-in
        self.packed: tuple | None = None

    def load(self) -> torch.Tensor:
        if self.kind == "fp32" or self.packed is None:
            return self.value.clone()
        if self.kind == "block":
            codes, scales = self.packed
            x = dequantize_blockwise(codes, scales, self.code, BLOCK, self.value.numel(), bits=4, backend="reference")
            x = x.view(self.shape)
        else:
            idx, rows, cols = self.packed
            x = self.code[idx.long()] * torch.minimum(rows[:, None], cols[None, :])
        return x.square() if self.sqrt else x

    def store(self, x: torch.Tensor) -> None:
        if self.kind == "fp32":
            self.value.copy_(x)
            return
        x = x.sqrt() if self.sqrt else x
        if self.kind == "block":
            self.packed = quantize_blockwise(x, self.code, BLOCK, bits=4, check_finite=False, backend="reference")
            return
        rows, cols = x.amax(dim=1), x.amax(dim=0)
        norm = torch.minimum(rows[:, None], cols[None, :])
        scaled = torch.where(norm > 0, x / norm, torch.zeros_like(x))  # in [0, 1]: x_ij <= both maxima
        mids = (self.code[1:] + self.code[:-1]) / 2
        self.packed = (torch.searchsorted(mids, scaled.contiguous()).to(torch.uint8), rows, cols)


class QAdamW(torch.optim.Optimizer):
    """AdamW (decoupled decay, bias correction) on :class:`Store` moments: ``m_kind`` for m, ``v_kind`` and
    ``v_sqrt`` for v."""

    def __init__(self, params, lr: float, weight_decay: float, m_kind: str, v_kind: str, v_sqrt: bool) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": (0.9, 0.999), "eps": 1e-8})
        self.kinds = (m_kind, v_kind, v_sqrt)

    @torch.no_grad()
    def step(self) -> None:
        m_kind, v_kind, v_sqrt = self.kinds
        for group in self.param_groups:
            (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    small = p.numel() < MIN_QUANT_NUMEL
                    st["m"] = Store(p, "fp32" if small else m_kind, signed=True)
                    st["v"] = Store(p, "fp32" if small else v_kind, signed=False, sqrt=v_sqrt and not small)
                    st["step"] = 0
                g, m, v = p.grad.float(), st["m"].load(), st["v"].load()
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                st["step"] += 1
                bc1, bc2_sqrt = 1 - beta1 ** st["step"], (1 - beta2 ** st["step"]) ** 0.5
                p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)
                st["m"].store(m)
                st["v"].store(v)


# row name -> optimizer factory (params, lr, weight_decay)
VARIANTS: dict[str, Callable] = {
    "fp32 state": lambda ps, lr, wd: QAdamW(ps, lr, wd, "fp32", "fp32", False),
    "tilewise q8": lambda ps, lr, wd: to.AdamW(ps, lr=lr, weight_decay=wd, state_bits=8, backend="reference"),
    "tilewise q4": lambda ps, lr, wd: to.AdamW(ps, lr=lr, weight_decay=wd, state_bits=4, backend="reference"),
    "m block, v block (q4)": lambda ps, lr, wd: QAdamW(ps, lr, wd, "block", "block", False),
    "m block, v sqrt-block": lambda ps, lr, wd: QAdamW(ps, lr, wd, "block", "block", True),
    "m block, v rank1": lambda ps, lr, wd: QAdamW(ps, lr, wd, "block", "rank1", False),
    "m block, v sqrt-rank1": lambda ps, lr, wd: QAdamW(ps, lr, wd, "block", "rank1", True),
    "m fp32, v block": lambda ps, lr, wd: QAdamW(ps, lr, wd, "fp32", "block", False),
    "m block, v fp32": lambda ps, lr, wd: QAdamW(ps, lr, wd, "block", "fp32", False),
}


def _cosine(opt: torch.optim.Optimizer, step: int, steps: int, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def linear_regression(make: Callable, seed: int, steps: int) -> float:
    """y = x W* + 0.5 noise, 256 -> 64 features whose scales span 100x (so v spans 1e4 within a block); batch 32,
    lr 1e-2 cosine. Returns the test MSE above the noise floor (0.25)."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, sigma = 256, 64, 0.5
    feature_scale = torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=g)]
    w_true = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d_in, generator=g) * feature_scale
        return x, x @ w_true + sigma * torch.randn(n, d_out, generator=g)

    torch.manual_seed(seed)
    model = torch.nn.Linear(d_in, d_out)
    opt = make(model.parameters(), 1e-2, 0.0)
    for k in range(steps):
        _cosine(opt, k, steps, 1e-2)
        x, y = batch(32)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    x, y = batch(8192)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y)) - sigma**2


def teacher_student(make: Callable, seed: int, steps: int) -> float:
    """A 64-256-16 tanh MLP fitting a random 64-128-16 tanh teacher plus 0.1 noise; batch 64, lr 3e-3 cosine, wd
    0.01. Returns the test MSE against the noiseless teacher."""
    g = torch.Generator().manual_seed(seed + 100)
    teacher = [torch.randn(64, 128, generator=g) / 8, torch.randn(128, 16, generator=g) / math.sqrt(128)]

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 64, generator=g)
        return x, torch.tanh(x @ teacher[0]) @ teacher[1]

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 16))
    opt = make(model.parameters(), 3e-3, 0.01)
    for k in range(steps):
        _cosine(opt, k, steps, 3e-3)
        x, y = batch(64)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y + 0.1 * torch.randn(y.shape, generator=g)).backward()
        opt.step()
    x, y = batch(8192)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def char_model(make: Callable, seed: int, steps: int) -> float:
    """tests/optim's next-character MLP (8 chars of context, embedding 16, hidden 256) on ``os.py``, lr 3e-3, wd
    0.01, batch 256. Returns the held-out cross-entropy (nats)."""
    with open(os.__file__, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    ctx, split = 8, int(0.9 * len(data))
    torch.manual_seed(seed)
    emb, hidden = torch.nn.Embedding(len(chars), 16), torch.nn.Linear(16 * ctx, 256)
    model = torch.nn.Sequential(emb, torch.nn.Flatten(), hidden, torch.nn.GELU(), torch.nn.Linear(256, len(chars)))
    opt = make(model.parameters(), 3e-3, 0.01)
    g = torch.Generator().manual_seed(seed + 1)
    window = torch.arange(ctx)
    for _ in range(steps):
        idx = torch.randint(0, split - ctx - 1, (256,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data[idx[:, None] + window]), data[idx + ctx]).backward()
        opt.step()
    ev = torch.arange(split, len(data) - ctx - 1, 7)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data[ev[:, None] + window]), data[ev + ctx]))


# name -> (problem, steps at --steps-scale 1, what the number is)
PROBLEMS = {
    "linear regression": (linear_regression, 1000, "excess test MSE"),
    "teacher-student MLP": (teacher_student, 1000, "test MSE"),
    "char MLP (os.py)": (char_model, 300, "held-out CE"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per problem and variant (default 3)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every problem's steps")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="rows to run (default: all)")
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), help="columns to run (default: all)")
    args = parser.parse_args()
    problems = {p: PROBLEMS[p] for p in args.problems}
    results: dict[str, dict[str, list[float]]] = {}
    for pname, (problem, steps, _) in problems.items():
        for vname in args.variants:
            runs = [problem(VARIANTS[vname], s, int(steps * args.steps_scale)) for s in range(args.seeds)]
            results.setdefault(vname, {})[pname] = runs
            print(f"{pname:22s} {vname:24s} " + " ".join(f"{r:.5f}" for r in runs), flush=True)
    print(f"\nmean over {args.seeds} seeds (ratio to fp32 state); lower is better\n")
    print("| variant | " + " | ".join(f"{p} ({problems[p][2]})" for p in problems) + " |")
    print("| --- |" + " --- |" * len(problems))
    base = results.get("fp32 state")
    for vname, row in results.items():
        cells = []
        for pname in problems:
            mean = statistics.fmean(row[pname])
            ratio = f" ({mean / statistics.fmean(base[pname]):.3f})" if base else ""
            cells.append(f"{mean:.4f}{ratio}")
        print(f"| {vname} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
