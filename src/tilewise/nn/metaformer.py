"""MetaFormer language models: embedding -> N x (norm -> mixer -> residual; norm -> MLP -> residual) -> head.

The token mixer is looked up by name in :data:`tilewise.nn.mixers.MIXERS`; with ``"attention"``, SwiGLU and
RMSNorm the model is LLaMA. Named sizes live in :data:`CONFIGS`: ``tiny`` (the CPU default), ``small``,
``base`` on a byte vocabulary (256), and LLaMA-shaped ``llama-1b``, ``llama-3b``, ``llama-7b`` (vocab 32000)
that build on the meta device for planning.

Example:
    >>> import math
    >>> import torch
    >>> from tilewise.nn import build_model
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("tiny")
    >>> idx = torch.randint(0, 256, (2, 16))
    >>> model(idx).shape
    torch.Size([2, 16, 256])
    >>> loss = model(idx[:, :-1], targets=idx[:, 1:])
    >>> abs(loss.item() - math.log(256)) < 0.1  # near-uniform predictions at init
    True
    >>> big = build_model("llama-7b", device="meta")  # no memory allocated
    >>> big.num_params()
    6738415616
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tilewise.nn.layers import StarReLU
from tilewise.nn.mixers import MIXERS, build_mixer

__all__ = ["CONFIGS", "MLP", "MetaFormerBlock", "MetaFormerConfig", "MetaFormerLM", "build_model", "build_on_meta"]

# Settings a mixer gets from the config when its constructor declares them.
_MIXER_CONTEXT = ("n_heads", "n_kv_heads", "rope_theta", "max_seq_len", "dropout")


@dataclass(frozen=True)
class MetaFormerConfig:
    """Shape and options of a :class:`MetaFormerLM`.

    Args:
        vocab_size: vocabulary ``V``; default 256 (bytes).
        dim: model width ``D``.
        n_layers: MetaFormer blocks.
        n_heads: attention heads (used by mixers that have heads).
        n_kv_heads: key/value heads for grouped-query attention; ``None`` means ``n_heads``.
        mlp_ratio: MLP hidden width as a multiple of ``dim`` when ``mlp_hidden`` is ``None``; for SwiGLU the
            width is ``2/3`` of it (LLaMA), rounded up to ``multiple_of``.
        mlp_hidden: explicit MLP hidden width; overrides ``mlp_ratio``.
        multiple_of: rounding of the derived MLP hidden width.
        mlp: ``"swiglu"`` (LLaMA), ``"gelu"`` or ``"starrelu"`` (``s * relu(x)**2 + b``, MetaFormer Baselines;
            same saved activations as GELU).
        norm: ``"rmsnorm"`` or ``"layernorm"``.
        norm_eps: epsilon of the norms.
        max_seq_len: longest sequence ``forward`` accepts.
        rope_theta: RoPE base for attention.
        mixer: token-mixer name, a key of ``MIXERS``.
        mixer_kwargs: extra constructor arguments of the mixer (e.g. ``{"window": 3}``).
        tie_embeddings: the head reuses the embedding matrix.
        dropout: residual and attention dropout in training.

    Example:
        >>> from tilewise.nn import MetaFormerConfig
        >>> config = MetaFormerConfig(dim=64, n_layers=2, mixer="conv", mixer_kwargs={"kernel_size": 3})
        >>> config.hidden_dim  # SwiGLU: 2/3 of 4 * 64 = 170, rounded up to a multiple of 64
        192
        >>> MetaFormerConfig(dim=64, mlp="gelu").hidden_dim  # 4 * 64
        256
        >>> MetaFormerConfig(norm="batchnorm")
        Traceback (most recent call last):
        ...
        ValueError: norm must be 'rmsnorm' or 'layernorm', got 'batchnorm'
    """

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    mlp_hidden: int | None = None
    multiple_of: int = 64
    mlp: Literal["swiglu", "gelu", "starrelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    mixer: str = "attention"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    tie_embeddings: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mlp not in ("swiglu", "gelu", "starrelu"):
            raise ValueError(f"mlp must be 'swiglu', 'gelu' or 'starrelu', got {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def hidden_dim(self) -> int:
        """The MLP hidden width: ``mlp_hidden``, else ``mlp_ratio * dim`` (x 2/3 for SwiGLU) rounded up."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = int(self.mlp_ratio * self.dim)
        if self.mlp == "swiglu":
            hidden = int(2 * hidden / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# Byte-level sizes; the LLaMA ones follow published shapes (TinyLlama-1.1B, OpenLLaMA-3B, LLaMA-7B).
CONFIGS: dict[str, MetaFormerConfig] = {
    "tiny": MetaFormerConfig(dim=128, n_layers=4, n_heads=4, max_seq_len=256),
    "small": MetaFormerConfig(dim=512, n_layers=8, n_heads=8, mlp_hidden=1376, max_seq_len=1024),
    "base": MetaFormerConfig(dim=768, n_layers=12, n_heads=12, mlp_hidden=3072, max_seq_len=1024),
    "llama-1b": MetaFormerConfig(
        vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_hidden=5632, max_seq_len=2048
    ),
    "llama-3b": MetaFormerConfig(
        vocab_size=32000, dim=3200, n_layers=26, n_heads=32, mlp_hidden=8640, norm_eps=1e-6, max_seq_len=2048
    ),
    "llama-7b": MetaFormerConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, mlp_hidden=11008, norm_eps=1e-6, max_seq_len=2048
    ),
}


def _norm(config: MetaFormerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class MLP(nn.Module):
    """Channel MLP without biases: SwiGLU ``w2(silu(w1 x) * w3 x)``, GELU ``w2(gelu(w1 x))`` or StarReLU
    ``w2(s * relu(w1 x)**2 + b)``.

    Shapes: ``x [B, T, D] -> [B, T, D]``, hidden ``[B, T, config.hidden_dim]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import MLP, MetaFormerConfig
        >>> _ = torch.manual_seed(0)
        >>> mlp = MLP(MetaFormerConfig(dim=32, mlp="starrelu", mlp_ratio=2.0))
        >>> mlp.w1.weight.shape, mlp.w3  # hidden width 2 * 32; no gate branch outside SwiGLU
        (torch.Size([64, 32]), None)
        >>> x = torch.randn(2, 5, 32)
        >>> y = mlp(x)
        >>> y.shape
        torch.Size([2, 5, 32])
        >>> x[:, 0] += 1.0  # a channel MLP works per token: the others do not change
        >>> torch.allclose(mlp(x)[:, 1:], y[:, 1:])
        True
        >>> sum(p.numel() for p in MLP(MetaFormerConfig(dim=32)).parameters())  # SwiGLU: 3 matrices of 32 x 128
        12288
    """

    def __init__(self, config: MetaFormerConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False) if self.kind == "swiglu" else None
        self.act = StarReLU() if self.kind == "starrelu" else None
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w2.residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.act is not None:
            return self.w2(self.act(self.w1(x)))
        return self.w2(F.gelu(self.w1(x)))


def _mixer_kwargs(config: MetaFormerConfig) -> dict[str, Any]:
    """The config's settings that the mixer's constructor declares, overridden by ``config.mixer_kwargs``."""
    kwargs: dict[str, Any] = {}
    factory = MIXERS.get(config.mixer)
    if factory is not None:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for name in _MIXER_CONTEXT:
            if takes_any or name in params:
                kwargs[name] = getattr(config, name)
    return {**kwargs, **config.mixer_kwargs}


class MetaFormerBlock(nn.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``. Shapes: ``[B, T, D] -> [B, T, D]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import MetaFormerBlock, MetaFormerConfig
        >>> _ = torch.manual_seed(0)
        >>> block = MetaFormerBlock(MetaFormerConfig(dim=32, n_heads=2, mixer="attention"))
        >>> type(block.mixer).__name__, block.mixer.n_heads  # the mixer gets n_heads from the config
        ('CausalAttention', 2)
        >>> x = torch.randn(2, 6, 32)
        >>> y = block(x)
        >>> y.shape
        torch.Size([2, 6, 32])
        >>> x[:, 4] += 1.0  # change token 4: tokens 0-3 do not see it, token 4 on does
        >>> y2 = block(x)
        >>> torch.allclose(y2[:, :4], y[:, :4], atol=1e-6), torch.allclose(y2[:, 4:], y[:, 4:])
        (True, False)
    """

    def __init__(self, config: MetaFormerConfig) -> None:
        super().__init__()
        self.mixer_norm = _norm(config)
        self.mixer = build_mixer(config.mixer, config.dim, **_mixer_kwargs(config))
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.mixer(self.mixer_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class MetaFormerLM(nn.Module):
    """A decoder-only MetaFormer language model.

    Weights: every ``nn.Linear`` and the embedding ~ N(0, 0.02); linears marked ``residual_proj`` (attention
    output, MLP down projection) ~ N(0, 0.02 / sqrt(2 * n_layers)); norms and other modules use their own
    ``reset_parameters``. :meth:`init_weights` redoes all of it, so a model built on the meta device is
    materialized with ``model.to_empty(device=...)`` then ``model.init_weights()``.

    Args:
        config: the shape; see :class:`MetaFormerConfig`.

    Example:
        >>> import torch
        >>> from tilewise.nn import CONFIGS, MetaFormerLM
        >>> model = MetaFormerLM(CONFIGS["tiny"])
        >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
        torch.Size([1, 8, 256])
    """

    def __init__(self, config: MetaFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(MetaFormerBlock(config) for _ in range(config.n_layers))
        self.norm = _norm(config)
        # Tied: no second parameter, so the state_dict has no shared tensor (safetensors refuses those).
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter; also the way to materialize a meta-device model after ``to_empty``."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, "residual_proj", False) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def reset_parameters(self) -> None:
        """Alias of :meth:`init_weights`."""
        self.init_weights()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (works on the meta device); optionally without the token-embedding matrix."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embeddings else total

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` for token ids ``idx [B, T]``; with ``targets [B, T]``, the mean cross-entropy.

        Args:
            idx: integer token ids in ``[0, vocab_size)``, ``[B, T]`` with ``T <= max_seq_len``.
            targets: next-token ids ``[B, T]``; ``-100`` entries are ignored. When given, returns the scalar
                loss (computed in fp32) instead of the logits.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx must be an integer tensor [B, T], got dtype {idx.dtype} and shape {tuple(idx.shape)}"
            )
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds max_seq_len={self.config.max_seq_len}; "
                "crop the input or build the model with a larger max_seq_len"
            )
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        logits = self.output(x) if self.output is not None else F.linear(x, self.tok_embeddings.weight)
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def build_model(
    name_or_config: str | MetaFormerConfig,
    *,
    mixer: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MetaFormerLM:
    """Build a :class:`MetaFormerLM` from a name in :data:`CONFIGS` or a config.

    The model is built on the meta device and, unless ``device="meta"``, materialized on ``device`` and
    initialized there (once, in fp32, then cast to ``dtype``). On ``"meta"`` nothing is allocated: use it to
    count parameters or plan memory.

    Args:
        name_or_config: ``"tiny"``, ``"small"``, ``"base"``, ``"llama-1b"``, ``"llama-3b"``, ``"llama-7b"`` or a
            :class:`MetaFormerConfig`.
        mixer: replaces the config's token mixer (e.g. ``"pooling"``).
        device: where the weights live; default CPU.
        dtype: parameter dtype; default fp32.

    Raises:
        ValueError: for an unknown config name or mixer (the message lists the valid ones).

    Example:
        >>> import torch
        >>> from tilewise.nn import MetaFormerConfig, build_model
        >>> _ = torch.manual_seed(0)
        >>> config = MetaFormerConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16)
        >>> model = build_model(config, mixer="sepconv")
        >>> type(model.layers[0].mixer).__name__
        'CausalSepConv'
        >>> model(torch.randint(0, 256, (3, 10))).shape  # [B, T, vocab_size]
        torch.Size([3, 10, 256])
        >>> build_model(config, dtype=torch.bfloat16).output.weight.dtype
        torch.bfloat16
        >>> build_model("huge")
        Traceback (most recent call last):
        ...
        ValueError: unknown config 'huge'; named configs are: tiny, small, base, llama-1b, llama-3b, llama-7b
    """
    if isinstance(name_or_config, str):
        if name_or_config not in CONFIGS:
            raise ValueError(f"unknown config {name_or_config!r}; named configs are: {', '.join(CONFIGS)}")
        config = CONFIGS[name_or_config]
    elif isinstance(name_or_config, MetaFormerConfig):
        config = name_or_config
    else:
        raise TypeError(f"name_or_config must be a str or MetaFormerConfig, got {type(name_or_config).__name__}")
    if mixer is not None:
        config = dataclasses.replace(config, mixer=mixer)
    return build_on_meta(lambda: MetaFormerLM(config), device, dtype)


_Model = TypeVar("_Model", bound=nn.Module)


def build_on_meta(
    factory: Callable[[], _Model], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> _Model:
    """Run ``factory()`` on the meta device, then (unless ``device="meta"``) materialize the model on ``device``
    (default CPU) with ``to_empty`` + its ``init_weights()`` (in fp32), and cast it to ``dtype``.

    Example:
        >>> import torch
        >>> from tilewise.nn import CONFIGS, MetaFormerConfig, MetaFormerLM, build_on_meta
        >>> big = build_on_meta(lambda: MetaFormerLM(CONFIGS["llama-1b"]), device="meta")  # allocates nothing
        >>> big.output.weight.device, big.num_params()  # TinyLlama's 1.1B
        (device(type='meta'), 1100048384)
        >>> _ = torch.manual_seed(0)
        >>> small = build_on_meta(lambda: MetaFormerLM(MetaFormerConfig(dim=32, n_layers=2, n_heads=2)))
        >>> w = small.output.weight  # materialized on the CPU and initialized ~ N(0, 0.02)
        >>> w.device, round(w.std().item(), 2)
        (device(type='cpu'), 0.02)
    """
    with torch.device("meta"):
        model = factory()
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model.to(dtype) if dtype is not None else model
