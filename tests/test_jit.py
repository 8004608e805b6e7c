"""The first-use build: cache location, toolchain errors, concurrent builds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusedopt import _jit

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSEDOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_ext"))
    assert _jit.cache_root() == tmp_path / "torch_ext"
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "ours"))
    assert _jit.cache_root() == tmp_path / "ours"
    assert _jit.build_dir("cpu").parent == tmp_path / "ours"
    monkeypatch.delenv("FUSEDOPT_CACHE_DIR")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_root() == tmp_path / "xdg" / "fusedopt"


def test_cache_key_changes_with_the_sources(monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    (src / "include" / "fusedopt").mkdir(parents=True)
    (src / "a.cpp").write_text("int a;")
    monkeypatch.setattr(_jit, "csrc_dir", lambda: src)
    first = _jit._cache_key(_jit.SPECS["cpu"], ["-O3"])
    assert first == _jit._cache_key(_jit.SPECS["cpu"], ["-O3"])
    (src / "a.cpp").write_text("int b;")
    assert _jit._cache_key(_jit.SPECS["cpu"], ["-O3"]) != first
    assert _jit._cache_key(_jit.SPECS["cpu"], ["-O2"]) != _jit._cache_key(_jit.SPECS["cpu"], ["-O3"])


def test_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(_jit.BuildError, match="apt install g\\+\\+"):
        _jit.check_toolchain("cpu")


def test_missing_ninja_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ninja", None)  # `import ninja` fails
    monkeypatch.setattr(_jit.shutil, "which", lambda name: None if name == "ninja" else "/usr/bin/" + name)
    with pytest.raises(_jit.BuildError, match="pip install ninja"):
        _jit.check_toolchain("cpu")


def test_cuda_toolchain_check_explains(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    with pytest.raises(_jit.BuildError, match="CUDA device"):
        _jit.check_toolchain("cuda")


def test_broken_build_reports_the_compiler_error(monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    (src / "include" / "fusedopt").mkdir(parents=True)
    (src / "cpu").mkdir()
    (src / "bindings_cpu.cpp").write_text("this is not C++;\n")
    (src / "cpu" / "adamw.cpp").write_text("int x;\n")
    monkeypatch.setattr(_jit, "csrc_dir", lambda: src)
    monkeypatch.setattr(_jit, "_loaded", {})
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(_jit.BuildError, match="(?s)could not build its cpu kernels.*FUSEDOPT_VERBOSE_BUILD"):
        _jit.load_extension("cpu")


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path):
    """Two processes, one empty cache: both get a working extension, and the
    shared objects were compiled once (ninja logs each compilation)."""
    code = ("import torch, fusedopt\n"
            "p = torch.ones(5, requires_grad=True); p.grad = torch.ones(5)\n"
            "fusedopt.FusedAdamW([p], backend='cpu').step()\n"
            "print('OK', p.sum().item())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FUSEDOPT_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        assert "OK" in out
    logs = list(tmp_path.glob("*/.ninja_log"))
    assert len(logs) == 1
    compiled = [line.split("\t")[3] for line in logs[0].read_text().splitlines()[1:]]
    assert sorted(compiled) == sorted(set(compiled)), compiled  # nothing compiled twice
    assert any(name.endswith(".so") for name in compiled)
