"""Analytic peak-memory estimate for training a MetaFormer model: weights, gradients, optimizer state, activations.

Nothing is allocated: the model is built on the meta device, the optimizer state is laid out per parameter with
:func:`tilewise.ops.optim_step.init_state` on meta tensors, and activations follow the per-block formulas in
README.md beside this file.

Example:
    >>> from tilewise.memory import Recipe, estimate
    >>> bd = estimate("base", Recipe(optim="adamw8bit", batch_size=8, seq_len=1024))
    >>> print(bd.format_table())
    base (attention, 113,658,624 params), adamw8bit, fp32, B=8 T=1024
    category                  MiB       GiB      %
    weights                 433.6     0.423    5.3
    gradients               433.6     0.423    5.3
    optimizer_state         220.3     0.215    2.7
    activations            6979.4     6.816   85.8
    other                    64.0     0.062    0.8
    total                  8130.8     7.940  100.0
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from decimal import Decimal

import torch

from tilewise.nn import CONFIGS, MIXERS, MetaFormerConfig, build_model
from tilewise.nn.metaformer import _mixer_kwargs
from tilewise.ops.optim_step import QUANT_FORMATS, init_state

__all__ = [
    "CATEGORIES",
    "OPTIMIZERS",
    "Breakdown",
    "Recipe",
    "estimate",
    "fit_recipe",
    "format_command",
    "parse_size",
    "plan_main",
    "smallest_recipe",
]

CATEGORIES: tuple[str, ...] = ("weights", "gradients", "optimizer_state", "activations", "other")
# optim name -> (state kind, state format); "torch" keeps torch.optim.AdamW's state in the parameter's dtype.
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw": ("adam", "torch"),
    "tw-adamw": ("adam", "fp32"),
    "adamw8bit": ("adam", "q8"),
    "adamw4bit": ("adam", "q4"),
    "lion8bit": ("lion", "q8"),
    "sgd": ("sgd", "fp32"),
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Allocator slack, the loss's scalar temporaries and cuBLAS workspaces; the CUDA context (~0.5 GiB, outside
# torch.cuda.max_memory_allocated) is not included.
OTHER_ALLOWANCE = 64 * 2**20


@dataclass(frozen=True)
class Recipe:
    """How a model is trained, as far as memory goes.

    Args:
        optim: one of :data:`OPTIMIZERS`: ``"adamw"`` (torch.optim.AdamW, state in the parameter dtype),
            ``"tw-adamw"`` (tilewise AdamW, fp32 state), ``"adamw8bit"``, ``"adamw4bit"``, ``"lion8bit"``,
            ``"sgd"`` (tilewise SGD with momentum, fp32 buffer); default ``"adamw"``.
        param_dtype: ``"fp32"`` or ``"bf16"`` parameters (and gradients); default fp32.
        autocast_bf16: run forward/backward under ``torch.autocast(dtype=torch.bfloat16)``; default False.
        batch_size: sequences per micro-batch ``B``; default 8.
        seq_len: tokens per sequence ``T``; default 1024.
        activation_checkpointing: each ``MetaFormerBlock`` wrapped in ``torch.utils.checkpoint``; default False.
        grad_accum: micro-batches per step (does not change the peak: gradients accumulate in place); default 1.
        min_quant_numel: tensors smaller than this keep fp32 state under 8/4-bit formats; default 4096.
        device: ``"cuda"`` (default) or ``"cpu"``: the kernels differ in what they save for backward (CUDA's fused
            RMSNorm keeps its input and ``rstd``; the CPU's composite also keeps ``x * rstd``).

    Example:
        >>> import dataclasses
        >>> from tilewise.memory import Recipe
        >>> recipe = Recipe(optim="adamw8bit", batch_size=4, seq_len=2048)
        >>> recipe.param_dtype, recipe.device, recipe.batch_size * recipe.seq_len  # tokens per micro-batch
        ('fp32', 'cuda', 8192)
        >>> dataclasses.replace(recipe, activation_checkpointing=True).activation_checkpointing  # frozen: replace
        True
        >>> Recipe(optim="adam")
        Traceback (most recent call last):
        ...
        ValueError: unknown optim 'adam'; use one of adamw, tw-adamw, adamw8bit, adamw4bit, lion8bit, sgd
    """

    optim: str = "adamw"
    param_dtype: str = "fp32"
    autocast_bf16: bool = False
    batch_size: int = 8
    seq_len: int = 1024
    activation_checkpointing: bool = False
    grad_accum: int = 1
    min_quant_numel: int = 4096
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"unknown optim {self.optim!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"unknown param_dtype {self.param_dtype!r}; use one of {', '.join(DTYPES)}")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


@dataclass
class Breakdown:
    """Bytes per category (:data:`CATEGORIES`); ``total`` is their sum, a conservative peak.

    Example:
        >>> from tilewise.memory import Breakdown
        >>> GiB = 2**30
        >>> bd = Breakdown(weights=GiB, gradients=GiB, optimizer_state=2 * GiB, title="by hand")
        >>> bd.total == 4 * GiB, bd.as_dict()["activations"]
        (True, 0)
        >>> print(bd.format_table())
        by hand
        category                  MiB       GiB      %
        weights                1024.0     1.000   25.0
        gradients              1024.0     1.000   25.0
        optimizer_state        2048.0     2.000   50.0
        activations               0.0     0.000    0.0
        other                     0.0     0.000    0.0
        total                  4096.0     4.000  100.0
    """

    weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    other: int = 0
    title: str = ""

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def as_dict(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES} | {"total": self.total}

    def format_table(self) -> str:
        """A text table: one row per category with MiB, GiB and % of the total."""
        total = max(self.total, 1)
        lines = [self.title] if self.title else []
        lines.append(f"{'category':<16} {'MiB':>12} {'GiB':>9} {'%':>6}")
        for name, value in self.as_dict().items():
            pct = 100.0 * value / total
            lines.append(f"{name:<16} {value / 2**20:>12.1f} {value / 2**30:>9.3f} {pct:>6.1f}")
        return "\n".join(lines)


def _config(model: str | MetaFormerConfig, mixer: str | None) -> MetaFormerConfig:
    if isinstance(model, str):
        if model not in CONFIGS:
            raise ValueError(f"unknown model {model!r}; named configs are: {', '.join(CONFIGS)}")
        model = CONFIGS[model]
    if mixer is not None:
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; registered mixers are: {', '.join(sorted(MIXERS))}")
        model = dataclasses.replace(model, mixer=mixer)
    return model


def _optimizer_bytes(params: list[torch.Tensor], recipe: Recipe) -> int:
    """Bytes of the optimizer state, laid out per parameter exactly as the optimizer will (on meta tensors)."""
    kind, fmt = OPTIMIZERS[recipe.optim]
    total = 0
    for p in params:
        if fmt == "torch":  # torch.optim.AdamW: exp_avg, exp_avg_sq in p.dtype, fp32 scalar step
            total += 2 * p.numel() * p.element_size() + 4
            continue
        p_fmt = "fp32" if fmt in QUANT_FORMATS and p.numel() < recipe.min_quant_numel else fmt
        state = init_state(p, kind, p_fmt, momentum=True)
        total += sum(t.numel() * t.element_size() for t in state.values())
    return total


def _mixer_bytes_per_token(config: MetaFormerConfig, a: int, autocast: bool, device: str = "cuda") -> float:
    """Saved bytes per token of one block's token mixer, its input cast(s) included (README.md, "Mixers").

    Terms that do not scale with ``B * T`` (padding, kernels, per-chunk tensors) are in :func:`_mixer_bytes_per_layer`.
    """
    D = config.dim
    kw = _mixer_kwargs(config)
    if config.mixer == "attention":
        # normed input (one copy, or one bf16 cast per projection under autocast), q and k after RoPE, v
        # (repeated to all heads under GQA), output; plus the fp32 logsumexp [B, H, T]
        return (3 if autocast else 1) * D * a + 4 * D * a + 4 * config.n_heads
    if config.mixer == "pooling":
        return 0.0  # parameter-free: saves only [T] index and count tensors
    if config.mixer == "conv":
        return D * a  # the left-padded input [B, D, T + k - 1]
    if config.mixer == "sepconv":
        # pw1's input (one cast under autocast too: one projection reads it), StarReLU's input, the depthwise
        # conv's padded input (padding in _mixer_bytes_per_layer), pw2's input
        return D * a + 3 * int(kw.get("expansion", 2.0) * D) * a
    if config.mixer == "fft_conv":
        # in_proj's input (D a), the short conv's padded 3D input and its output x0, x1, v (3 D a each), y (for
        # x0 * y), out_proj's input: 9 D a; u = x1 * v in fp32 for the skip term (u itself in fp32, a copy
        # otherwise): 4 D; the op: u zero-padded to 2T in fp32 (8 D) and its rfft [B, D, T + 1] complex64 (8 D)
        return 9 * D * a + 4 * D + 16 * D
    if config.mixer == "linear_attention":
        h = kw.get("n_heads", config.n_heads)
        if kw.get("feature_map", "l2norm") != "l2norm":
            raise ValueError("no activation formula for linear_attention with feature_map='elu' (only 'l2norm')")
        # the normed input (one bf16 cast per projection under autocast: wq, wk, wv, wg, wr); per feature map
        # the projection and its norm (h a, and its expanded clamp h a); logsigmoid's fp32 input and buffer;
        # the per-head output RMSNorm (fp32 like the block's); o, silu's input and output, wo's input.
        # The op's own tensors are per sequence and chunk: _mixer_bytes_per_layer.
        inputs = (5 if autocast else 1) * D * a
        return inputs + 2 * (D * a + 2 * h * a) + 8 * h + h * _norm_bytes_per_token(D // h, device) + 4 * D * a
    raise ValueError(
        f"no activation formula for mixer {config.mixer!r}; formulas exist for attention, pooling, conv, sepconv, "
        "fft_conv, linear_attention"
    )


def _linear_attention_op_bytes(B: int, T: int, D: int, h: int, autocast: bool) -> int:
    """Saved bytes of :func:`tilewise.ops.linear_attention`'s chunked PyTorch reference (the CPU path) with a scalar
    gate, for a whole batch: per sequence its fp32 copies, per chunk of ``CHUNK`` tokens the ``[h, C, C]`` scores,
    decays and causal mask, the state, and the chunk's operands (bf16 casts under autocast). Measured on the CPU
    with ``benchmarks/saved_tensors.py``; the Triton kernels (CUDA) save other tensors (unverified).

    The last chunk's state update feeds only the final state, which the mixer drops: its saved tensors are freed
    when the op returns, so they are not counted (a hook counts them at save time; see README.md)."""
    from tilewise.ops.linear_attention.reference import CHUNK

    Dh = D // h
    total = 0
    for start in range(0, T, CHUNK):
        C = min(CHUNK, T - start)
        later = start > 0  # the incoming state requires grad: q's operand is kept for q @ state too
        if autocast:
            # mask; bf16 k^T, q, q @ state, v (twice), (k * decay)^T (+ q again); fp32 decay of the scores, bf16
            # scores and attn; state in bf16 (matmul) and fp32 (decay); gc.exp, (last - gc).exp; last.exp
            total += C * C + (6 + later) * C * D * 2 + h * C * C * (4 + 2 + 2) + h * Dh * Dh * (2 + 4)
        else:
            # mask; scores, their decay, attn [h, C, C]; state; q @ state, (k * decay)^T
            total += C * C + 3 * h * C * C * 4 + h * Dh * Dh * 4 + 2 * C * D * 4
        total += 2 * h * C * 4 + 4 * h
        if start + C == T:  # freed with the dropped final state: the last update's operands
            if autocast:  # fp32 state, bf16 v and (k * decay)^T; the fp32 k copy when no earlier chunk keeps it
                total -= h * Dh * Dh * 4 + 2 * C * D * 2 + (T * D * 4 if start == 0 else 0)
            else:  # (k * decay)^T
                total -= C * D * 4
    per_seq = (1 if autocast else 3) * T * D * 4  # fp32 k (autocast: the only fp32 operand kept); else q * scale, k, v
    return B * (per_seq + total)


def _mixer_bytes_per_layer(config: MetaFormerConfig, recipe: Recipe, a: int, autocast: bool) -> int:
    """Saved bytes of one block's mixer that do not scale with ``B * T``: RoPE tables, convolution padding, kernel
    spectra, the linear-attention op's per-chunk tensors; plus the conv weights' bf16 copies under autocast (not
    ``nn.Linear``, so not in :func:`_activation_bytes`'s weight casts)."""
    B, T, D = recipe.batch_size, recipe.seq_len, config.dim
    p = 4 if recipe.param_dtype == "fp32" else 2
    kw = _mixer_kwargs(config)
    if config.mixer == "attention":
        return 2 * T * (D // config.n_heads) * a  # RoPE cos, sin [T, Dh]
    if config.mixer == "sepconv":
        E, k = int(kw.get("expansion", 2.0) * D), kw.get("kernel_size", 7)
        return B * (k - 1) * E * a + (E * k * 2 if autocast else 0)  # left padding; dwconv weight cast
    if config.mixer == "fft_conv":
        k = kw.get("short_kernel", 3)
        short = B * (k - 1) * 3 * D * a + (3 * D * k * 2 if autocast else 0)  # padding; weight cast
        # the window [D, T] (parameter dtype), the kernel zero-padded to 2T in fp32, its rfft [D, T + 1] complex64;
        # u's rfft has T + 1 bins (the +1 per sequence)
        skip = 4 * D if p != 4 else 0  # skip.to(fp32) when the parameters are bf16
        return short + D * T * p + 8 * D * T + 8 * D * (T + 1) + 8 * B * D + skip
    if config.mixer == "linear_attention":
        return _linear_attention_op_bytes(B, T, D, kw.get("n_heads", config.n_heads), autocast)
    return 0


def _norm_bytes_per_token(D: int, device: str) -> int:
    """Saved bytes per token of one RMSNorm (fp32): input and rstd, plus ``x * rstd`` on the CPU (measured with
    ``benchmarks/saved_tensors.py``: CUDA's fused ``rms_norm`` keeps only the first two)."""
    return 4 * D + 4 + (4 * D if device == "cpu" else 0)


def _block_bytes_per_token(config: MetaFormerConfig, a: int, autocast: bool, device: str = "cuda") -> float:
    """Saved bytes per token of one MetaFormer block in training (no checkpointing)."""
    D, H = config.dim, config.hidden_dim
    norms = 2 * _norm_bytes_per_token(D, device)
    if config.mlp == "swiglu":
        mlp = (2 if autocast else 1) * D * a + 4 * H * a  # input; w1 x, w3 x, silu(w1 x), product
    else:
        mlp = D * a + 2 * H * a  # input; w1 x, gelu(w1 x)
    return norms + _mixer_bytes_per_token(config, a, autocast, device) + mlp


def _activation_bytes(config: MetaFormerConfig, recipe: Recipe, linear_numel: int) -> int:
    """Peak bytes held for backward: per-block saved tensors (or block inputs + one recomputed block), the head."""
    autocast = recipe.autocast_bf16 and recipe.param_dtype != "bf16"
    a = 2 if (autocast or recipe.param_dtype == "bf16") else 4
    p = 4 if recipe.param_dtype == "fp32" else 2
    BT, D, V, L = recipe.batch_size * recipe.seq_len, config.dim, config.vocab_size, config.n_layers
    block = _block_bytes_per_token(config, a, autocast, recipe.device) * BT
    block += _mixer_bytes_per_layer(config, recipe, a, autocast)
    # tokens and targets (int64); final norm; the head's input; log_softmax output in fp32 [B, T, V]
    head = BT * (8 + 8 + _norm_bytes_per_token(D, recipe.device) + D * a + 4 * V)
    head_numel = V * D  # the output projection (or the tied embedding) is cast too
    block_numel = (linear_numel - (0 if config.tie_embeddings else head_numel)) // L
    if recipe.activation_checkpointing:
        blocks, cast_numel = L * BT * D * p + block, block_numel + head_numel
    else:
        blocks, cast_numel = L * block, L * block_numel + head_numel
    casts = 2 * cast_numel if autocast else 0  # autocast's bf16 weight copies, held for backward
    return int(blocks + head + casts)


def estimate(model: str | MetaFormerConfig, recipe: Recipe, *, mixer: str | None = None) -> Breakdown:
    """Predict the training peak of ``model`` under ``recipe`` without allocating (meta device).

    Args:
        model: a name of :data:`tilewise.nn.CONFIGS` or a :class:`MetaFormerConfig`.
        recipe: optimizer, dtypes, batch and sequence, checkpointing; see :class:`Recipe`.
        mixer: replaces the config's token mixer.

    Raises:
        ValueError: for an unknown model, mixer or optimizer name.

    Example:
        >>> from tilewise.memory import Recipe, estimate
        >>> bd = estimate("tiny", Recipe(batch_size=2, seq_len=16))
        >>> print(bd.title)
        tiny (attention, 918,656 params), adamw, fp32, B=2 T=16
        >>> bd.weights == 4 * 918_656, bd.gradients == bd.weights  # fp32 parameters and gradients
        (True, True)
        >>> bd8 = estimate("tiny", Recipe(batch_size=2, seq_len=16, optim="adamw8bit"))
        >>> round(bd.optimizer_state / bd8.optimizer_state, 1)  # 8-bit state (small tensors stay fp32)
        3.9
        >>> ckpt = estimate("small", Recipe(activation_checkpointing=True))
        >>> round(estimate("small", Recipe()).activations / ckpt.activations, 1)  # B=8 T=1024
        5.2
    """
    return _estimate(model, _config(model, mixer), recipe, {})


def _estimate(model: str | MetaFormerConfig, config: MetaFormerConfig, recipe: Recipe, cache: dict) -> Breakdown:
    """:func:`estimate` with the meta model (per parameter dtype) and optimizer bytes kept in ``cache``."""
    if recipe.param_dtype not in cache:
        meta = build_model(config, device="meta", dtype=DTYPES[recipe.param_dtype])
        params = list(meta.parameters())
        linear_numel = sum(m.weight.numel() for m in meta.modules() if isinstance(m, torch.nn.Linear))
        cache[recipe.param_dtype] = (params, linear_numel)
    params, linear_numel = cache[recipe.param_dtype]
    opt_key = (recipe.optim, recipe.param_dtype, recipe.min_quant_numel)
    if opt_key not in cache:
        cache[opt_key] = _optimizer_bytes(params, recipe)
    weights = sum(p.numel() * p.element_size() for p in params)
    name = model if isinstance(model, str) else "custom config"
    title = (
        f"{name} ({config.mixer}, {sum(p.numel() for p in params):,} params), {recipe.optim}, "
        f"{recipe.param_dtype}{' + autocast bf16' if recipe.autocast_bf16 else ''}, "
        f"B={recipe.batch_size} T={recipe.seq_len}"
        f"{f' grad_accum={recipe.grad_accum}' if recipe.grad_accum > 1 else ''}"
        f"{', checkpointing' if recipe.activation_checkpointing else ''}"
    )
    return Breakdown(
        weights=weights,
        gradients=weights,
        optimizer_state=cache[opt_key],
        activations=_activation_bytes(config, recipe, linear_numel),
        other=OTHER_ALLOWANCE,
        title=title,
    )


_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"24GiB"``, ``"80GB"``, ``"16000MiB"``, ``"1.5 GiB"`` or ``"25769803776"``.

    Units (case-insensitive): ``B``; decimal ``KB``, ``MB``, ``GB``, ``TB`` (powers of 1000); binary ``KiB``,
    ``MiB``, ``GiB``, ``TiB`` (powers of 1024). A number without a unit is bytes. The result is rounded down to
    whole bytes.

    Raises:
        ValueError: for anything else, or a size below one byte.

    Example:
        >>> from tilewise.memory import parse_size
        >>> parse_size("24GiB"), parse_size("80GB"), parse_size("1.5 kib"), parse_size("4096")
        (25769803776, 80000000000, 1536, 4096)
        >>> parse_size("24 gigs")
        Traceback (most recent call last):
        ...
        ValueError: invalid size '24 gigs': use a number of bytes or a number with a unit, e.g. 24GiB, ...
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: use a number of bytes or a number with a unit, e.g. 24GiB, 80GB, 16000MiB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    value = int(Decimal(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least one byte")
    return value


# The search axes of fit_recipe, each in order of increasing cost to training quality or speed.
_ADAM_CHAIN: tuple[str, ...] = ("tw-adamw", "adamw8bit", "adamw4bit")


def _optim_steps(optim: str) -> list[str]:
    """The user's optimizer, then the cheaper-state AdamW variants after it; Lion and SGD are kept as given."""
    if optim == "adamw":
        return [optim, *_ADAM_CHAIN]
    if optim in _ADAM_CHAIN:
        return list(_ADAM_CHAIN[_ADAM_CHAIN.index(optim) :])
    return [optim]


def _dtype_steps(param_dtype: str, autocast: bool) -> list[tuple[str, bool]]:
    """The user's (parameter dtype, autocast), then fp32 + bf16 autocast, then bf16 parameters."""
    if param_dtype == "bf16":
        return [("bf16", autocast)]
    if autocast:
        return [("fp32", True), ("bf16", False)]
    return [("fp32", False), ("fp32", True), ("bf16", False)]


def _batch_steps(batch_size: int, grad_accum: int) -> list[tuple[int, int]]:
    """(micro-batch, grad_accum): the user's, then halving while it divides exactly, then 1; tokens per step kept."""
    steps = [(batch_size, grad_accum)]
    b = batch_size
    while b > 1:
        b = b // 2 if b % 2 == 0 else 1
        steps.append((b, grad_accum * batch_size // b))
    return steps


def fit_recipe(
    model: str | MetaFormerConfig, budget_bytes: int, *, base: Recipe, mixer: str | None = None
) -> list[tuple[Recipe, Breakdown]]:
    """Recipes near ``base`` whose predicted total (:func:`estimate`) is at most ``budget_bytes``, best first.

    The search varies four knobs, each along its own steps, ordered from least to most cost to training quality
    or speed:

    1. optimizer state: ``base.optim``, then the AdamW variants after it in ``tw-adamw`` (fp32 state) ->
       ``adamw8bit`` -> ``adamw4bit`` (from ``adamw``, all three); ``lion8bit`` and ``sgd`` are kept as given;
    2. parameter dtype: the base's, then fp32 parameters under bf16 autocast, then bf16 parameters;
    3. activation checkpointing: the base's, then on;
    4. micro-batch size: the base's, halved while it divides exactly (then 1), ``grad_accum`` raised so that
       ``batch_size * grad_accum`` (the tokens per step, with ``seq_len``) stays the same.

    Ordering rule: fewest knobs changed from ``base`` first; among recipes with as many changes, the one that went
    least far along the costliest knob first (micro-batch, then checkpointing, then dtype, then optimizer: the
    steps compared as a tuple in that order). So ``base`` itself comes first when it fits, and a recipe that only
    swaps the optimizer state beats one that only turns on checkpointing.

    The estimate sums the categories, an upper bound on the peak (on an H100, measured peaks were within 3% of it
    without checkpointing; with checkpointing the estimate ran 11-12% high: BENCHMARKS.md), and leaves out the
    CUDA context (~0.5 GiB): keep some headroom in ``budget_bytes``.

    Returns:
        ``(recipe, breakdown)`` pairs that fit, best first; empty when nothing in the search fits (the smallest
        total is then :func:`smallest_recipe`'s).

    Raises:
        ValueError: for an unknown model or mixer, or a mixer without an activation formula.

    Example:
        >>> from tilewise.memory import Recipe, estimate, fit_recipe, parse_size
        >>> base = Recipe(batch_size=8, seq_len=1024)
        >>> budget = parse_size("8GiB")
        >>> estimate("base", base).total <= budget
        False
        >>> fits = fit_recipe("base", budget, base=base)
        >>> best, bd = fits[0]  # the fewest changes: only the optimizer state, now 8-bit
        >>> best.optim, best.param_dtype, best.activation_checkpointing, best.batch_size, bd.total <= budget
        ('adamw8bit', 'fp32', False, 8, True)
        >>> fit_recipe("tiny", parse_size("64MiB"), base=base)  # the 64 MiB allowance for `other` alone fills it
        []
    """
    ranked = sorted(_search(model, base, mixer), key=lambda row: row[0])
    return [(recipe, bd) for _, recipe, bd in ranked if bd.total <= budget_bytes]


def smallest_recipe(
    model: str | MetaFormerConfig, *, base: Recipe, mixer: str | None = None
) -> tuple[Recipe, Breakdown]:
    """The recipe with the smallest predicted total in :func:`fit_recipe`'s search (ties: the best ranked).

    Example:
        >>> from tilewise.memory import Recipe, smallest_recipe
        >>> recipe, bd = smallest_recipe("base", base=Recipe(batch_size=8, seq_len=1024))
        >>> recipe.optim, recipe.param_dtype, recipe.activation_checkpointing, recipe.batch_size, recipe.grad_accum
        ('adamw4bit', 'bf16', True, 1, 8)
        >>> round(bd.total / 2**30, 2)  # GiB: every knob at the far end of its steps
        0.66
    """
    ranked = sorted(_search(model, base, mixer), key=lambda row: (row[2].total, row[0]))
    return ranked[0][1], ranked[0][2]


def _search(
    model: str | MetaFormerConfig, base: Recipe, mixer: str | None
) -> list[tuple[tuple[int, ...], Recipe, Breakdown]]:
    config = _config(model, mixer)
    cache: dict = {}
    rows = []
    optims = _optim_steps(base.optim)
    dtypes = _dtype_steps(base.param_dtype, base.autocast_bf16)
    ckpts = [base.activation_checkpointing] + ([True] if not base.activation_checkpointing else [])
    batches = _batch_steps(base.batch_size, base.grad_accum)
    for i_b, (batch_size, grad_accum) in enumerate(batches):
        for i_c, ckpt in enumerate(ckpts):
            for i_d, (param_dtype, autocast) in enumerate(dtypes):
                for i_o, optim in enumerate(optims):
                    recipe = dataclasses.replace(
                        base,
                        optim=optim,
                        param_dtype=param_dtype,
                        autocast_bf16=autocast,
                        activation_checkpointing=ckpt,
                        batch_size=batch_size,
                        grad_accum=grad_accum,
                    )
                    steps = (i_b, i_c, i_d, i_o)
                    key = (sum(1 for i in steps if i > 0), *steps)
                    rows.append((key, recipe, _estimate(model, config, recipe, cache)))
    return rows


def format_command(
    command: str, model: str | MetaFormerConfig, recipe: Recipe, *, mixer: str | None = None
) -> tuple[str, str | None]:
    """``recipe`` as a ``tilewise train`` or ``tilewise plan`` command line (``command``), and a caveat or None.

    ``tilewise train`` has no parameter-dtype flag: it trains fp32 parameters, under bf16 autocast on CUDA only,
    and offers the AdamW/Lion optimizers; the caveat says where the recipe needs more than its flags.

    Example:
        >>> from tilewise.memory import Recipe, format_command
        >>> recipe = Recipe(optim="adamw8bit", autocast_bf16=True, batch_size=4, grad_accum=2)
        >>> format_command("plan", "small", recipe)
        ('tilewise plan --model small --optim adamw8bit --batch-size 4 --seq-len 1024 --grad-accum 2 --autocast', None)
        >>> format_command("train", "small", recipe)  # train autocasts on CUDA by itself
        ('tilewise train --model small --optim adamw8bit --batch-size 4 --seq-len 1024 --grad-accum 2', None)
        >>> format_command("train", "small", Recipe(optim="sgd", autocast_bf16=True))[1]
        'tilewise train does not offer --optim sgd: use your own loop'
    """
    if command not in ("train", "plan"):
        raise ValueError(f"command must be 'train' or 'plan', got {command!r}")
    name = model if isinstance(model, str) else "<custom config>"
    parts = ["tilewise", command, "--model", name]
    if mixer is not None:
        parts += ["--mixer", mixer]
    parts += ["--optim", recipe.optim, "--batch-size", str(recipe.batch_size), "--seq-len", str(recipe.seq_len)]
    if recipe.grad_accum > 1:
        parts += ["--grad-accum", str(recipe.grad_accum)]
    caveat = None
    if command == "train":
        if recipe.activation_checkpointing:
            parts.append("--activation-checkpointing")
        if recipe.device == "cpu":
            parts += ["--device", "cpu"]
        from tilewise.train.trainer import OPTIMIZERS as TRAIN_OPTIMIZERS

        if recipe.param_dtype != "fp32":
            caveat = "tilewise train has no flag for bf16 parameters (it trains fp32 parameters): use your own loop"
        elif recipe.optim not in TRAIN_OPTIMIZERS:
            caveat = f"tilewise train does not offer --optim {recipe.optim}: use your own loop"
        elif recipe.autocast_bf16 != (recipe.device == "cuda"):
            caveat = (
                "tilewise train uses bf16 autocast on CUDA and none on the CPU, so its memory differs from this "
                "recipe's"
            )
    else:
        if recipe.param_dtype != "fp32":
            parts += ["--dtype", recipe.param_dtype]
        if recipe.autocast_bf16:
            parts.append("--autocast")
        if recipe.activation_checkpointing:
            parts.append("--checkpointing")
        if recipe.device != "cuda":
            parts += ["--device", recipe.device]
    return " ".join(parts), caveat


BUDGET_NOTE = (
    "Totals are the plain sum of the categories, an upper bound on the peak: on an H100, measured peaks were within "
    "3% of it without activation checkpointing, and with checkpointing the estimate ran 11-12% high (BENCHMARKS.md); "
    "the CUDA context (~0.5 GiB) is not included."
)


def _human(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def plan_main(argv: list[str] | None = None) -> int:
    """``tilewise plan``: print the predicted breakdown for a model and recipe; returns the exit status.

    With ``--budget SIZE`` it also says whether the recipe fits and prints the best fitting recipe of
    :func:`fit_recipe` as ``tilewise train`` / ``tilewise plan`` command lines with its breakdown. Exit status: 0
    when the breakdown is printed and, with ``--budget``, some recipe fits; 1 when nothing in the search fits the
    budget; 2 for bad arguments.

    Example:
        >>> import contextlib
        >>> import io
        >>> from tilewise.memory import plan_main
        >>> plan_main(["--model", "tiny", "--batch-size", "4", "--seq-len", "256", "--device", "cpu"])
        tiny (attention, 918,656 params), adamw, fp32, B=4 T=256
        category                  MiB       GiB      %
        weights                   3.5     0.003    2.8
        gradients                 3.5     0.003    2.8
        optimizer_state           7.0     0.007    5.6
        activations              46.9     0.046   37.5
        other                    64.0     0.062   51.2
        total                   124.9     0.122  100.0
        0
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     status = plan_main(["--model", "base", "--budget", "8GiB"])
        >>> status, [line.strip() for line in out.getvalue().splitlines() if line.startswith("  tilewise train")]
        (0, ['tilewise train --model base --optim adamw8bit --batch-size 8 --seq-len 1024'])
        >>> plan_main(["--optim", "adam"])
        tilewise plan: error: unknown optim 'adam'; use one of adamw, tw-adamw, adamw8bit, adamw4bit, lion8bit, sgd
        2
    """
    parser = argparse.ArgumentParser(prog="tilewise plan", description="Predict training memory (no allocation).")
    parser.add_argument("--model", default="tiny", help=f"named config: {', '.join(CONFIGS)}")
    parser.add_argument("--optim", default="adamw", help=f"optimizer: {', '.join(OPTIMIZERS)}")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="parameter dtype")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast for fp32 parameters")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--mixer", default=None, help=f"token mixer: {', '.join(sorted(MIXERS))}")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the run will train")
    parser.add_argument(
        "--budget",
        metavar="SIZE",
        help="memory per GPU, e.g. 24GiB, 80GB, 16000MiB or bytes: say whether the recipe fits and find one that does",
    )
    args = parser.parse_args(argv)
    try:
        budget = parse_size(args.budget) if args.budget is not None else None
        recipe = Recipe(
            optim=args.optim,
            param_dtype=args.dtype,
            autocast_bf16=args.autocast,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            activation_checkpointing=args.checkpointing,
            grad_accum=args.grad_accum,
            device=args.device,
        )
        breakdown = estimate(args.model, recipe, mixer=args.mixer)
        fits = fit_recipe(args.model, budget, base=recipe, mixer=args.mixer) if budget is not None else []
    except ValueError as err:
        print(f"tilewise plan: error: {err}")
        return 2
    print(breakdown.format_table())
    if budget is None:
        return 0
    verdict = "fits" if breakdown.total <= budget else "does not fit"
    print(f"\nBudget {budget:,} bytes ({_human(budget)}): this recipe {verdict} ({_human(breakdown.total)} predicted).")
    if not fits:
        smallest, small_bd = smallest_recipe(args.model, base=recipe, mixer=args.mixer)
        print(f"Nothing fits: the smallest total found is {_human(small_bd.total)} ({small_bd.total:,} bytes), for:")
        print(f"  {format_command('plan', args.model, smallest, mixer=args.mixer)[0]}")
        print("Try a shorter --seq-len, a smaller model, or sharding over GPUs (tilewise train --dist fsdp).")
        print(BUDGET_NOTE)
        return 1
    best, best_bd = fits[0]
    label = "the recipe as given" if best == recipe else "fewest changes from the recipe as given"
    print(f"Best fitting recipe ({label}; {len(fits)} of the searched recipes fit):")
    train_cmd, caveat = format_command("train", args.model, best, mixer=args.mixer)
    print(f"  {train_cmd}")
    if caveat:
        print(f"  (note: {caveat})")
    print(f"  {format_command('plan', args.model, best, mixer=args.mixer)[0]}")
    if best != recipe:
        print()
        print(best_bd.format_table())
    print(BUDGET_NOTE)
    return 0
