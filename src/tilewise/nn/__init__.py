"""Modules: MetaFormer language models and the causal token mixers they are built from.

Example:
    >>> model = tilewise.nn.build_model("tiny", mixer="pooling")
    >>> logits = model(torch.randint(0, 256, (2, 32)))  # [2, 32, 256]
"""

from tilewise.nn.metaformer import CONFIGS, MLP, MetaFormerBlock, MetaFormerConfig, MetaFormerLM, build_model
from tilewise.nn.mixers import (
    MIXERS,
    CausalAttention,
    CausalConv,
    CausalPooling,
    apply_rope,
    build_mixer,
    register_mixer,
    rope_cos_sin,
)

__all__ = [
    "CONFIGS",
    "MIXERS",
    "MLP",
    "CausalAttention",
    "CausalConv",
    "CausalPooling",
    "MetaFormerBlock",
    "MetaFormerConfig",
    "MetaFormerLM",
    "apply_rope",
    "build_mixer",
    "build_model",
    "register_mixer",
    "rope_cos_sin",
]
