"""Docs: every docstring example in the package runs and prints what it says, and every public function and class
of the user-facing namespaces has one.

The examples are doctests (``>>>`` lines), run here on the CPU (Triton's interpreter where a kernel is called), with
``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``. Each must be self-contained (its own imports), fast, deterministic and
free of side effects outside a temporary folder.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import tilewise

# The namespaces a user imports from; everything in their __all__ that is a function or a class needs an example.
NAMESPACES = (
    "tilewise.ops",
    "tilewise.optim",
    "tilewise.quant",
    "tilewise.nn",
    "tilewise.memory",
    "tilewise.train",
    "tilewise.bench",
)


def _modules() -> list[str]:
    return sorted(["tilewise", *(m.name for m in pkgutil.walk_packages(tilewise.__path__, "tilewise."))])


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    if name.endswith(".triton"):
        pytest.importorskip("triton", reason="the Triton kernels' modules need triton")
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}:\n" + "".join(report)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_public_api_has_examples(namespace: str) -> None:
    module = importlib.import_module(namespace)
    public = [getattr(module, name) for name in module.__all__]
    documented = [obj for obj in public if inspect.isfunction(obj) or inspect.isclass(obj)]
    assert documented, f"{namespace} exports no function or class"
    missing = [obj.__qualname__ for obj in documented if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"{namespace}: no example (a '>>>' line) in the docstring of {', '.join(missing)}"
