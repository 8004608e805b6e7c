"""Where the non-Python parts of fusedopt live, installed or in a checkout.

The repository keeps C++/CUDA sources in ``csrc/``, Triton kernels in
``kernels/`` and benchmarks in ``bench/`` at its top level. The wheel ships them
inside the package as ``fusedopt._csrc``, ``fusedopt._kernels`` and
``fusedopt._bench`` (see setup.py). This module hides the difference: callers
ask for ``csrc_dir()`` or ``shipped_module("kernels", "adamw")`` and get the
installed copy when there is one, else the checkout's.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_DIR = _PACKAGE_DIR.parent

# top-level folder in the checkout -> package name inside the wheel
_SHIPPED = {"csrc": "_csrc", "kernels": "_kernels", "bench": "_bench"}


def _shipped_dir(folder: str) -> Path:
    installed = _PACKAGE_DIR / _SHIPPED[folder]
    if installed.is_dir():
        return installed
    checkout = _CHECKOUT_DIR / folder
    if checkout.is_dir():
        return checkout
    raise RuntimeError(
        f"fusedopt: cannot find its {folder}/ files (looked in {installed} and {checkout}). "
        "The installation is incomplete: reinstall fusedopt from its wheel or source tree."
    )


def csrc_dir() -> Path:
    """Directory holding include/, cpu/, cuda/ and the bindings."""
    return _shipped_dir("csrc")


def shipped_names(folder: str) -> list[str]:
    """The public modules of a shipped folder (kernels/: one per family of
    kernels), found by their files: a new one needs no list."""
    return sorted(p.stem for p in _shipped_dir(folder).glob("*.py") if not p.stem.startswith("_"))


def shipped_module(folder: str, name: str) -> ModuleType:
    """Import ``fusedopt.<_folder>.<name>`` (e.g. the Triton kernels of adamw).

    In a checkout the top-level folder is registered under its package name the
    first time, so relative imports inside it work the same as when installed.
    """
    package = f"fusedopt.{_SHIPPED[folder]}"
    if package not in sys.modules and not (_PACKAGE_DIR / _SHIPPED[folder]).is_dir():
        path = _shipped_dir(folder)
        spec = importlib.util.spec_from_file_location(
            package, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")
