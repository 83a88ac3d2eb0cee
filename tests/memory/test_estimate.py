"""tilewise.memory: the analytic estimate against tensor accounting of materialized models and optimizers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tilewise
from tilewise.memory import (
    CATEGORIES,
    Recipe,
    SavedTensorCounter,
    estimate,
    fit_recipe,
    format_command,
    format_comparison,
    measure_peak,
    parse_size,
    plan_main,
    smallest_recipe,
)
from tilewise.nn import CONFIGS, build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Activations: the per-block formula omits the [T]-sized index/count tensors of some mixers and rounds nothing
# else, so on the CPU it lands within 1% of the hook count (linear_attention within 7%: the hooks also count the
# tensors its op frees on return, see test_activations_match_saved_tensor_hooks); 25% is the bound,
# leaving room for kernel-dependent extras (e.g. a backend that saves a mask) without making the test blind: a
# missing term (one [B, T, hidden] tensor per block) moves the estimate by more than 25%.
ACT_RTOL = 0.25


def _make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    makers = {
        "tw-adamw": lambda: tilewise.optim.AdamW(params, lr=1e-3),
        "adamw8bit": lambda: tilewise.optim.AdamW8bit(params, lr=1e-3),
        "adamw4bit": lambda: tilewise.optim.AdamW4bit(params, lr=1e-3),
        "lion8bit": lambda: tilewise.optim.Lion8bit(params, lr=1e-4),
        "sgd": lambda: tilewise.optim.SGD(params, lr=1e-2, momentum=0.9),
    }
    return makers[name]()


@pytest.mark.parametrize("optim", ["adamw", "tw-adamw", "adamw8bit", "adamw4bit", "lion8bit", "sgd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_grads_optimizer_exact(optim: str, dtype: str) -> None:
    torch.manual_seed(42)
    recipe = Recipe(optim=optim, param_dtype=dtype, batch_size=2, seq_len=16)
    model = build_model("tiny", dtype=DTYPES[dtype])
    opt = _make_optimizer(optim, list(model.parameters()))
    idx = torch.randint(0, 256, (2, 16))

    def step() -> None:
        model(idx, targets=idx).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small tensors that keep 32-bit state: expected here
        measured = measure_peak(step, model=model, optimizer=opt)
    predicted = estimate("tiny", recipe)
    assert predicted.weights == measured["weights"]
    assert predicted.gradients == measured["gradients"]
    assert predicted.optimizer_state == measured["optimizer_state"]


def test_llama_7b_on_meta() -> None:
    bd = estimate("llama-7b", Recipe(optim="adamw8bit", param_dtype="bf16", batch_size=1, seq_len=2048))
    assert bd.weights == 6_738_415_616 * 2
    assert bd.gradients == bd.weights
    assert 2.03 <= bd.optimizer_state / 6_738_415_616 <= 2.04  # codes 2 B + scales 8/256 B, small norms fp32


def _forward_saved_bytes(
    cfg_name: str, mixer: str, dtype: str, autocast: bool, ckpt: bool, B: int, T: int, device: str = "cpu"
) -> int:
    """Saved-for-backward bytes of a training forward; with checkpointing plus one block's recomputation."""
    cfg = dataclasses.replace(CONFIGS[cfg_name], mixer=mixer)
    model = build_model(cfg, dtype=DTYPES[dtype], device=device).train()
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    forwards = [blk.forward for blk in model.layers]
    if ckpt:
        for blk, fwd in zip(model.layers, forwards, strict=True):
            blk.forward = lambda x, fwd=fwd: checkpoint(fwd, x, use_reentrant=True)
    counter = SavedTensorCounter(exclude=model.parameters())
    with counter, torch.autocast(device, torch.bfloat16, enabled=autocast):
        model(idx, targets=idx)
    total = counter.nbytes
    if ckpt:
        x = torch.randn(B, T, cfg.dim, dtype=DTYPES[dtype], requires_grad=True)
        recompute = SavedTensorCounter(exclude=model.parameters())
        with recompute, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            forwards[0](x)
        total += recompute.nbytes
    return total


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize(("dtype", "autocast"), [("fp32", False), ("bf16", False), ("fp32", True)])
@pytest.mark.parametrize("T", [40, 150])
@pytest.mark.parametrize("mixer", ["attention", "pooling", "conv", "sepconv", "fft_conv", "linear_attention"])
def test_activations_match_saved_tensor_hooks(mixer: str, T: int, dtype: str, autocast: bool, ckpt: bool) -> None:
    """T = 150 > 64 gives linear_attention's reference op three chunks (64, 64, 22). Measured on the CPU: sepconv
    and fft_conv land within 0.1%; linear_attention 0.94-1.0, because the hooks count at save time and the op's
    last state update (its final state is dropped) frees its tensors when the op returns, which the estimate
    leaves out (exact against live tensors: test_linear_attention_op_bytes_are_the_live_saved_tensors)."""
    torch.manual_seed(42)
    B = 3
    measured = _forward_saved_bytes("tiny", mixer, dtype, autocast, ckpt, B, T)
    recipe = Recipe(
        param_dtype=dtype, autocast_bf16=autocast, batch_size=B, seq_len=T, activation_checkpointing=ckpt, device="cpu"
    )
    predicted = estimate("tiny", recipe, mixer=mixer).activations
    assert abs(predicted / measured - 1) < ACT_RTOL, (predicted, measured)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "autocast"), [("bf16", False), ("fp32", True)])
@pytest.mark.parametrize("mixer", ["attention", "pooling", "conv"])
def test_activations_match_saved_tensor_hooks_on_cuda(mixer: str, dtype: str, autocast: bool) -> None:
    """CUDA's kernels save less than the CPU's (the fused RMSNorm keeps only its input and rstd): the estimate for
    ``device="cuda"`` must match what autocast bf16 / bf16 training saves there."""
    torch.manual_seed(42)
    B, T = 3, 40
    measured = _forward_saved_bytes("tiny", mixer, dtype, autocast, False, B, T, device="cuda")
    recipe = Recipe(param_dtype=dtype, autocast_bf16=autocast, batch_size=B, seq_len=T, device="cuda")
    predicted = estimate("tiny", recipe, mixer=mixer).activations
    assert abs(predicted / measured - 1) < ACT_RTOL, (predicted, measured)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("T", [40, 64, 150])
def test_linear_attention_op_bytes_are_the_live_saved_tensors(T: int, autocast: bool) -> None:
    """The reference op's formula against the saved tensors still alive after the op returns (weak references:
    what backward will hold), its inputs q, k, v and g left out except where the op keeps them itself (fp32 k, v)."""
    import weakref

    from tilewise.memory.estimate import _linear_attention_op_bytes
    from tilewise.ops.linear_attention import linear_attention

    torch.manual_seed(42)
    B, h, Dh = 3, 4, 32
    leaves = [torch.randn(B, T, h, Dh, requires_grad=True) for _ in range(3)]
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, h)) / 16).requires_grad_()
    refs: list[tuple[weakref.ref, int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        refs.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=autocast):
        q, k, v = (x * 1 for x in leaves)  # non-leaf inputs, as the mixer's; bf16 under autocast
        if autocast:
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        o, _ = linear_attention(q, k, v, g, scale=1.0)
    live = {key: n for ref, key, n in refs if ref() is not None}
    skip = {q.untyped_storage().data_ptr(), g.untyped_storage().data_ptr()}
    assert sum(n for key, n in live.items() if key not in skip) == _linear_attention_op_bytes(B, T, h * Dh, h, autocast)
    assert o.shape == (B, T, h, Dh)


def test_checkpointing_shrinks_activations() -> None:
    recipe = Recipe(optim="adamw8bit", param_dtype="bf16", batch_size=1, seq_len=2048)
    full = estimate("llama-7b", recipe)
    ckpt = estimate("llama-7b", dataclasses.replace(recipe, activation_checkpointing=True))
    assert ckpt.activations < full.activations / 5


def test_plan_main_prints_categories(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "base", "--optim", "adamw8bit", "--batch-size", "8", "--seq-len", "1024"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    for name in (*CATEGORIES, "total", "MiB", "GiB"):
        assert name in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["--optim", "adafactor"], "unknown optim 'adafactor'"),
        (["--mixer", "mamba"], "unknown mixer 'mamba'"),
    ],
)
def test_plan_main_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main(argv) == 2
    assert needle in capsys.readouterr().out


def test_estimate_errors() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        estimate("nope", Recipe())
    with pytest.raises(ValueError, match="unknown optim"):
        Recipe(optim="adam9bit")


def test_saved_tensor_counter_counts_one_micro_batch() -> None:
    """Gradient accumulation: each micro-batch's forward saves (and its backward frees) the same bytes, so the
    counter reports one forward's, not their sum; weights and views of weights are never counted."""
    torch.manual_seed(42)
    model = build_model("tiny")
    idx = torch.randint(0, 256, (2, 16))
    one = SavedTensorCounter()
    with one:
        model(idx, targets=idx).backward()
    three = SavedTensorCounter()
    with three:
        for _ in range(3):
            model(idx, targets=idx).backward()
    excluded = SavedTensorCounter(exclude=model.parameters())
    with excluded:
        model(idx, targets=idx).backward()
    assert one.nbytes > 4 * 2 * 16 * 256  # at least the fp32 log-softmax [B·T, V]
    assert three.nbytes == one.nbytes == excluded.nbytes
    assert one.nbytes == pytest.approx(
        estimate("tiny", Recipe(batch_size=2, seq_len=16, device="cpu")).activations, rel=0.01
    )


def test_format_comparison() -> None:
    predicted = {"weights": 2**20, "gradients": 2**20, "optimizer_state": 2**21, "activations": 2**22, "other": 2**20}
    predicted["total"] = sum(predicted.values())
    measured = {"weights": 2**20, "gradients": 2**20, "optimizer_state": 2**20, "activations": 2**21, "other": 0}
    measured["peak"] = sum(measured.values())
    text = format_comparison(predicted, measured, measured_other=False).splitlines()
    assert text[0].split() == ["category", "predicted", "MiB", "measured", "MiB", "measured/predicted"]
    assert text[3].split() == ["optimizer_state", "2.00", "1.00", "0.50"]
    assert text[5].split() == ["other", "1.00", "n/a", "-"]
    assert text[6].split() == ["total", "w/o", "other", "8.00", "5.00", "0.62"]
    table = format_comparison(predicted, {**measured, "other": 2**20, "peak": 6 * 2**20}, markdown=True).splitlines()
    assert table[1] == "| --- | ---: | ---: | ---: |"
    assert table[-2:] == ["| other | 1.00 | 1.00 | 1.00 |", "| total (peak) | 9.00 | 6.00 | 0.67 |"]
    assert format_comparison(None, measured).splitlines()[1].split() == ["weights", "-", "1.00", "-"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("16000MiB", 16000 * 2**20),
        ("25769803776", 25769803776),
        ("1.5 gib", 3 * 2**29),
        (" 512KiB ", 512 * 1024),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "24XB", "-1GiB", "0", "1e9", "24 Gi B", "0.1B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_fit_recipe_keeps_a_recipe_that_fits() -> None:
    base = Recipe()
    fits = fit_recipe("base", estimate("base", base).total + 1, base=base)
    assert fits[0][0] == base
    assert fits[0][1].total == estimate("base", base).total
    assert all(bd.total <= estimate("base", base).total + 1 for _, bd in fits)


def test_fit_recipe_picks_8bit_state_between_the_totals() -> None:
    """Between the 8-bit and the fp32-state totals, swapping the optimizer state is the one change that fits."""
    base = Recipe(optim="adamw")
    fp32_total = estimate("base", base).total
    q8_total = estimate("base", dataclasses.replace(base, optim="adamw8bit")).total
    assert q8_total < fp32_total
    fits = fit_recipe("base", (q8_total + fp32_total) // 2, base=base)
    best, bd = fits[0]
    assert best == dataclasses.replace(base, optim="adamw8bit")
    assert bd.total == q8_total

    # the tokens per step never change; fewest changes first
    def knobs(r: Recipe) -> tuple:
        return (r.optim, (r.param_dtype, r.autocast_bf16), r.activation_checkpointing, r.batch_size)

    changes = [sum(a != b for a, b in zip(knobs(r), knobs(base), strict=True)) for r, _ in fits]
    assert changes == sorted(changes)
    assert all(r.batch_size * r.grad_accum == base.batch_size * base.grad_accum for r, _ in fits)


def test_fit_recipe_search_axes() -> None:
    base = Recipe(optim="lion8bit", batch_size=12, param_dtype="fp32", autocast_bf16=True)
    recipes = [r for r, _ in fit_recipe("tiny", 2**40, base=base)]
    assert {r.optim for r in recipes} == {"lion8bit"}  # Lion is kept
    assert {(r.batch_size, r.grad_accum) for r in recipes} == {(12, 1), (6, 2), (3, 4), (1, 12)}
    assert {(r.param_dtype, r.autocast_bf16) for r in recipes} == {("fp32", True), ("bf16", False)}
    assert len(recipes) == 4 * 2 * 2
    assert recipes[1] == dataclasses.replace(base, param_dtype="bf16", autocast_bf16=False)
    optims = [r.optim for r, _ in fit_recipe("tiny", 2**40, base=Recipe(optim="adamw", batch_size=1))[:4]]
    assert optims == ["adamw", "tw-adamw", "adamw8bit", "adamw4bit"]


def test_fit_recipe_nothing_fits_llama_7b() -> None:
    base = Recipe(optim="adamw", batch_size=8, seq_len=1024)
    assert fit_recipe("llama-7b", 2**20, base=base) == []
    smallest, bd = smallest_recipe("llama-7b", base=base)
    assert (smallest.optim, smallest.param_dtype, smallest.activation_checkpointing) == ("adamw4bit", "bf16", True)
    assert (smallest.batch_size, smallest.grad_accum) == (1, 8)
    assert bd.total > 2**20


def test_format_command() -> None:
    recipe = Recipe(optim="adamw8bit", batch_size=4, grad_accum=2, activation_checkpointing=True, autocast_bf16=True)
    train, caveat = format_command("train", "base", recipe)
    assert train == (
        "tilewise train --model base --optim adamw8bit --batch-size 4 --seq-len 1024 --grad-accum 2 "
        "--activation-checkpointing"
    )
    assert caveat is None
    plan, _ = format_command("plan", "base", recipe, mixer="pooling")
    assert plan.endswith("--grad-accum 2 --autocast --checkpointing")
    assert "--mixer pooling" in plan
    assert "bf16 parameters" in format_command("train", "base", dataclasses.replace(recipe, param_dtype="bf16"))[1]


def test_plan_main_budget(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "base", "--optim", "adamw", "--autocast"]
    assert plan_main([*argv, "--budget", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "this recipe fits" in out
    assert "tilewise train --model base --optim adamw --batch-size 8 --seq-len 1024\n" in out
    assert "upper bound" in out
    assert plan_main([*argv, "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out
    assert "Best fitting recipe" in out
    assert plan_main(["--model", "llama-7b", "--budget", "1MiB"]) == 1
    out = capsys.readouterr().out
    assert "Nothing fits" in out
    assert "smallest total found" in out
    assert plan_main(["--budget", "24XB"]) == 2
    assert "invalid size '24XB'" in capsys.readouterr().out
