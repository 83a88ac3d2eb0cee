"""`import tilewise` (and its public subpackages) must not import Triton nor initialise CUDA."""

import importlib.util
import subprocess
import sys

import pytest

import tilewise

# Public subpackages below the CLI; each must be importable without Triton. quant and ops always exist, the
# others are checked once they land.
_REQUIRED = ["tilewise", "tilewise.quant", "tilewise.ops"]
_OPTIONAL = [f"tilewise.{name}" for name in ("optim", "nn", "kv", "memory", "bench")]
_PRESENT = _REQUIRED + [name for name in _OPTIONAL if importlib.util.find_spec(name) is not None]

_PROBE = """
import sys
import torch
import {module}
loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
print("TRITON", loaded[:5])
print("CUDA", torch.cuda.is_initialized())
"""


@pytest.mark.parametrize("module", _PRESENT)
def test_import_is_lazy(module: str) -> None:
    """A fresh interpreter imports ``module``; Triton stays unloaded and CUDA uninitialised."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)], capture_output=True, text=True, check=True
    ).stdout
    assert "TRITON []" in out, f"importing {module} imported triton: {out}"
    assert "CUDA False" in out, f"importing {module} initialised CUDA: {out}"


def test_subpackages_load_on_attribute_access() -> None:
    assert tilewise.__version__ == "0.1.0"
    assert tilewise.quant is sys.modules["tilewise.quant"]
    assert "ops" in dir(tilewise)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = tilewise.nonexistent
