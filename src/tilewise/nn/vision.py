"""Image MetaFormers: PoolFormer, ConvFormer and CAFormer (arXiv:2111.11418, 2210.13452) and their 2-D mixers.

A model is a stem convolution, stages of MetaFormer blocks at falling resolution (a strided 3x3 convolution
between stages), then global average pooling, a norm and a classifier. Images come in channels first
``[B, C, H, W]``; inside the stages tensors are channels last ``[B, H, W, C]`` (as in the MetaFormer authors'
code), so the per-pixel layers are plain ``nn.Linear``/``nn.LayerNorm`` over ``C``: on a CPU the backward of a 1x1
``Conv2d`` on these small maps took 5x as long as the same ``Linear``. The norms are LayerNorm over the channels of
each pixel, or PoolFormer's ``GroupNorm(1, C)`` (:class:`GroupNorm1`, over ``H, W, C``). A stage's mixer is named in
:data:`IMAGE_MIXERS`: ``"pooling"`` (PoolFormer), ``"sepconv"`` (ConvFormer), ``"attention"`` (CAFormer's late
stages), ``"identity"``.

Named configs in :data:`IMAGE_CONFIGS`: ``poolformer-tiny``, ``convformer-tiny``, ``caformer-tiny`` (1-channel 8x8
images, 10 classes: sized for scikit-learn's digits, they train on a CPU in seconds) and the published
``poolformerv2-s12``, ``convformer-s18``, ``caformer-s18`` (ImageNet, 224x224; build them on ``"meta"`` to plan).

Example:
    >>> import torch
    >>> from tilewise.nn import build_image_model
    >>> net = build_image_model("convformer-tiny")
    >>> net(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> build_image_model("caformer-s18", device="meta").num_params()  # the paper's 26M
    26341656
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tilewise.nn.layers import StarReLU
from tilewise.nn.metaformer import build_on_meta

__all__ = [
    "IMAGE_CONFIGS",
    "IMAGE_MIXERS",
    "Attention2d",
    "GroupNorm1",
    "MetaFormerImage",
    "MetaFormerImageBlock",
    "MetaFormerImageConfig",
    "Pooling2d",
    "SepConv2d",
    "build_image_model",
]


class Pooling2d(nn.Module):
    """PoolFormer's mixer: ``avgpool(x) - x``, a ``pool_size`` square window of stride 1 averaging only the pixels
    inside the image (``count_include_pad=False``). The block adds ``x`` back. No parameters.

    Shapes: channels-last ``x [B, H, W, C] -> [B, H, W, C]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import Pooling2d
        >>> pool = Pooling2d(3, pool_size=3)
        >>> pool(torch.ones(1, 4, 4, 3)).abs().max().item()  # constant image: 0, borders included
        0.0
        >>> x = torch.zeros(1, 5, 5, 1)
        >>> x[0, 2, 2, 0] = 9.0  # one bright pixel
        >>> y = pool(x)
        >>> y.shape, y[0, 2, 2, 0].item(), y[0, 1, 1, 0].item(), y[0, 0, 0, 0].item()  # 9/9 - 9, 9/9 - 0, 0
        (torch.Size([1, 5, 5, 1]), -8.0, 1.0, 0.0)
    """

    def __init__(self, dim: int, pool_size: int = 3) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd integer (a centred window), got {pool_size}")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool_size
        pooled = F.avg_pool2d(_nchw(x), p, stride=1, padding=p // 2, count_include_pad=False)
        return _nhwc(pooled) - x


class SepConv2d(nn.Module):
    """ConvFormer's mixer, MobileNetV2's inverted separable convolution: pointwise to ``expansion * C`` channels,
    StarReLU, depthwise ``kernel_size`` square convolution, pointwise back to ``C``; no biases.

    Shapes: channels-last ``x [B, H, W, C] -> [B, H, W, C]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import SepConv2d
        >>> _ = torch.manual_seed(0)
        >>> mixer = SepConv2d(8, kernel_size=3)
        >>> mixer.dw.weight.shape  # depthwise over 2 * 8 hidden channels
        torch.Size([16, 1, 3, 3])
        >>> x = torch.randn(2, 6, 6, 8)
        >>> y = mixer(x)
        >>> y.shape
        torch.Size([2, 6, 6, 8])
        >>> x[:, 0, 0] += 1.0  # change the top-left pixel: a 3x3 kernel reaches 1 pixel away only
        >>> y2 = mixer(x)
        >>> torch.allclose(y2[:, 2:, :], y[:, 2:, :]), torch.allclose(y2[:, 1, 1], y[:, 1, 1])
        (True, False)
    """

    def __init__(self, dim: int, kernel_size: int = 7, expansion: float = 2.0) -> None:
        super().__init__()
        hidden = int(expansion * dim)
        self.pw1 = nn.Linear(dim, hidden, bias=False)
        self.act = StarReLU()
        self.dw = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False)
        self.pw2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(_nhwc(self.dw(_nchw(self.act(self.pw1(x))))))


class Attention2d(nn.Module):
    """Full (non-causal) multi-head self-attention over the ``H * W`` pixels as tokens, as in CAFormer; heads of
    ``head_dim`` channels (``max(1, C // head_dim)`` of them), no biases, no positional encoding (the convolutional
    stages before it give position).

    Shapes: channels-last ``x [B, H, W, C] -> [B, H, W, C]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import Attention2d
        >>> _ = torch.manual_seed(0)
        >>> attn = Attention2d(32, head_dim=8)
        >>> attn.n_heads
        4
        >>> x = torch.randn(2, 4, 4, 32)
        >>> y = attn(x)
        >>> y.shape
        torch.Size([2, 4, 4, 32])
        >>> torch.allclose(attn(x.flip(1, 2)), y.flip(1, 2), atol=1e-6)  # no position: moving pixels moves outputs
        True
        >>> x[:, 0, 0] += 1.0  # every pixel attends to every other one, even the farthest
        >>> torch.allclose(attn(x)[:, 3, 3], y[:, 3, 3])
        False
    """

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        self.n_heads = max(1, dim // head_dim)
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * self.n_heads * head_dim, bias=False)
        self.proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).view(B, H * W, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, HW, head_dim]
        return self.proj(y.transpose(1, 2).reshape(B, H, W, self.n_heads * self.head_dim))


class _Identity(nn.Module):
    """IdentityFormer's mixer (the block reduces to its MLP)."""

    def __init__(self, dim: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C] -> [B, C, H, W]`` as a view (channels-last memory, which conv and pooling take as is)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, H, W, C]`` as a view."""
    return x.permute(0, 2, 3, 1)


IMAGE_MIXERS: dict[str, type[nn.Module]] = {
    "pooling": Pooling2d,
    "sepconv": SepConv2d,
    "attention": Attention2d,
    "identity": _Identity,
}


@dataclass(frozen=True)
class MetaFormerImageConfig:
    """Shape and options of a :class:`MetaFormerImage`.

    Args:
        in_chans: image channels; default 3.
        num_classes: classifier outputs; default 1000.
        depths: blocks per stage; default ``(2, 2, 6, 2)``.
        dims: channels per stage (same length as ``depths``).
        mixers: one :data:`IMAGE_MIXERS` name per stage.
        stem_kernel, stem_stride, stem_padding: the stem convolution; default 7, 4, 2 (224 -> 56).
        mlp_ratio: MLP hidden channels as a multiple of the stage's; default 4.
        mlp_act: ``"starrelu"`` (MetaFormer Baselines) or ``"gelu"`` (PoolFormer v1).
        mlp_bias: biases in the MLP's 1x1 convolutions; default False.
        norm: ``"layernorm"`` (over channels, per pixel) or ``"groupnorm"`` (``GroupNorm(1, C)``, over ``C, H, W``).
        norm_bias: the block and downsampling norms learn a shift; default False (MetaFormer Baselines).
        norm_eps: epsilon of every norm; default 1e-6.
        pool_size: window of ``"pooling"``; default 3.
        sepconv_kernel: depthwise kernel of ``"sepconv"``; default 7.
        head_dim: channels per head of ``"attention"``; default 32.
        layer_scale: initial value of a learned per-channel scale on each branch (PoolFormer v1: 1e-5); None: off.
        res_scale: per stage, whether to learn a per-channel scale on the residual path (init 1); default off.
        head: ``"linear"`` or ``"mlp"`` (ConvFormer/CAFormer's ``fc -> SquaredReLU -> LayerNorm -> fc``, 4x wide).
        dropout: dropout before the classifier in training.

    Example:
        >>> import torch
        >>> from tilewise.nn import IMAGE_CONFIGS, MetaFormerImageConfig, build_image_model
        >>> IMAGE_CONFIGS["caformer-tiny"].mixers
        ('sepconv', 'attention')
        >>> config = MetaFormerImageConfig(
        ...     in_chans=1, num_classes=4, depths=(1, 1), dims=(8, 16), mixers=("pooling", "attention"), head_dim=8
        ... )
        >>> build_image_model(config)(torch.randn(2, 1, 16, 16)).shape  # stem 16 -> 4, then 4 -> 2
        torch.Size([2, 4])
        >>> MetaFormerImageConfig(depths=(1, 1), dims=(8, 16), mixers=("pooling", "conv"))
        Traceback (most recent call last):
        ...
        ValueError: unknown image mixer(s) ['conv']; choose from: pooling, sepconv, attention, identity
    """

    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 6, 2)
    dims: tuple[int, ...] = (64, 128, 320, 512)
    mixers: tuple[str, ...] = ("pooling", "pooling", "pooling", "pooling")
    stem_kernel: int = 7
    stem_stride: int = 4
    stem_padding: int = 2
    mlp_ratio: float = 4.0
    mlp_act: Literal["starrelu", "gelu"] = "starrelu"
    mlp_bias: bool = False
    norm: Literal["layernorm", "groupnorm"] = "layernorm"
    norm_bias: bool = False
    norm_eps: float = 1e-6
    pool_size: int = 3
    sepconv_kernel: int = 7
    head_dim: int = 32
    layer_scale: float | None = None
    res_scale: tuple[bool, ...] | None = None
    head: Literal["linear", "mlp"] = "linear"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        stages = len(self.depths)
        if stages == 0 or len(self.dims) != stages or len(self.mixers) != stages:
            raise ValueError(
                f"depths, dims and mixers need one entry per stage (at least one), got {len(self.depths)}, "
                f"{len(self.dims)} and {len(self.mixers)}"
            )
        if self.res_scale is not None and len(self.res_scale) != stages:
            raise ValueError(f"res_scale needs one entry per stage ({stages}), got {len(self.res_scale)}")
        if min(self.depths) < 0 or min(self.dims) <= 0 or self.in_chans <= 0 or self.num_classes <= 0:
            raise ValueError("depths must be >= 0 and dims, in_chans, num_classes positive")
        unknown = [m for m in self.mixers if m not in IMAGE_MIXERS]
        if unknown:
            raise ValueError(f"unknown image mixer(s) {unknown}; choose from: {', '.join(IMAGE_MIXERS)}")
        for name, value, allowed in (
            ("mlp_act", self.mlp_act, ("starrelu", "gelu")),
            ("norm", self.norm, ("layernorm", "groupnorm")),
            ("head", self.head, ("linear", "mlp")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


_PUBLISHED = {"dims": (64, 128, 320, 512), "head": "mlp", "res_scale": (False, False, True, True)}
_TINY = {
    "in_chans": 1,
    "num_classes": 10,
    "depths": (2, 2),
    "dims": (32, 64),
    "stem_kernel": 3,
    "stem_stride": 2,  # 8x8 -> 4x4, then 2x2: 4x cheaper than stride 1 and as accurate on digits (~97 %)
    "stem_padding": 1,
    "head_dim": 16,
}

# The published ones follow timm's poolformerv2_s12, convformer_s18 and caformer_s18.
IMAGE_CONFIGS: dict[str, MetaFormerImageConfig] = {
    "poolformer-tiny": MetaFormerImageConfig(**_TINY, mixers=("pooling", "pooling"), norm="groupnorm"),
    "convformer-tiny": MetaFormerImageConfig(**_TINY, mixers=("sepconv", "sepconv")),
    "caformer-tiny": MetaFormerImageConfig(**_TINY, mixers=("sepconv", "attention")),
    "poolformerv2-s12": MetaFormerImageConfig(
        **{**_PUBLISHED, "head": "linear"}, depths=(2, 2, 6, 2), mixers=("pooling",) * 4, norm="groupnorm"
    ),
    "convformer-s18": MetaFormerImageConfig(**_PUBLISHED, depths=(3, 3, 9, 3), mixers=("sepconv",) * 4),
    "caformer-s18": MetaFormerImageConfig(
        **_PUBLISHED, depths=(3, 3, 9, 3), mixers=("sepconv", "sepconv", "attention", "attention")
    ),
}


class GroupNorm1(nn.Module):
    """PoolFormer's norm, ``GroupNorm(1, C)`` on channels-last tensors: statistics over all of ``H, W, C`` of an
    image, then a per-channel scale (and shift).

    Shapes: ``x [B, H, W, C] -> [B, H, W, C]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import GroupNorm1
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2, 4, 4, 6)  # channels last
        >>> reference = torch.nn.GroupNorm(1, 6, eps=1e-6)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        >>> torch.allclose(GroupNorm1(6)(x), reference, atol=1e-5)
        True
        >>> GroupNorm1(6, bias=False).bias is None
        True
    """

    def __init__(self, channels: int, eps: float = 1e-6, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-3:], eps=self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


def _norm(config: MetaFormerImageConfig, channels: int, kind: str) -> nn.Module:
    if kind == "groupnorm":
        return GroupNorm1(channels, eps=config.norm_eps, bias=config.norm_bias)
    return nn.LayerNorm(channels, eps=config.norm_eps, bias=config.norm_bias)


class _Scale(nn.Module):
    """A learned per-channel scale ``x * s`` (channels last), ``s`` initialized to ``init``."""

    def __init__(self, channels: int, init: float) -> None:
        super().__init__()
        self.init = init
        self.scale = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.scale.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Mlp2d(nn.Module):
    """``fc2(act(fc1 x))`` per pixel (channels last); hidden ``mlp_ratio * C`` channels."""

    def __init__(self, config: MetaFormerImageConfig, channels: int) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * channels)
        self.fc1 = nn.Linear(channels, hidden, bias=config.mlp_bias)
        self.act = StarReLU() if config.mlp_act == "starrelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, channels, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaFormerImageBlock(nn.Module):
    """``r1 * x + l1 * mixer(norm1 x)`` then ``r2 * x + l2 * mlp(norm2 x)``; ``r``, ``l`` are optional per-channel
    scales (res scale, layer scale). Shapes: channels-last ``[B, H, W, C] -> [B, H, W, C]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import MetaFormerImageBlock, MetaFormerImageConfig
        >>> _ = torch.manual_seed(0)
        >>> config = MetaFormerImageConfig(depths=(1,), dims=(16,), mixers=("pooling",), layer_scale=1e-5)
        >>> block = MetaFormerImageBlock(config, 16, "pooling", res_scale=False)
        >>> type(block.mixer).__name__, block.mlp.fc1.weight.shape  # MLP hidden: 4 * 16
        ('Pooling2d', torch.Size([64, 16]))
        >>> x = torch.randn(2, 4, 4, 16)
        >>> y = block(x)
        >>> y.shape
        torch.Size([2, 4, 4, 16])
        >>> torch.allclose(y, x, atol=1e-3), torch.equal(y, x)  # layer scale 1e-5: the block starts near identity
        (True, False)
    """

    def __init__(self, config: MetaFormerImageConfig, channels: int, mixer: str, res_scale: bool) -> None:
        super().__init__()
        options = {"pooling": {"pool_size": config.pool_size}, "sepconv": {"kernel_size": config.sepconv_kernel}}
        options["attention"] = {"head_dim": config.head_dim}
        self.norm1 = _norm(config, channels, config.norm)
        self.mixer = IMAGE_MIXERS[mixer](channels, **options.get(mixer, {}))
        self.norm2 = _norm(config, channels, config.norm)
        self.mlp = _Mlp2d(config, channels)

        def scale(init: float | None) -> nn.Module:
            return nn.Identity() if init is None else _Scale(channels, init)

        self.layer_scale1, self.layer_scale2 = scale(config.layer_scale), scale(config.layer_scale)
        self.res_scale1, self.res_scale2 = scale(1.0 if res_scale else None), scale(1.0 if res_scale else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_scale1(x) + self.layer_scale1(self.mixer(self.norm1(x)))
        return self.res_scale2(x) + self.layer_scale2(self.mlp(self.norm2(x)))


class _MlpHead(nn.Module):
    """ConvFormer/CAFormer's classifier: ``fc2(norm(relu(fc1 x)**2))``, hidden ``4 * C``. ``[B, C] -> [B, K]``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.norm = nn.LayerNorm(4 * channels, eps=1e-6)
        self.fc2 = nn.Linear(4 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.relu(self.fc1(x)).square()))


class MetaFormerImage(nn.Module):
    """An image-classification MetaFormer (PoolFormer / ConvFormer / CAFormer, by the config's stage mixers).

    Stem: ``Conv(stem_kernel, stem_stride)`` then a norm. Stage ``i > 0`` starts with a norm and a 3x3 stride-2
    convolution from ``dims[i-1]`` to ``dims[i]`` channels. Head: mean over pixels, LayerNorm, then a linear or
    MLP classifier.

    Weights: every convolution and linear layer ~ N(0, 0.02) truncated at 2 std (timm passes an absolute +-2, which
    cuts nothing), biases 0, norms 1/0, StarReLU ``s = 1, b = 0``, scales at their init values. :meth:`init_weights`
    redoes all of it, so a model built on the meta device is materialized with ``to_empty`` + ``init_weights()``.

    Args:
        config: see :class:`MetaFormerImageConfig`.

    Shapes: ``images [B, in_chans, H, W] -> logits [B, num_classes]``.

    Example:
        >>> import torch
        >>> from tilewise.nn import IMAGE_CONFIGS, MetaFormerImage
        >>> _ = torch.manual_seed(0)
        >>> net = MetaFormerImage(IMAGE_CONFIGS["poolformer-tiny"])
        >>> images = torch.randn(2, 1, 8, 8)
        >>> net.forward_features(images).shape  # stride-2 stem then one downsampling: 8x8 -> 4x4 -> 2x2
        torch.Size([2, 2, 2, 64])
        >>> net(images).shape, net.num_params()
        (torch.Size([2, 10]), 101970)
        >>> net(torch.randn(2, 3, 8, 8))
        Traceback (most recent call last):
        ...
        ValueError: images must be a floating tensor [B, 1, H, W], got dtype torch.float32 and shape (2, 3, 8, 8)
    """

    def __init__(self, config: MetaFormerImageConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        self.stem = nn.Conv2d(config.in_chans, dims[0], config.stem_kernel, config.stem_stride, config.stem_padding)
        self.stem_norm = _norm(config, dims[0], "layernorm")
        self.down_norms = nn.ModuleList(_norm(config, dims[i - 1], "layernorm") for i in range(1, len(dims)))
        self.downsamples = nn.ModuleList(
            nn.Conv2d(dims[i - 1], dims[i], 3, stride=2, padding=1) for i in range(1, len(dims))
        )
        res_scale = config.res_scale or (False,) * len(dims)
        self.stages = nn.ModuleList(
            nn.Sequential(*(MetaFormerImageBlock(config, c, mixer, rs) for _ in range(depth)))
            for c, mixer, rs, depth in zip(dims, config.mixers, res_scale, config.depths, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        if config.head == "mlp":
            self.head: nn.Module = _MlpHead(dims[-1], config.num_classes)
        else:
            self.head = nn.Linear(dims[-1], config.num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter; also the way to materialize a meta-device model after ``to_empty``."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def num_params(self) -> int:
        """Parameter count (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, channels last: ``[B, H', W', dims[-1]]``."""
        x = self.stem_norm(_nhwc(self.stem(images)))
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = _nhwc(self.downsamples[i - 1](_nchw(self.down_norms[i - 1](x))))
            x = stage(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` for ``images [B, in_chans, H, W]`` (floating point)."""
        if images.dim() != 4 or images.shape[1] != self.config.in_chans or not images.is_floating_point():
            raise ValueError(
                f"images must be a floating tensor [B, {self.config.in_chans}, H, W], got dtype {images.dtype} and "
                f"shape {tuple(images.shape)}"
            )
        pooled = self.forward_features(images).mean(dim=(1, 2))  # [B, C]
        return self.head(self.drop(self.norm(pooled)))


def build_image_model(
    name_or_config: str | MetaFormerImageConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: object,
) -> MetaFormerImage:
    """Build a :class:`MetaFormerImage` from a name in :data:`IMAGE_CONFIGS` or a config.

    Built on the meta device, then (unless ``device="meta"``) materialized and initialized on ``device``.

    Args:
        name_or_config: e.g. ``"caformer-tiny"`` or a :class:`MetaFormerImageConfig`.
        device: where the weights live; default CPU.
        dtype: parameter dtype; default fp32.
        **overrides: config fields to replace (e.g. ``num_classes=100``).

    Raises:
        ValueError: for an unknown name (the message lists the named configs) or a bad field.

    Example:
        >>> import torch
        >>> from tilewise.nn import build_image_model
        >>> _ = torch.manual_seed(0)
        >>> net = build_image_model("convformer-tiny", num_classes=3)  # a field replaced
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
        >>> build_image_model("poolformer-tiny", dtype=torch.float64).head.weight.dtype
        torch.float64
        >>> build_image_model("convformer-s18", device="meta").num_params()  # planned, not allocated
        26774448
    """
    if isinstance(name_or_config, str):
        if name_or_config not in IMAGE_CONFIGS:
            raise ValueError(f"unknown image config {name_or_config!r}; named configs are: {', '.join(IMAGE_CONFIGS)}")
        config = IMAGE_CONFIGS[name_or_config]
    elif isinstance(name_or_config, MetaFormerImageConfig):
        config = name_or_config
    else:
        raise TypeError(f"name_or_config must be a str or MetaFormerImageConfig, got {type(name_or_config).__name__}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return build_on_meta(lambda: MetaFormerImage(config), device, dtype)
