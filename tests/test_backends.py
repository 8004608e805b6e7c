"""Backend choice: names, explicit and automatic selection, the env variable,
fallback with a warning, available_backends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import make_params

import fusedopt
from fusedopt import FusedAdamW, backends

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for key, value in env.items():
        if value is None:
            full_env.pop(key)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)


def test_available_backends_here():
    assert fusedopt.available_backends("cpu") == CPU_BACKENDS
    assert CPU_BACKENDS[0] == "reference" and "cuda" not in CPU_BACKENDS
    assert "cpu" in CPU_BACKENDS  # this machine has a compiler: a broken cpu build must fail the suite
    if not torch.cuda.is_available():
        assert fusedopt.available_backends("cuda") == ["reference"]
    assert ("triton" in CPU_BACKENDS) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="reference, cpu, triton, cuda"):
        FusedAdamW(make_params([(3,)]), backend="cudnn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(ValueError, match="cuda.*cannot run"):
        FusedAdamW(make_params([(3,)]), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import torch, fusedopt\n"
            "try:\n"
            "    fusedopt.FusedAdamW([torch.zeros(3, requires_grad=True)], backend='triton')\n"
            "except ValueError as e:\n"
            "    print('REFUSED', e)\n"
            "print(fusedopt.available_backends('cpu'))\n")
    out = run_python(code, TRITON_INTERPRET=None)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
    assert "'triton'" not in out.stdout.splitlines()[-1]


def test_automatic_choice_and_env_variable(monkeypatch):
    assert FusedAdamW(make_params([(3,)])).backend == "cpu"
    monkeypatch.setenv("FUSEDOPT_BACKEND", "reference")
    assert FusedAdamW(make_params([(3,)])).backend == "reference"
    assert FusedAdamW(make_params([(3,)]), backend="cpu").backend == "cpu"  # the argument wins
    monkeypatch.setenv("FUSEDOPT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown fusedopt backend"):
        FusedAdamW(make_params([(3,)]))


def test_failed_automatic_build_warns_once_and_falls_back(tmp_path):
    """No compiler: the automatic choice warns (once) and runs the reference;
    an explicit backend="cpu" raises with what to install."""
    code = ("import warnings, torch, fusedopt\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    a = fusedopt.FusedAdamW([torch.zeros(3, requires_grad=True)])\n"
            "    b = fusedopt.FusedAdamW([torch.zeros(3, requires_grad=True)])\n"
            "print('BACKEND', a.backend, b.backend, 'WARNINGS', len(w))\n"
            "print('MESSAGE', w[0].message)\n"
            "try:\n"
            "    fusedopt.FusedAdamW([torch.zeros(3, requires_grad=True)], backend='cpu')\n"
            "except ValueError as e:\n"
            "    print('EXPLICIT', e)\n")
    out = run_python(code, CXX="/nonexistent/c++", FUSEDOPT_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "BACKEND reference reference WARNINGS 1" in out.stdout
    assert "apt install g++" in out.stdout and "EXPLICIT" in out.stdout


def test_backend_property_with_several_device_types():
    opt = FusedAdamW(make_params([(3,)]), backend="reference")
    assert opt.backend == "reference"
    opt._backend_names["cuda"] = "triton"  # as if a CUDA param group had been added
    assert opt.backend == {"cpu": "reference", "cuda": "triton"}


def test_import_does_not_load_triton_or_extensions():
    out = run_python("import sys, fusedopt\n"
                     "print('triton' in sys.modules, hasattr(__import__('torch').ops, 'fusedopt_cpu'))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "False"


def test_registry_modules_are_consistent():
    for name in backends.NAMES:
        module = backends.get(name)
        assert module.NAME == name
        assert callable(module.adamw) and callable(module.load)


def test_every_backend_implements_every_optimizer():
    ops = ("adamw", "lamb", "adafactor", "adafactor_sharded", "sophia", "sophia_hessian", "power_sums", "scale_",
           "cast_fp8")
    for name in backends.NAMES:
        assert all(callable(getattr(backends.get(name), op, None)) for op in ops), name


def test_declared_moment_ops_bind_in_every_backend():
    """Each element-wise op declared in fusedopt/reference/ (_moment_ops) is a
    function of every backend under the op's keyword signature (which
    bucket_op traces); the cpu op's schema and the triton launcher take the
    names _moment_launch passes; an undeclared name is an AttributeError."""
    import inspect

    from fusedopt._resources import shipped_module
    from fusedopt.backends import _moment_ops

    declared = _moment_ops.declared()
    assert {op.name for op in declared} >= {"adamw", "sophia"}
    for name in backends.NAMES:
        module = backends.get(name)
        for op in declared:
            assert list(inspect.signature(getattr(module, op.name)).parameters) == [
                "bucket", *_moment_ops.COMMON, *op.hyper], (name, op.name)
        with pytest.raises(AttributeError, match="no attribute 'not_an_op'"):
            module.not_an_op  # noqa: B018
    for op in declared:
        launcher = inspect.signature(getattr(shipped_module("kernels", op.name), f"launch_{op.name}")).parameters
        assert set(op.hyper) | set(_moment_ops.COMMON) <= set(launcher), op.name
    if "cpu" not in CPU_BACKENDS:
        return
    backends.get("cpu").load()
    for op in declared:
        schema = getattr(torch.ops.fusedopt_cpu, op.name).default._schema
        expected = {"params", "grads", "masters", "steps", "lr_tensor", "sr_seed", "chunk_size",
                    *_moment_ops.COMMON, *op.hyper, *(f"{s}s" for s in op.states), *(f"{s}_scales" for s in op.states),
                    *(("fp8_weights", "fp8_scales", "fp8_amax") if op.fp8_copies else ())}
        assert {a.name for a in schema.arguments} == expected, op.name


def test_backends_lacking_an_optimizer_are_passed_over(monkeypatch):
    """A backend without an optimizer's kernels (as the cuda backend once was
    for Adafactor) is skipped by the automatic choice for that optimizer, and
    asking for it explicitly says why not."""
    monkeypatch.delattr(backends.get("cpu"), "adafactor")
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.delenv("FUSEDOPT_BACKEND", raising=False)
    assert backends.unavailable_reason("cpu", "cpu", "adafactor") == "does not implement adafactor"
    assert backends.unavailable_reason("cpu", "cpu", "adamw") is None
    with pytest.raises(ValueError, match="does not implement"):
        backends.resolve("cpu", "cpu", "adafactor")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="does not implement adafactor"):
        assert backends.resolve(None, "cpu", "adafactor") == "reference"


def test_triton_older_than_the_kernels_need_is_unavailable_with_the_reason(monkeypatch):
    """tl.gather (kernels/fp8_states.py) arrived in triton 3.3."""
    import importlib.metadata
    import importlib.util

    from fusedopt.backends import triton as triton_backend

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.2.0")
    assert triton_backend.unavailable_reason("cuda") == \
        "triton 3.2.0 is too old: the kernels need triton >= 3.3 (`pip install -U triton`)"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.3.1+git1234")
    assert "too old" not in (triton_backend.unavailable_reason("cuda") or "")
