"""StarReLU: values and gradients against the plain expression, dtype, what backward keeps, init."""

import pytest
import torch

from tilewise.nn import MLP, MetaFormerConfig, StarReLU, build_model, star_relu


def _plain(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return s * torch.relu(x) ** 2 + b


def test_star_relu_matches_expression_and_gradcheck() -> None:
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.8944], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.4472], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(star_relu(x, s, b), _plain(x, s, b), atol=1e-15, rtol=1e-15)  # addcmul may fuse
    assert torch.autograd.gradcheck(star_relu, (x, s, b))
    g = torch.randn(5, 7, dtype=torch.float64)
    ours = torch.autograd.grad(star_relu(x, s, b), (x, s, b), g)
    plain = torch.autograd.grad(_plain(x, s, b), (x, s, b), g)
    for a, e in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


def test_star_relu_keeps_input_dtype_and_saves_only_the_input() -> None:
    act = StarReLU()
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = act(x)
    assert y.dtype == torch.bfloat16  # the fp32 [1] parameters do not promote it
    assert sum(t.numel() for t in saved) == x.numel() + 1  # x and the [1] scale: nothing of x's size more
    y.float().sum().backward()
    assert act.scale.grad is not None
    assert act.bias.grad is not None
    assert act.scale.grad.dtype == torch.float32
    torch.testing.assert_close(act.bias.grad, torch.tensor([256.0]))


def test_star_relu_init_and_frozen_parameters() -> None:
    act = StarReLU(scale_init=0.8944, bias_init=-0.4472, learnable=False)
    with torch.no_grad():
        act.scale.zero_()
    act.reset_parameters()
    assert act.scale.item() == pytest.approx(0.8944)
    assert act.bias.item() == pytest.approx(-0.4472)
    x = torch.randn(3, requires_grad=True)
    act(x).sum().backward()
    assert x.grad is not None
    assert act.scale.grad is None


def test_lm_mlp_starrelu_option() -> None:
    config = MetaFormerConfig(dim=32, n_layers=2, mlp="starrelu", mlp_ratio=4.0, max_seq_len=16)
    assert config.hidden_dim == 128  # no SwiGLU 2/3 factor
    mlp = MLP(config)
    assert isinstance(mlp.act, StarReLU)
    assert mlp.w3 is None
    x = torch.randn(2, 5, 32)
    expected = mlp.w2(_plain(mlp.w1(x), mlp.act.scale, mlp.act.bias))
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
    model = build_model(config)
    assert model.layers[0].mlp.act.scale.item() == 1.0  # init_weights reset it
    assert model.num_params() == build_model(MetaFormerConfig(**{**config.__dict__, "mlp": "gelu"})).num_params() + 4
