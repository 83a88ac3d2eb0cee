"""tilewise.optim: parity with torch.optim (fp32 state), convergence for every optimizer and state format, a small
model trained with low-bit AdamW, resume exactness, weights_only state_dicts, skips, bf16 parameters, errors.

Tests that step an optimizer take the ``dev`` fixture: ``"cpu"`` (the reference backend) always, and ``"cuda"``
(the fused Triton kernel, through the classes) on a GPU machine."""

from __future__ import annotations

import io
import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import tilewise.optim as to
from tilewise._testing import assert_exact

FORMATS = ["fp32", "bf16", "q8", "q4", "fp8"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def dev(request: pytest.FixtureRequest) -> str:
    """Where the parameters live: ``"cpu"``, and ``"cuda"`` (skipped without a GPU)."""
    return request.param


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0, sched=None) -> None:
    """``steps`` steps on the mean square of the outputs, inputs drawn on the CPU (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    in_features, weight = model[0].in_features, model[0].weight
    for _ in range(steps):
        x = torch.randn(16, in_features, generator=g).to(weight.device, weight.dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8)).to(device, dtype)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda p: to.AdamW(p, lr=1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        (lambda p: to.AdamW(p, lr=torch.tensor(1e-2), amsgrad=True, maximize=True),
         lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-2), amsgrad=True, maximize=True)),
        (lambda p: to.Adam(p, lr=1e-2, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1)),
        (lambda p: to.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
         lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        (lambda p: to.SGD(p, lr=1e-2, momentum=0.9, dampening=0.5),
         lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, dampening=0.5)),
    ],
)  # fmt: skip
def test_fp32_state_matches_torch(ours, theirs, dev: str) -> None:
    """100 steps with a cosine LR schedule: parameters within 1e-6 relative of torch.optim's (the issue's bound).

    On CPU every case is bit-exact under torch 2.11 and 2.13 (whose adam.py do the same math). The tensor-lr case
    was 5e-7 off (1.15e-6 on another machine) until the reference computed ``1 - lr * wd`` and ``lr / bc1`` as
    torch does for a tensor lr: fp32 tensor ops, not float64 (optim_step/README.md). On CUDA the Triton kernel
    (fp32 math, float64 scalars) meets the bound, not bit-exactness; torch.optim takes its foreach path there."""
    a, b = _mlp(device=dev), _mlp(device=dev)
    opt_a, opt_b = ours(a.parameters()), theirs(b.parameters())
    _train(a, opt_a, 100, sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=100))
    _train(b, opt_b, 100, sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=100))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pa, pb = pa.detach(), pb.detach()
        err = float((pa - pb).abs().max() / pb.abs().max())
        assert err <= 1e-6, err


# name -> (factory, the factor the mean loss must fall by in 600 steps; plain SGD crawls along the valley)
OPTIMIZERS = {
    "AdamW": (lambda p, f: to.AdamW(p, lr=5e-2, weight_decay=0.0, state_format=f, min_quant_numel=0), 40),
    "Adam": (lambda p, f: to.Adam(p, lr=5e-2, state_format=f, min_quant_numel=0), 40),
    "Lion": (lambda p, f: to.Lion(p, lr=5e-3, state_format=f, min_quant_numel=0), 40),
    "SGD": (lambda p, f: to.SGD(p, lr=2.5e-3, momentum=0.9, nesterov=True, state_format=f, min_quant_numel=0), 8),
}


def _rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return ((1 - x) ** 2 + 100 * (y - x**2) ** 2).mean()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_rosenbrock_converges(name: str, fmt: str, dev: str) -> None:
    """512 Rosenbrock problems in one [2, 512] parameter (so quantized blocks hold many values): the mean loss
    falls from ~46 near (-1, 1.5) by the optimizer's factor."""
    make, factor = OPTIMIZERS[name]
    xy = torch.nn.Parameter(torch.stack([-1 + 0.2 * torch.randn(512), 1.5 + 0.2 * torch.randn(512)]).to(dev))
    opt = make([xy], fmt)
    start = float(_rosenbrock(xy.detach()))
    for _ in range(600):
        opt.zero_grad()
        _rosenbrock(xy).backward()
        opt.step()
    end = float(_rosenbrock(xy.detach()))
    assert end < start / factor, (start, end)
    if fmt in ("q8", "q4", "fp8"):
        assert any(k.endswith("_codes") for k in opt.state[xy])


def _char_model_loss(state_bits: int, steps: int = 300, device: str = "cpu") -> float:
    """A tiny next-character MLP (8 chars of context) trained on the source of Python's ``os`` module; returns
    the cross-entropy on the held-out last 10%."""
    with open(os.__file__, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    vocab, ctx, split = len(chars), 8, int(0.9 * len(data))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, 16),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * ctx, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, vocab),
    ).to(device)
    data = data.to(device)
    opt = to.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_bits=state_bits, min_quant_numel=1024)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, split - ctx - 1, (256,), generator=g).to(device)
        x, y = data[idx[:, None] + torch.arange(ctx, device=device)], data[idx + ctx]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ev = torch.arange(split, len(data) - ctx - 1, 7, device=device)
    with torch.no_grad():
        x = data[ev[:, None] + torch.arange(ctx, device=device)]
        return float(torch.nn.functional.cross_entropy(model(x), data[ev + ctx]))


def test_char_model_low_bit_adamw_matches_fp32(dev: str) -> None:
    full = _char_model_loss(32, device=dev)
    assert full < 2.3  # it learned something: uniform over ~90 characters is 4.5 nats
    assert _char_model_loss(8, device=dev) <= full * 1.01
    assert _char_model_loss(4, device=dev) <= full * 1.03


def _roundtrip(obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUME = {
    "AdamW4bit-bf16-sr": (lambda p: to.AdamW4bit(p, lr=1e-2, stochastic_round=True, min_quant_numel=0), torch.bfloat16),
    "AdamW8bit-bf16-master": (lambda p: to.AdamW8bit(p, lr=1e-2, master_weights=True), torch.bfloat16),
    "Lion-fp8": (lambda p: to.Lion(p, lr=1e-3, state_format="fp8", min_quant_numel=0), torch.float32),
    "SGD8bit-amsgrad-free": (lambda p: to.SGD8bit(p, lr=1e-2, momentum=0.9, min_quant_numel=0), torch.float32),
    "Adam-amsgrad-q8": (lambda p: to.Adam(p, lr=1e-2, amsgrad=True, state_bits=8, min_quant_numel=0), torch.float32),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_save_load_continue_is_bit_identical(name: str, dev: str) -> None:
    make, dtype = RESUME[name]
    a = _mlp(dtype, dev)
    opt_a = make(a.parameters())
    _train(a, opt_a, 10, seed=0)
    _train(a, opt_a, 10, seed=1)

    b = _mlp(dtype, dev)
    opt_b = make(b.parameters())
    _train(b, opt_b, 10, seed=0)
    saved = _roundtrip({"model": b.state_dict(), "opt": opt_b.state_dict()})
    c = _mlp(dtype, dev)
    c.load_state_dict(saved["model"])
    opt_c = make(c.parameters())
    opt_c.load_state_dict(saved["opt"])
    _train(c, opt_c, 10, seed=1)
    for pa, pc in zip(a.parameters(), c.parameters(), strict=True):
        assert_exact(pc, pa)


def test_state_dict_is_plain_tensors_with_saved_dtypes(dev: str) -> None:
    model = _mlp(torch.bfloat16, dev)
    opt = to.AdamW8bit(model.parameters(), master_weights=True, min_quant_numel=0)
    _train(model, opt, 2)
    sd = _roundtrip(opt.state_dict())
    state = sd["state"][0]
    assert state["exp_avg_codes"].dtype == torch.uint8
    assert state["exp_avg_scales"].dtype == torch.float32
    assert state["master"].dtype == torch.float32
    fresh = to.AdamW8bit(model.parameters(), master_weights=True, min_quant_numel=0)
    fresh.load_state_dict(sd)
    loaded = fresh.state[model[0].weight]
    assert loaded["exp_avg_codes"].dtype == torch.uint8  # torch.optim would cast it to the parameter's bf16
    assert loaded["master"].dtype == torch.float32


@pytest.mark.parametrize(("saved", "loading"), [(8, "fp8"), (32, "q4"), (4, None)])
def test_loading_another_state_format_raises(saved: int, loading: str | None) -> None:
    model = _mlp()
    opt = to.AdamW(model.parameters(), state_bits=saved)
    _train(model, opt, 1)
    sd = _roundtrip(opt.state_dict())
    other = to.AdamW(model.parameters(), state_format=loading)
    with pytest.raises(ValueError, match="state format"):
        other.load_state_dict(sd)


def test_loading_state_of_another_min_quant_numel_raises() -> None:
    model = _mlp()
    opt = to.AdamW8bit(model.parameters(), min_quant_numel=0)
    _train(model, opt, 1)
    with pytest.raises(ValueError, match="'exp_avg' is missing"):
        to.AdamW8bit(model.parameters(), min_quant_numel=10**6).load_state_dict(_roundtrip(opt.state_dict()))


def test_min_quant_numel_keeps_small_tensors_fp32_per_group(dev: str) -> None:
    model = _mlp(device=dev)  # weights 6144 and 768 elements, biases 96 and 8
    w0, b0, w1, b1 = model.parameters()
    opt = to.AdamW8bit([{"params": [w0, b0]}, {"params": [w1, b1], "min_quant_numel": 0}])
    _train(model, opt, 1)
    assert "exp_avg_codes" in opt.state[w0]
    assert "exp_avg" in opt.state[b0]
    assert opt.state[b0]["exp_avg"].dtype == torch.float32
    assert "exp_avg_codes" in opt.state[w1]
    assert "exp_avg_codes" in opt.state[b1]


def test_skip_nonfinite_skips_and_counts(dev: str) -> None:
    model = _mlp(device=dev)
    opt = to.AdamW8bit(model.parameters(), skip_nonfinite=True, min_quant_numel=0)
    _train(model, opt, 3)
    w0, b0 = model[0].weight, model[0].bias
    before = {k: v.clone() for k, v in opt.state[w0].items()}
    w_before, b_before = w0.detach().clone(), b0.detach().clone()
    opt.zero_grad()
    model(torch.randn(4, 64, device=dev)).square().mean().backward()
    w0.grad[3, 5] = float("inf")
    opt.step()
    assert_exact(w0.detach(), w_before)
    for key, value in before.items():
        if key != "skips":
            assert_exact(opt.state[w0][key], value, msg=key)
    assert not torch.equal(b0.detach(), b_before)
    assert float(opt.state[w0]["skips"]) == 1
    assert float(opt.skipped_steps()) == 1


def test_bf16_master_weights_and_stochastic_rounding(dev: str) -> None:
    """SGD steps of 1e-3 on bf16 ones (half an ulp is 2**-8): nearest rounding never moves, the fp32 master and
    stochastic rounding (on average) reach 0.9 after 100 steps."""
    params = {
        name: torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16, device=dev))
        for name in ("near", "master", "sr")
    }
    opts = {
        "near": to.SGD([params["near"]], lr=1e-3),
        "master": to.SGD([params["master"]], lr=1e-3, master_weights=True),
        "sr": to.SGD([params["sr"]], lr=1e-3, stochastic_round=True),
    }
    for _ in range(100):
        for name, p in params.items():
            p.grad = torch.ones_like(p)
            opts[name].step()
    assert bool((params["near"] == 1).all())
    master = opts["master"].state[params["master"]]["master"]
    assert master.dtype == torch.float32
    assert abs(float(master.mean()) - 0.9) < 1e-4
    assert_exact(params["master"].detach(), master.bfloat16())
    assert abs(float(params["sr"].detach().float().mean()) - 0.9) < 2e-3


def test_mixed_dtypes_in_one_group(dev: str) -> None:
    a = torch.nn.Parameter(torch.randn(5000, device=dev))
    b = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16, device=dev))
    opt = to.AdamW([a, b], lr=1e-2, state_bits=4)
    (a.sum() + b.float().sum()).backward()
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    assert bool((a < a0).all())
    assert bool((b < b0).all())
    assert b.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: to.AdamW(p, lr=-1e-3), "invalid lr"),
        (lambda p: to.AdamW(p, betas=(0.9, 1.0)), r"invalid beta2 \(betas\[1\]\)"),
        (lambda p: to.AdamW(p, betas=(-0.1, 0.999)), r"invalid beta1 \(betas\[0\]\)"),
        (lambda p: to.AdamW(p, eps=-1.0), "invalid eps"),
        (lambda p: to.AdamW(p, weight_decay=-0.1), "invalid weight_decay"),
        (lambda p: to.AdamW(p, state_bits=2), "state_bits=2 is not supported; use 32, 16"),
        (lambda p: to.AdamW(p, state_format="int8"), "state_format='int8' is unknown"),
        (lambda p: to.AdamW(p, min_quant_numel=-1), "min_quant_numel must be"),
        (lambda p: to.AdamW(p, backend="cuda"), "not a backend"),
        (lambda p: to.Lion(p, betas=(0.9, 1.5)), "invalid beta2"),
        (lambda p: to.SGD(p, momentum=-0.9), "invalid momentum"),
        (lambda p: to.SGD(p, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda p: to.AdamW([{"params": p, "state_bits": 3}]), "state_bits=3"),
    ],
)
def test_bad_hyperparameters_raise(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.randn(3))])


def test_integer_params_rejected() -> None:
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        to.AdamW([torch.zeros(3, dtype=torch.int64)])


_DTENSOR_SCRIPT = """
import sys, tempfile
import torch, torch.distributed as dist, torch.multiprocessing as mp

def worker(rank, path):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    import tilewise.optim as to
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    full, grad = torch.randn(64, 96), torch.randn(64, 96)
    out = {}
    for fmt in ("fp32", "q8"):
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        opt = to.AdamW([p], lr=1e-2, state_format=fmt)
        for _ in range(3):
            p.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            opt.step()
        out[fmt] = (p.detach().full_tensor(), opt.state[p])
    if rank == 0:
        q = torch.nn.Parameter(full.clone())
        opt = to.AdamW([q], lr=1e-2)
        for _ in range(3):
            q.grad = grad.clone()
            opt.step()
        assert torch.equal(out["fp32"][0], q.detach()), "fp32 state: sharded != unsharded"
        # 3072 local elements < min_quant_numel=4096 <= 6144 global: the global size decides
        assert out["q8"][1]["exp_avg_codes"].shape == (3072,), sorted(out["q8"][1])
        assert (out["q8"][0] - q.detach()).abs().max() < 0.05
        print("DTENSOR OK")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(tempfile.mktemp(),), nprocs=2, join=True)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")
def test_dtensor_params_step_on_local_shards(tmp_path) -> None:
    """FSDP2-style DTensor parameters sharded over 2 gloo ranks: each rank steps its shard; fp32 state matches an
    unsharded run exactly, and min_quant_numel is decided on the global size."""
    script = tmp_path / "dtensor_step.py"
    script.write_text(_DTENSOR_SCRIPT)
    src = str(pathlib.Path(to.__file__).parents[2])  # the directory holding the tilewise package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert "DTENSOR OK" in run.stdout, run.stdout + run.stderr[-3000:]


@pytest.mark.parametrize(
    ("cls", "bits", "key"),
    [
        (to.AdamW8bit, 8, "exp_avg_sq_codes"),
        (to.AdamW4bit, 4, "exp_avg_sq_codes"),
        (to.Adam8bit, 8, "exp_avg_codes"),
        (to.Lion8bit, 8, "exp_avg_codes"),
        (to.SGD8bit, 8, "momentum_codes"),
    ],
)
def test_aliases_default_to_low_bit_state(cls, bits: int, key: str, dev: str) -> None:
    p = torch.nn.Parameter(torch.randn(8192, dtype=torch.float16, device=dev))
    opt = cls([p], momentum=0.9) if cls is to.SGD8bit else cls([p])
    assert opt.param_groups[0]["state_bits"] == bits
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p][key].dtype == torch.uint8
    assert opt.state[p][key].numel() == (8192 if bits == 8 else 4096)
    assert p.dtype == torch.float16
    assert bool(torch.isfinite(p).all())


def test_small_tensors_keep_fp32_state_with_one_warning(dev: str) -> None:
    model = _mlp(device=dev)  # weights of 6144 and 768 elements, biases of 96 and 8
    opt = to.AdamW(model.parameters(), lr=1e-3, state_bits=8)  # min_quant_numel 4096
    model(torch.randn(4, 64, device=dev)).square().mean().backward()
    with pytest.warns(UserWarning, match=r"3 parameter tensors \(872 elements\) are smaller than min_quant_numel"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning once the states exist
        opt.step()
    formats = ["exp_avg_codes" in opt.state[p] for p in model.parameters()]
    assert formats == [True, False, False, False]


# --- "q4r1": 4-bit state with rank-1 normalization of v (reference backend only) ---------------------------------


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_rosenbrock_converges_q4r1(name: str) -> None:
    """As test_rosenbrock_converges; the [2, 512] parameter is 2-D, so v takes the rank-1 layout."""
    make, factor = OPTIMIZERS[name]
    torch.manual_seed(0)
    xy = torch.nn.Parameter(torch.stack([-1 + 0.2 * torch.randn(512), 1.5 + 0.2 * torch.randn(512)]))
    opt = make([xy], "q4r1")
    start = float(_rosenbrock(xy.detach()))
    for _ in range(600):
        opt.zero_grad()
        _rosenbrock(xy).backward()
        opt.step()
    end = float(_rosenbrock(xy.detach()))
    assert end < start / factor, (start, end)
    assert {"exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_row", "exp_avg_sq_col"} <= set(
        opt.state[xy]
    )


def _noisy_regression(state_format: str, seed: int = 0, steps: int = 1000) -> float:
    """benchmarks/optim_4bit_quality.py's linear regression: y = x W* + 0.5 noise, 256 -> 64 features with scales
    spanning 100x (v spans ~1e4 within a block), batch 32, lr 1e-2 cosine; the excess test MSE over the noise."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, sigma = 256, 64, 0.5
    feature_scale = torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=g)]
    w_true = torch.randn(d_in, d_out, generator=g) / d_in**0.5

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d_in, generator=g) * feature_scale
        return x, x @ w_true + sigma * torch.randn(n, d_out, generator=g)

    torch.manual_seed(seed)
    model = torch.nn.Linear(d_in, d_out)
    opt = to.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, state_format=state_format, min_quant_numel=4096)
    for k in range(steps):
        opt.param_groups[0]["lr"] = 1e-2 * 0.5 * (1 + math.cos(math.pi * k / steps))
        x, y = batch(32)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bias keeps fp32 state
            opt.step()
    x, y = batch(8192)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y)) - sigma**2


def test_q4r1_beats_q4_on_noisy_regression() -> None:
    """Measured (seed 0, 1000 steps): excess test MSE fp32 state 0.0097, q4 0.0214, q4r1 0.0137 (the benchmark's
    "m block, v rank1" row, to 5 digits). Seeds 0-2 give q4r1 / q4 = 0.64, 0.61, 0.64, and the benchmark's paired
    per-seed differences have standard errors ~1e-4 against a gap of ~8e-3: 0.8 leaves a wide margin while still
    asserting a real gain, not just "not worse"."""
    q4, q4r1 = _noisy_regression("q4"), _noisy_regression("q4r1")
    assert q4r1 <= 0.8 * q4, (q4r1, q4)


def test_q4r1_state_dict_roundtrip_and_small_tensors(dev: str) -> None:
    model = _mlp(device=dev)  # weights [96, 64] (6144) and [8, 96] (768), biases 96 and 8
    make = lambda p: to.AdamW(p, lr=1e-2, amsgrad=True, state_format="q4r1", min_quant_numel=1000)  # noqa: E731
    opt_a = make(model.parameters())
    with pytest.warns(UserWarning, match="smaller than min_quant_numel"):
        _train(model, opt_a, 5, seed=0)
    w0, b0, w1, b1 = model.parameters()
    st = opt_a.state[w0]
    assert st["exp_avg_sq_row"].shape == (96,)
    assert st["max_exp_avg_sq_col"].shape == (64,)
    assert "exp_avg_sq_scales" not in st
    for p in (b0, w1, b1):  # under min_quant_numel: fp32
        assert opt_a.state[p]["exp_avg_sq"].dtype == torch.float32
    saved = _roundtrip({"model": model.state_dict(), "opt": opt_a.state_dict()})
    assert saved["opt"]["state"][0]["exp_avg_sq_row"].dtype == torch.float32
    _train(model, opt_a, 5, seed=1)

    c = _mlp(device=dev)
    c.load_state_dict(saved["model"])
    opt_c = make(c.parameters())
    opt_c.load_state_dict(saved["opt"])
    _train(c, opt_c, 5, seed=1)
    for pa, pc in zip(model.parameters(), c.parameters(), strict=True):
        assert_exact(pc, pa)
    with pytest.raises(ValueError, match="state format"):
        to.AdamW(c.parameters(), state_format="q4").load_state_dict(saved["opt"])


@pytest.mark.parametrize(
    "make",
    [lambda p: to.Lion(p, state_format="q4r1"), lambda p: to.SGD(p, lr=0.1, momentum=0.9, state_format="q4r1")],
)
def test_q4r1_unsupported_for_lion_and_sgd(make) -> None:
    with pytest.raises(ValueError, match="use state_format='q4'"):
        make(_mlp().parameters())
