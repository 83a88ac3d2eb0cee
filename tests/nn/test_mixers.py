"""The mixers that call ops (linear_attention, fft_conv) and ConvFormer's sepconv: causality, wiring, training.

The ops ``tilewise.ops.linear_attention`` and ``tilewise.ops.fft_conv`` may not be installed yet: every test that
runs a forward is parametrized over ``oracle`` (a naive version of the op's documented math, patched in) and
``tilewise`` (the real op, skipped while it is missing). The oracle runs are the mixers' own tests; the op runs
check that the real op agrees with what the mixers assume of it.
"""

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

from tilewise.nn import CONFIGS, MIXERS, build_mixer, build_model
from tilewise.nn import mixers as mixers_module
from tilewise.ops import fft_conv, linear_attention

SMALL = dataclasses.replace(CONFIGS["tiny"], dim=64, n_layers=2, max_seq_len=64)


def naive_linear_attention(q, k, v, g=None, *, scale=None, **_):
    """``o_t = scale * q_t S_t``, ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` in its parallel (masked matrix) form."""
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    G = torch.zeros(q.shape[:3]) if g is None else g.float().cumsum(dim=1)  # [B, T, H]
    G = G.transpose(1, 2)  # [B, H, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, T, T]
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * scale * decay
    return torch.einsum("bhij,bjhd->bihd", scores, v.float()).to(q.dtype), None


def naive_fft_conv(u, k, *, skip=None, **_):
    """``y[b, h, t] = sum_{s <= t} k[h, s] u[b, h, t - s] + skip[h] u[b, h, t]`` as a direct causal convolution."""
    H, N = k.shape
    y = F.conv1d(F.pad(u.float(), (N - 1, 0)), k.float().flip(-1)[:, None], groups=H)
    if skip is not None:
        y = y + skip.float()[:, None] * u.float()
    return y.to(u.dtype)


ORACLES = {"linear_attention": naive_linear_attention, "fft_conv": naive_fft_conv}


@pytest.fixture(params=["oracle", "tilewise"])
def op_source(request, monkeypatch) -> str:
    """``oracle``: the mixers call the naive ops above; ``tilewise``: the real ops."""
    if request.param == "oracle":
        monkeypatch.setattr(mixers_module, "_load_op", lambda name: ORACLES[name])
    return request.param


def _build(name: str, dim: int = 32, **kwargs) -> torch.nn.Module:
    defaults = {"linear_attention": {"n_heads": 4}, "fft_conv": {"max_seq_len": 64}}
    return build_mixer(name, dim, **{**defaults.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", ["linear_attention", "fft_conv", "sepconv"])
def test_mixer_is_strictly_causal(name: str, op_source: str) -> None:
    torch.manual_seed(42)
    mixer = _build(name)
    x = torch.randn(2, 37, 32)
    y = mixer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    for t in (0, 12, 35):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 5
        y2 = mixer(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def test_fft_conv_reaches_the_whole_past(op_source: str) -> None:
    # A change at t = 0 moves the output at t = 60: the long kernel, not only the 3-tap short convolution.
    torch.manual_seed(42)
    mixer = _build("fft_conv")
    x = torch.randn(1, 61, 32)
    x2 = x.clone()
    x2[:, 0] += 3.0
    delta = (mixer(x2) - mixer(x))[0, 60].abs().max()
    assert delta > 1e-4


def test_fft_conv_without_kernel_is_the_gated_skip(op_source: str) -> None:
    torch.manual_seed(42)
    mixer = _build("fft_conv")
    with torch.no_grad():
        mixer.kernel.zero_()
        mixer.skip.uniform_(0.5, 2.0)
    x = torch.randn(2, 9, 32)
    x0, x1, v = mixer.short_conv(mixer.in_proj(x)).chunk(3, dim=-1)
    expected = mixer.out_proj(x0 * mixer.skip * x1 * v)
    torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-4)


def test_fft_conv_kernel_window_and_init() -> None:
    mixer = _build("fft_conv", dim=8, max_seq_len=100)
    w = mixer.window(100)
    assert w.shape == (8, 100)
    assert (w[:, 0] == 1).all()
    assert torch.all(w[:, 1:] < w[:, :-1])  # decays along time
    torch.testing.assert_close(w[0, 30], torch.tensor(1e-2), rtol=1e-3, atol=0)  # fastest: 1e-2 at 30 %
    torch.testing.assert_close(w[-1, 99], torch.tensor(1e-2 ** (0.99 / 1.5)), rtol=1e-3, atol=0)  # slowest
    gain = (mixer.kernel * w).square().sum(dim=1)  # ~1 per channel: variance-preserving at init
    assert 0.3 < gain.mean().item() < 3.0
    assert (mixer.skip == 1).all()


def test_linear_attention_with_instant_forgetting_returns_the_current_value(op_source: str) -> None:
    # With decay exp(g) ~ 0 the state holds only k_t^T v_t; with q = k (unit vectors, scale 1) o_t = v_t, so the
    # mixer reduces to wo(rmsnorm(v_t) * silu(wr x_t)): this pins the feature map, the scale and the gate's sign.
    torch.manual_seed(42)
    mixer = _build("linear_attention", gate_temperature=1e-3)
    with torch.no_grad():
        mixer.wk.weight.copy_(mixer.wq.weight)
    x = torch.randn(2, 11, 32)
    v = mixer.wv(x).view(2, 11, 4, 8)
    expected = mixer.wo(mixer.o_norm(v).reshape(2, 11, 32) * F.silu(mixer.wr(x)))
    torch.testing.assert_close(mixer(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_map", ["l2norm", "elu"])
def test_linear_attention_feature_maps_and_decay_at_init(feature_map: str, op_source: str) -> None:
    torch.manual_seed(42)
    mixer = _build("linear_attention", feature_map=feature_map)
    torch.nn.init.zeros_(mixer.wg.bias)
    x = torch.randn(2, 20, 32)
    y = mixer(x)
    assert torch.isfinite(y).all()
    q = mixer._features(mixer.wq(x).view(2, 20, 4, 8))
    if feature_map == "l2norm":
        torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 20, 4), atol=1e-5, rtol=0)
    else:
        assert (q > 0).all()
    g = F.logsigmoid(mixer.wg(x)) / mixer.gate_temperature
    assert (g < 0).all()
    assert 0.9 < g.exp().mean() < 1.0


@pytest.mark.parametrize("name", ["linear_attention", "fft_conv"])
def test_lm_trains_with_op_mixer(name: str, op_source: str, fit_repeated_text) -> None:
    torch.manual_seed(42)
    losses = fit_repeated_text(build_model(SMALL, mixer=name))
    assert losses[-1] < 0.6 * losses[0]


def test_config_fills_mixer_settings() -> None:
    model = build_model(dataclasses.replace(SMALL, n_heads=8), mixer="fft_conv", device="meta")
    assert model.layers[0].mixer.kernel.shape == (64, 64)  # max_seq_len from the config
    model = build_model(dataclasses.replace(SMALL, n_heads=8), mixer="linear_attention", device="meta")
    assert model.layers[0].mixer.n_heads == 8


@pytest.mark.parametrize("name", ["linear_attention", "fft_conv", "sepconv"])
def test_meta_build_then_init_matches_direct_build(name: str) -> None:
    torch.manual_seed(7)
    direct = build_model(SMALL, mixer=name)
    torch.manual_seed(7)
    meta = build_model(SMALL, mixer=name, device="meta")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device="cpu")
    meta.init_weights()
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(meta.state_dict()[key], value, atol=0, rtol=0, msg=key)
    mixer = direct.layers[0].mixer
    out_proj = {"linear_attention": "wo", "fft_conv": "out_proj", "sepconv": "pw2"}[name]
    assert getattr(mixer, out_proj).residual_proj  # gets the scaled init


def test_new_mixer_parameter_counts() -> None:
    D, T = 64, 64
    counts = {name: sum(p.numel() for p in _build(name, D, max_seq_len=T).parameters()) for name in ["fft_conv"]}
    counts["linear_attention"] = sum(p.numel() for p in _build("linear_attention", D).parameters())
    counts["sepconv"] = sum(p.numel() for p in _build("sepconv", D).parameters())
    assert counts["fft_conv"] == 3 * D * D + 3 * D * 3 + 3 * D + D * T + D + D * D
    assert counts["linear_attention"] == 5 * D * D + 4 * D + 4 + D // 4
    assert counts["sepconv"] == 2 * D * 2 * D + 2 * D * 7 + 2


def test_op_mixers_without_ops_fail_at_forward_not_at_build(monkeypatch) -> None:
    real_import = importlib.import_module

    def missing(name: str, *args, **kwargs):
        if name in ("tilewise.ops.linear_attention", "tilewise.ops.fft_conv"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", missing)
    mixer = _build("fft_conv")  # building (and meta planning) never needs the op
    with pytest.raises(ImportError, match=r"tilewise\.ops\.fft_conv.*pick another mixer"):
        mixer(torch.randn(1, 4, 32))


def test_invalid_mixer_arguments_raise() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        build_mixer("linear_attention", 30, n_heads=4)
    with pytest.raises(ValueError, match="feature_map"):
        build_mixer("linear_attention", 32, feature_map="relu")
    with pytest.raises(ValueError, match="max_seq_len"):
        _build("fft_conv", max_seq_len=8)(torch.randn(1, 9, 32))
    assert {"linear_attention", "fft_conv", "sepconv"} <= set(MIXERS)


def test_pooling_is_poolformer_mean_minus_identity() -> None:
    # A constant sequence is its own window mean: PoolFormer's "pool(x) - x" gives 0 (the block adds x back).
    x = torch.randn(1, 1, 8).expand(2, 13, 8)
    torch.testing.assert_close(build_mixer("pooling", 8, window=3)(x), torch.zeros(2, 13, 8))


def test_ops_agree_with_the_math_the_mixers_assume() -> None:
    torch.manual_seed(42)
    q, k, v = torch.randn(2, 70, 3, 8), torch.randn(2, 70, 3, 8), torch.randn(2, 70, 3, 8)
    g = F.logsigmoid(torch.randn(2, 70, 3)) / 4
    o, _ = linear_attention(q, k, v, g, scale=0.5)
    torch.testing.assert_close(o, naive_linear_attention(q, k, v, g, scale=0.5)[0], atol=1e-4, rtol=1e-4)
    u, kern, skip = torch.randn(2, 5, 70), torch.randn(5, 70) / 8, torch.randn(5)
    expected = naive_fft_conv(u, kern, skip=skip)
    torch.testing.assert_close(fft_conv(u, kern, skip=skip), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["linear_attention", "fft_conv", "sepconv"])
def test_bf16_weights_and_autocast(name: str, op_source: str) -> None:
    torch.manual_seed(42)
    idx = torch.randint(0, 256, (2, 33))
    model = build_model(SMALL, mixer=name, dtype=torch.bfloat16)
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - 5.545) < 0.2
    model = build_model(SMALL, mixer=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
