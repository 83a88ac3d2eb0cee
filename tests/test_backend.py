"""The backend rules of tilewise._backend.resolve_backend."""

from types import SimpleNamespace

import pytest
import torch

from tilewise import _backend
from tilewise._backend import interpreting, resolve_backend, triton_available


def _on(device_type: str) -> torch.Tensor:
    """A stand-in for a tensor on ``device_type``: resolve_backend only reads ``.device.type``."""
    return SimpleNamespace(device=SimpleNamespace(type=device_type))  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILEWISE_BACKEND", raising=False)


@pytest.fixture
def with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "triton_available", lambda: True)


@pytest.fixture
def without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "triton_available", lambda: False)


def test_reference_always_runs(without_triton: None) -> None:
    assert resolve_backend("reference", torch.zeros(3)) == "reference"
    assert resolve_backend("reference", _on("cuda")) == "reference"


def test_auto_is_reference_on_cpu_even_when_interpreting(with_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.zeros(3)) == "reference"


def test_auto_is_triton_only_when_every_tensor_is_on_cuda(with_triton: None) -> None:
    assert resolve_backend("auto", _on("cuda"), _on("cuda")) == "triton"
    assert resolve_backend("auto", _on("cuda"), torch.zeros(1)) == "reference"
    assert resolve_backend("auto") == "reference"


def test_auto_falls_back_quietly_without_triton(without_triton: None) -> None:
    assert resolve_backend("auto", _on("cuda")) == "reference"


def test_unknown_backend_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="'auto', 'triton', 'reference'"):
        resolve_backend("cuda", torch.zeros(1))


def test_env_var_replaces_auto(with_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEWISE_BACKEND", "reference")
    assert resolve_backend("auto", _on("cuda")) == "reference"


def test_explicit_backend_wins_over_env_var(with_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEWISE_BACKEND", "reference")
    assert resolve_backend("triton", _on("cuda")) == "triton"


def test_bad_env_var_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEWISE_BACKEND", "fast")
    with pytest.raises(ValueError, match="TILEWISE_BACKEND='fast'"):
        resolve_backend("auto", torch.zeros(1))


def test_env_var_forcing_triton_raises_like_a_named_backend(with_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEWISE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TILEWISE_BACKEND=triton.*TRITON_INTERPRET=1"):
        resolve_backend("auto", torch.zeros(1))


def test_triton_without_triton_says_how_to_install(without_triton: None) -> None:
    with pytest.raises(RuntimeError, match=r"pip install 'tilewise\[triton\]'"):
        resolve_backend("triton", _on("cuda"))


def test_triton_on_cpu_needs_the_interpreter(with_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing tilewise"):
        resolve_backend("triton", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.zeros(1)) == "triton"


def test_triton_rejects_other_devices(with_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="device meta"):
        resolve_backend("triton", torch.empty(1, device="meta"))


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_interpreting_reads_env_like_triton(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is expected


@pytest.mark.interpret
def test_real_resolution_on_this_machine() -> None:
    """Unpatched: with triton importable, a CPU tensor resolves to Triton only through the interpreter."""
    assert triton_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_backend("triton", torch.zeros(1, device=device)) == "triton"


@pytest.mark.gpu
def test_auto_picks_triton_for_cuda_tensors() -> None:
    expected = "triton" if triton_available() else "reference"
    assert resolve_backend("auto", torch.zeros(1, device="cuda")) == expected
