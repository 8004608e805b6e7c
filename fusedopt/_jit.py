"""First-use compilation of the C++ (CPU) and CUDA extensions.

``load_extension("cpu")`` builds ``csrc/bindings_cpu.cpp`` + ``csrc/cpu/*.cpp``
with ``torch.utils.cpp_extension.load`` (ninja), registers the ops under
``torch.ops.fusedopt_cpu`` and caches the shared library, keyed by a hash of
the sources, the compiler flags and the torch/CUDA/Python versions, so editing a
source or upgrading torch rebuilds and nothing else does.

Cache directory: ``$FUSEDOPT_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/fusedopt`` (``$XDG_CACHE_HOME`` respected). A file lock around the
build makes several processes starting together compile once: the first builds,
the others wait and then load the finished library.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ._resources import csrc_dir


class BuildError(RuntimeError):
    """A backend's extension could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class ExtensionSpec:
    kind: str       # "cpu" or "cuda": also the folder of csrc/ its kernels live in
    binding: str    # the file that registers the ops, relative to csrc/
    suffix: str     # what the kernels' files end with

    @property
    def sources(self) -> tuple[str, ...]:
        """The binding and every kernel file of csrc/<kind>/ (relative to
        csrc/), collected: a new op's file is built without being listed."""
        folder = csrc_dir() / self.kind
        return (self.binding, *sorted(f"{self.kind}/{p.name}" for p in folder.glob(f"*{self.suffix}")))


SPECS = {
    "cpu": ExtensionSpec("cpu", "bindings_cpu.cpp", ".cpp"),
    "cuda": ExtensionSpec("cuda", "bindings_cuda.cpp", ".cu"),
}

_loaded: dict[str, Path] = {}
_lock = threading.Lock()


def cache_root() -> Path:
    for var in ("FUSEDOPT_CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedopt"


def _arch_flags() -> list[str]:
    """The target CPU: FUSEDOPT_CPU_ARCH (e.g. x86-64-v3, for a cache or an
    image shared by several kinds of CPU), else this machine's (-march=native;
    -mcpu=native on POWER, whose GCC has no -march=native). x86 GCC keeps to
    256-bit vectors on AVX-512 CPUs unless told otherwise:
    -mprefer-vector-width=512 (an x86-only option)."""
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64", "i386", "i686")
    arch = os.environ.get("FUSEDOPT_CPU_ARCH")
    if arch:
        flags = [f"-mcpu={arch}" if machine.startswith(("ppc", "powerpc")) else f"-march={arch}"]
    else:
        flags = ["-mcpu=native" if machine.startswith(("ppc", "powerpc")) else "-march=native"]
    return flags + (["-mprefer-vector-width=512"] if x86 else [])


def _cpu_flags() -> list[str]:
    # -march=native: the library is built on, and cached for, this machine
    # (the CPU's model and instruction-set flags are part of the cache key;
    # FUSEDOPT_CPU_ARCH picks a portable target instead). -fno-math-errno lets sqrt
    # vectorise; -ffp-contract=off keeps a*b+c as two roundings, as torch's
    # own kernels compute them (fused multiply-adds are written out where torch
    # uses them); OpenMP runs the chunk loop. -mprefer-vector-width=512: on
    # AVX-512 CPUs GCC otherwise keeps to 256-bit vectors; the wider ones
    # halve the cost of the bf16 conversions (bench states, measured on a
    # Xeon with AVX-512: bf16-state AdamW 6.2 -> 4.7 ms per 10M params, fp32
    # unchanged). No effect where AVX-512 is absent. -fno-trapping-math: we
    # never read the FP exception flags, and without it GCC will not turn a
    # select between two float results (the FP8 state decoding) into a vector
    # blend, leaving the whole loop scalar (FP8-state AdamW 24 -> see README).
    # It changes no value: rounding stays IEEE round-to-nearest-even.
    # The C++ standard is left to torch.utils.cpp_extension, which knows what
    # its headers need.
    return ["-O3", *_arch_flags(), "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]


def _cuda_archs() -> list[tuple[int, int, str, bool]]:
    """The GPU architectures to compile for, as (major, minor, suffix, +PTX):
    TORCH_CUDA_ARCH_LIST's (e.g. "8.0;9.0", as torch's own extension builds
    read it: how a Docker image build without a GPU prebuilds; "9.0a" names
    an architecture-specific target, as the H100/H200 machines' images set it;
    "+PTX" also embeds PTX for later GPUs), else those of the GPUs present."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not listed:
        return sorted({(*torch.cuda.get_device_capability(i), "", False) for i in range(torch.cuda.device_count())})
    archs: dict[tuple[int, int, str], bool] = {}
    for item in re.split(r"[;\s]+", listed):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if match is None:
            raise BuildError(f"TORCH_CUDA_ARCH_LIST={listed!r}: cannot read {item!r}; give compute capabilities, "
                             "e.g. '8.0;9.0' or '9.0a'")
        key = (int(match[1]), int(match[2]), match[3])
        archs[key] = archs.get(key, False) or match[4] is not None
    return sorted((*key, ptx) for key, ptx in archs.items())


def _cuda_arch_flags() -> list[str]:
    flags = []
    for major, minor, suffix, ptx in _cuda_archs():
        arch = f"{major}{minor}{suffix}"
        flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += [f"-gencode=arch=compute_{arch},code=compute_{arch}"]
    return flags


def _flags(kind: str) -> tuple[list[str], list[str], list[str]]:
    """(cflags, cuda_cflags, ldflags) for one extension."""
    include = f"-I{csrc_dir() / 'include'}"
    if kind == "cpu":
        return _cpu_flags() + [include], [], ["-fopenmp"]
    cflags = ["-O3", include]
    # IEEE division and square root (no --use_fast_math) and no contraction,
    # like the CPU build: the kernels spell out the fused multiply-adds they use.
    cuda = ["-O3", "--fmad=false", include] + _cuda_arch_flags()
    return cflags, cuda, []


def _cpu_identity(cpuinfo: str | None = None) -> str:
    """What -march=native compiles for: the CPU's model and its instruction-set
    flags (one model name can cover CPUs with and without AVX-512, e.g. a
    cloud's "AMD EPYC"; a library built for one must not load on the other).
    `cpuinfo`: /proc/cpuinfo's text (read when None)."""
    try:
        lines = (Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo).splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    keys = ("model name", "flags", "Features", "cpu\t", "CPU implementer", "CPU part")
    found: dict[str, str] = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if line.startswith(keys) and key not in found:  # the first CPU's; they agree on a machine
            found[key] = line
    return platform.machine() + "\n" + "\n".join(found.values())


def _cache_key(spec: ExtensionSpec, flags) -> str:
    h = hashlib.sha256()
    root = csrc_dir()
    files = sorted(p for p in root.rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"})
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    h.update(repr((flags, torch.__version__, torch.version.cuda, sys.version_info[:2])).encode())
    if "native" in repr(flags):  # -march=native (-mcpu=native) builds for this CPU: it is part of the key
        h.update(_cpu_identity().encode())
    return h.hexdigest()[:16]


def check_toolchain(kind: str) -> None:
    """Raise BuildError naming what to install when a build cannot even start."""
    try:
        import ninja  # the pip package; its binary is not on PATH unless the venv is activated

        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        raise BuildError("fusedopt needs ninja to compile its C++ kernels: `pip install ninja`.")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(
            f"fusedopt needs a C++ compiler to build its {kind} kernels and `{cxx}` is not on PATH: "
            "install one (Debian/Ubuntu: `apt install g++`; conda: `conda install gxx_linux-64`) "
            "or set CXX."
        )
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None or not (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
            raise BuildError("the cuda backend needs a CUDA device and a CUDA build of torch."
                             + ("" if torch.version.cuda is None else
                                " (To prebuild without a GPU, set TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0'.)"))
        if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
            raise BuildError(
                "fusedopt needs nvcc to build its CUDA kernels: install the CUDA toolkit matching "
                f"torch's CUDA {torch.version.cuda} and set CUDA_HOME (or put nvcc on PATH)."
            )


def toolchain_problem(kind: str) -> str | None:
    """check_toolchain's message, or None when the build can start."""
    try:
        check_toolchain(kind)
    except BuildError as exc:
        return str(exc)
    return None


def build_dir(kind: str) -> Path:
    spec = SPECS[kind]
    return cache_root() / f"fusedopt_{kind}_{_cache_key(spec, _flags(kind))}"


def load_extension(kind: str) -> Path:
    """Build (once, cached) and load the extension; return its build directory.

    Raises BuildError with the reason and the compiler output's tail on failure.
    """
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        check_toolchain(kind)
        spec = SPECS[kind]
        cflags, cuda_cflags, ldflags = _flags(kind)
        directory = build_dir(kind)
        if _load_built(directory):  # built before (the key covers sources, flags and CPU): no lock, no ninja
            _loaded[kind] = directory
            return directory
        from torch.utils import cpp_extension

        verbose = os.environ.get("FUSEDOPT_VERBOSE_BUILD", "0") == "1"
        lock_path = directory.parent / f"{directory.name}.lock"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock_file = open(lock_path, "w")
        except OSError as exc:
            raise BuildError(
                f"fusedopt cannot build its {kind} kernels in {directory}: {exc}. Point FUSEDOPT_CACHE_DIR "
                "(or TORCH_EXTENSIONS_DIR) at a writable directory, or prebuild there with "
                "`python -m fusedopt build`.") from exc
        with lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # other processes wait here, then find it built
            try:
                # torch's own build lock: left behind by a build that was killed (we hold the
                # flock, so no live build owns it), it would make torch wait for ever
                (directory / "lock").unlink(missing_ok=True)
                cpp_extension.load(
                    name=directory.name,
                    sources=[str(csrc_dir() / s) for s in spec.sources],
                    extra_cflags=cflags,
                    extra_cuda_cflags=cuda_cflags or None,
                    extra_ldflags=ldflags,
                    build_directory=str(directory),
                    is_python_module=False,
                    verbose=verbose,
                )
            except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
                # torch remembers the failed attempt's version and would only try to load the
                # missing library next time: forget it, so a retry in this process builds again
                cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(directory.name, None)
                raise BuildError(
                    f"fusedopt could not build its {kind} kernels in {directory}.\n"
                    f"{_tail(str(exc))}\n"
                    "Rerun with FUSEDOPT_VERBOSE_BUILD=1 for the full compiler output; "
                    "`python -m fusedopt info` shows the toolchain it found."
                ) from exc
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        _loaded[kind] = directory
        return directory


def _load_built(directory: Path) -> bool:
    """Load the library already built in `directory`, if there is one that loads."""
    library = directory / f"{directory.name}.so"
    if not library.exists():
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):  # e.g. still being linked by another process: take the locked path
        return False
    return True


def is_built(kind: str) -> bool:
    """Whether a cached library for the current sources exists (no build)."""
    try:
        directory = build_dir(kind)
    except Exception:  # noqa: BLE001  (e.g. no CUDA device to pick an arch for)
        return False
    return (directory / f"{directory.name}.so").exists()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
