"""Build the cuda backend's extension for the CPU: csrc/cuda/*.cu translated
to C++ (translate.py) against the emulator (cuda_emu.h), with
csrc/bindings_cuda.cpp built under FUSEDOPT_CUDA_EMULATION, so its ops
register as torch.ops.fusedopt_cuda_emu and take CPU tensors.

Cached under fusedopt's JIT cache, keyed by the sources and torch's version:
the first test that runs the cuda backend builds it (~20 s on 2 cores).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .translate import translate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"


def _inputs() -> list[Path]:
    return sorted([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh"), *(CSRC / "cuda").glob("*.cu"),
                   CSRC / "bindings_cuda.cpp", *HERE.glob("*.h"), HERE / "translate.py", Path(__file__)])


def load():
    """torch.ops.fusedopt_cuda_emu, built on first use."""
    from torch.utils import cpp_extension

    from fusedopt import _jit

    h = hashlib.sha256(torch.__version__.encode())
    for path in _inputs():
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    build = _jit.cache_root() / f"fusedopt_cuda_emu_{h.hexdigest()[:16]}"
    sources = build / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    translated = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        out = sources / f"{cu.stem}.cpp"
        text = translate(cu.read_text())
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
        translated.append(str(out))
    _jit.check_toolchain("cpu")
    cpp_extension.load(
        name="fusedopt_cuda_emu", sources=[str(CSRC / "bindings_cuda.cpp"), *translated],
        # -ffp-contract=off: the kernels are built with --fmad=false; a host compiler that may contract
        # a*b+c into an FMA (GCC's default where the target has FMA, e.g. aarch64) would round differently
        extra_cflags=["-O1", "-ffp-contract=off", "-DFUSEDOPT_CUDA_EMULATION", f"-I{HERE}", f"-I{CSRC / 'include'}",
                      f"-I{CSRC / 'cuda'}"],
        build_directory=str(build), is_python_module=False, verbose=False)
    return torch.ops.fusedopt_cuda_emu
