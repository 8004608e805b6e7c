"""The first-use build: cache location and key, toolchain errors, retries and stale locks.
(Concurrent first builds: tests/test_packaging.py, on an installed copy.)"""
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


def test_cache_key_holds_the_cpus_instruction_set(monkeypatch):
    """-march=native: one model name ("AMD EPYC") can cover CPUs with and
    without AVX-512, and a shared cache must not hand one's library to the other."""
    model = "processor\t: 0\nmodel name\t: AMD EPYC\n"
    with_avx512 = _jit._cpu_identity(model + "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    without = _jit._cpu_identity(model + "flags\t\t: fpu sse2 avx2\n")
    assert with_avx512 != without and "AMD EPYC" in without
    assert _jit._cpu_identity(model + "flags\t\t: fpu sse2 avx2\nprocessor\t: 1\nflags\t\t: other\n") == without


def test_portable_cpu_target(monkeypatch):
    monkeypatch.delenv("FUSEDOPT_CPU_ARCH", raising=False)
    native = _jit._flags("cpu")[0]
    monkeypatch.setenv("FUSEDOPT_CPU_ARCH", "x86-64-v3")
    portable = _jit._flags("cpu")[0]
    assert "-march=x86-64-v3" in portable and "-march=native" not in portable
    assert _jit._cache_key(_jit.SPECS["cpu"], portable) != _jit._cache_key(_jit.SPECS["cpu"], native)
    # a portable build (and the cuda extension: no -march=native) is one cache entry for every CPU,
    # so an image prebuilt on one machine serves another; a native build is not
    portable_key, native_key = _jit._cache_key(_jit.SPECS["cpu"], portable), _jit._cache_key(_jit.SPECS["cpu"], native)
    monkeypatch.setattr(_jit, "_cpu_identity", lambda cpuinfo=None: "another CPU")
    assert _jit._cache_key(_jit.SPECS["cpu"], portable) == portable_key
    assert _jit._cache_key(_jit.SPECS["cpu"], native) != native_key
    monkeypatch.delenv("FUSEDOPT_CPU_ARCH")
    cuda_flags = _jit._flags("cuda")
    assert "native" not in repr(cuda_flags)
    monkeypatch.setattr(_jit.platform, "machine", lambda: "aarch64")
    assert "-mprefer-vector-width=512" not in _jit._flags("cpu")[0]  # an x86-only option


def _tiny_sources(root: Path, body: str = "int fusedopt_tiny_{i} = {i};\n") -> Path:
    """A csrc/ whose cpu sources are tiny C++ files: a build in seconds."""
    src = root / "csrc"
    (src / "include" / "fusedopt").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(_jit.SPECS["cpu"].sources):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(body.format(i=i))
    return src


@pytest.fixture
def tiny_tree(monkeypatch, tmp_path):
    src = _tiny_sources(tmp_path)
    monkeypatch.setattr(_jit, "csrc_dir", lambda: src)
    monkeypatch.setattr(_jit, "_loaded", {})
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    return src


def test_retry_in_the_same_process_builds_again(monkeypatch, tiny_tree, tmp_path):
    """A notebook user fixes what broke the build (here the compiler) and
    retries with the same cache key: torch's JIT would only try to load the
    library the failed attempt never made."""
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.raises(_jit.BuildError, match="could not build"):
        _jit.load_extension("cpu")
    monkeypatch.delenv("CXX")
    directory = _jit.load_extension("cpu")
    assert (directory / f"{directory.name}.so").exists()


def test_unwritable_cache_says_what_to_set(monkeypatch, tiny_tree, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "a_file" / "cache"))  # mkdir fails, even for root
    with pytest.raises(_jit.BuildError, match="FUSEDOPT_CACHE_DIR"):
        _jit.load_extension("cpu")


def test_built_library_loads_without_the_lock(monkeypatch, tiny_tree):
    """A prebuilt cache (an image's, read-only) loads without writing to it."""
    directory = _jit.load_extension("cpu")
    lock = directory.parent / f"{directory.name}.lock"
    lock.unlink()
    lock.mkdir()  # the lock file cannot be opened for writing now
    monkeypatch.setattr(_jit, "_loaded", {})
    assert _jit.load_extension("cpu") == directory


def test_lock_left_by_a_killed_build_does_not_hang(tiny_tree, tmp_path):
    """torch's own build lock, left in the build folder by a killed process
    (a preempted job), would make every later build wait for ever."""
    directory = _jit.build_dir("cpu")
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")
    code = ("from pathlib import Path\nfrom fusedopt import _jit\n"
            f"_jit.csrc_dir = lambda: Path({str(tiny_tree)!r})\n"
            "print(_jit.load_extension('cpu'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FUSEDOPT_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (directory / f"{directory.name}.so").exists()


def test_cuda_architectures_from_torch_cuda_arch_list(monkeypatch):
    """A Docker image build has no GPU to ask: TORCH_CUDA_ARCH_LIST names the
    architectures (as for torch's own extension builds)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0 8.0;8.0+PTX")
    assert _jit._cuda_archs() == [(8, 0, "", True), (9, 0, "", False)]
    assert _jit._cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80",
                                       "-gencode=arch=compute_90,code=sm_90"]
    # what the H200 machines' images set (a review's GPU run: the cuda backend refused to build)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert _jit._cuda_arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(_jit.BuildError, match="give compute capabilities"):
        _jit._cuda_archs()
