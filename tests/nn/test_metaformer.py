"""MetaFormerLM and its token mixers: shapes, causality, init, training, parameter counts, meta builds, I/O."""

import dataclasses
import math
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilewise.nn import (
    CONFIGS,
    MIXERS,
    MetaFormerConfig,
    MetaFormerLM,
    apply_rope,
    build_mixer,
    build_model,
    register_mixer,
    rope_cos_sin,
)

BUILTIN_MIXERS = ["attention", "pooling", "conv", "sepconv"]
# A small byte model so the suite stays fast on 2 CPU cores.
SMALL = dataclasses.replace(CONFIGS["tiny"], dim=64, n_layers=2, max_seq_len=64)


def _mixer_kwargs(name: str) -> dict:
    return {"n_heads": 4, "n_kv_heads": 2} if name == "attention" else {}


@pytest.mark.parametrize("name", BUILTIN_MIXERS)
def test_mixer_shape_and_strict_causality(name: str) -> None:
    torch.manual_seed(42)
    mixer = build_mixer(name, 32, **_mixer_kwargs(name))
    x = torch.randn(2, 23, 32)
    y = mixer(x)
    assert y.shape == x.shape
    for t in (0, 7, 21):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 5
        y2 = mixer(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])  # later outputs do see the change


@pytest.mark.parametrize("name", BUILTIN_MIXERS)
def test_model_shapes_and_causality(name: str) -> None:
    torch.manual_seed(42)
    model = build_model(SMALL, mixer=name)
    idx = torch.randint(0, 256, (2, 40))
    logits = model(idx)
    assert logits.shape == (2, 40, 256)
    idx2 = idx.clone()
    idx2[:, 20:] = (idx2[:, 20:] + 1) % 256
    logits2 = model(idx2)
    torch.testing.assert_close(logits2[:, :20], logits[:, :20], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits2[:, 20:], logits[:, 20:])


def test_pooling_matches_naive_window_mean() -> None:
    torch.manual_seed(42)
    x = torch.randn(2, 11, 8)
    y = build_mixer("pooling", 8, window=3)(x)
    expected = torch.stack([x[:, max(0, t - 2) : t + 1].mean(dim=1) - x[:, t] for t in range(11)], dim=1)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)


def test_conv_matches_naive_causal_filter() -> None:
    torch.manual_seed(42)
    mixer = build_mixer("conv", 6, kernel_size=3)
    x = torch.randn(1, 9, 6)
    w, b = mixer.conv.weight[:, 0], mixer.conv.bias  # [D, k], [D]; tap k-1 multiplies x_t
    xp = torch.nn.functional.pad(x, (0, 0, 2, 0))
    expected = torch.stack([(xp[:, t : t + 3] * w.T).sum(dim=1) + b for t in range(9)], dim=1)
    torch.testing.assert_close(mixer(x), expected, atol=1e-6, rtol=1e-5)


def test_gqa_matches_mha_with_repeated_kv_weights() -> None:
    torch.manual_seed(42)
    gqa = build_mixer("attention", 32, n_heads=4, n_kv_heads=2)
    mha = build_mixer("attention", 32, n_heads=4, n_kv_heads=4)
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        # kv head j serves query heads 2j and 2j+1: repeat each head's 8 rows twice.
        mha.wk.weight.copy_(gqa.wk.weight.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32))
        mha.wv.weight.copy_(gqa.wv.weight.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_offset() -> None:
    torch.manual_seed(42)
    head_dim = 16
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    cos, sin = rope_cos_sin(torch.arange(200), head_dim, theta=10000.0)

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rope(q[None], cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k[None], cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    for i, j, s in [(5, 2, 17), (0, 0, 100), (30, 3, 150), (9, 9, 1)]:
        torch.testing.assert_close(score(i, j), score(i + s, j + s), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)  # a different offset gives a different score
    torch.testing.assert_close(apply_rope(q[None], cos[:1], sin[:1]), q[None])  # position 0 is the identity


@pytest.mark.parametrize("tie", [False, True])
def test_initial_loss_is_log_vocab(tie: bool) -> None:
    torch.manual_seed(42)
    model = build_model(dataclasses.replace(CONFIGS["tiny"], tie_embeddings=tie))
    idx = torch.randint(0, 256, (4, 65))
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert abs(loss.item() - math.log(256)) < 0.1


def test_residual_projections_get_scaled_init() -> None:
    torch.manual_seed(42)
    model = build_model(CONFIGS["tiny"])
    expected = 0.02 / math.sqrt(2 * CONFIGS["tiny"].n_layers)
    assert abs(model.layers[0].mlp.w2.weight.std().item() - expected) < 0.15 * expected
    assert abs(model.layers[0].mixer.wo.weight.std().item() - expected) < 0.15 * expected
    assert abs(model.layers[0].mlp.w1.weight.std().item() - 0.02) < 0.002
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("name", BUILTIN_MIXERS)
def test_few_steps_lower_loss_on_repeated_sequence(name: str, fit_repeated_text) -> None:
    torch.manual_seed(42)
    losses = fit_repeated_text(build_model(SMALL, mixer=name))
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny", 918_656),
        ("small", 25_567_744),
        ("base", 113_658_624),
        ("llama-1b", 1_100_048_384),
        ("llama-3b", 3_426_473_600),
        ("llama-7b", 6_738_415_616),
    ],
)
def test_named_config_param_counts(name: str, expected: int) -> None:
    assert build_model(name, device="meta").num_params() == expected


def test_llama_7b_param_formula() -> None:
    c = CONFIGS["llama-7b"]
    per_layer = 4 * c.dim * c.dim + 3 * c.dim * c.hidden_dim + 2 * c.dim
    formula = c.n_layers * per_layer + 2 * c.vocab_size * c.dim + c.dim
    assert formula == 6_738_415_616
    assert build_model("llama-7b", device="meta").num_params() == formula


def test_meta_build_allocates_nothing() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = build_model("llama-7b", device="meta", dtype=torch.bfloat16)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.is_meta for t in tensors)
    assert all(t.dtype == torch.bfloat16 for t in model.parameters())
    assert rss_after - rss_before < 200 * 1024  # 13.5 GB of bf16 weights would show; allow 200 MiB of bookkeeping


@pytest.mark.parametrize("tie", [False, True])
def test_meta_then_materialize_matches_direct_build(tie: bool) -> None:
    config = dataclasses.replace(SMALL, tie_embeddings=tie)
    torch.manual_seed(7)
    direct = build_model(config)
    torch.manual_seed(7)
    meta = build_model(config, device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert direct.state_dict().keys() == meta.state_dict().keys()
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(meta.state_dict()[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_round_trips_through_safetensors(tie: bool, tmp_path) -> None:
    config = dataclasses.replace(SMALL, tie_embeddings=tie, mixer="conv")
    torch.manual_seed(42)
    model = build_model(config)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(0)
    fresh = MetaFormerLM(config)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    idx = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)


def test_unknown_names_raise_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'.*attention.*conv.*pooling"):
        build_model("tiny", mixer="nope")
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'.*attention"):
        build_mixer("nope", 32)
    with pytest.raises(ValueError, match=r"unknown config 'huge'.*tiny.*llama-7b"):
        build_model("huge")


def test_register_mixer_rejects_duplicates_and_new_mixers_are_buildable() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("attention")(torch.nn.Identity)

    @register_mixer("_test_shift")
    class Shift(torch.nn.Module):
        def __init__(self, dim: int, n_heads: int) -> None:
            super().__init__()
            self.n_heads = n_heads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1]

    try:
        model = build_model(dataclasses.replace(SMALL, n_heads=2), mixer="_test_shift")
        assert model.layers[0].mixer.n_heads == 2  # filled in from the config
        assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 256)
    finally:
        del MIXERS["_test_shift"]


def test_invalid_inputs_raise() -> None:
    model = build_model(SMALL)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_mixer("attention", 32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="mlp"):
        MetaFormerConfig(mlp="relu")
