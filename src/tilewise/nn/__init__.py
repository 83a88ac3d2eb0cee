"""Modules: MetaFormer language models, the causal token mixers they are built from, and image MetaFormers
(PoolFormer / ConvFormer / CAFormer) with their 2-D mixers.

Example:
    >>> import torch
    >>> import tilewise.nn
    >>> _ = torch.manual_seed(0)
    >>> model = tilewise.nn.build_model("tiny", mixer="pooling")
    >>> model(torch.randint(0, 256, (2, 32))).shape  # next-byte logits
    torch.Size([2, 32, 256])
    >>> net = tilewise.nn.build_image_model("caformer-tiny")
    >>> net(torch.randn(4, 1, 8, 8)).shape  # class logits
    torch.Size([4, 10])
"""

from tilewise.nn.layers import StarReLU, star_relu
from tilewise.nn.metaformer import (
    CONFIGS,
    MLP,
    MetaFormerBlock,
    MetaFormerConfig,
    MetaFormerLM,
    build_model,
    build_on_meta,
)
from tilewise.nn.mixers import (
    MIXERS,
    CausalAttention,
    CausalConv,
    CausalPooling,
    CausalSepConv,
    GatedLinearAttention,
    LongConv,
    apply_rope,
    build_mixer,
    register_mixer,
    rope_cos_sin,
)
from tilewise.nn.vision import (
    IMAGE_CONFIGS,
    IMAGE_MIXERS,
    Attention2d,
    GroupNorm1,
    MetaFormerImage,
    MetaFormerImageBlock,
    MetaFormerImageConfig,
    Pooling2d,
    SepConv2d,
    build_image_model,
)

__all__ = [
    "CONFIGS",
    "IMAGE_CONFIGS",
    "IMAGE_MIXERS",
    "MIXERS",
    "MLP",
    "Attention2d",
    "CausalAttention",
    "CausalConv",
    "CausalPooling",
    "CausalSepConv",
    "GatedLinearAttention",
    "GroupNorm1",
    "LongConv",
    "MetaFormerBlock",
    "MetaFormerConfig",
    "MetaFormerImage",
    "MetaFormerImageBlock",
    "MetaFormerImageConfig",
    "MetaFormerLM",
    "Pooling2d",
    "SepConv2d",
    "StarReLU",
    "apply_rope",
    "build_image_model",
    "build_mixer",
    "build_model",
    "build_on_meta",
    "register_mixer",
    "rope_cos_sin",
    "star_relu",
]
