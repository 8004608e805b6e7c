"""Command line: ``python -m fusedopt {info,build,bench}``.

info   versions, devices, the toolchain, every backend for every device type
       (available, or why not) and the JIT cache; builds nothing.
build  compile the C++/CUDA extensions now (and import the Triton kernels),
       e.g. in a Docker image build, so the first step does not wait.
bench  the benchmarks in bench/ (shipped as fusedopt._bench); see --help.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

import torch

from . import __version__, _jit, backends
from ._resources import csrc_dir, shipped_module


def _version_of(command: list[str], line_with: str = "") -> str:
    """The first line of a tool's version output (or the first containing `line_with`)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return next((line for line in lines if line_with in line), "?")


def _backend_status(name: str, device_type: str) -> str:
    reason = backends.unavailable_reason(name, device_type)
    if reason:
        return f"unavailable: {reason}"
    if name in ("cpu", "cuda"):
        return "available (built, cached)" if _jit.is_built(name) else \
            "available: builds on first use (`python -m fusedopt build`)"
    return "available"


def info() -> int:
    print(f"fusedopt {__version__}")
    from .backends.triton import installed_version

    triton_version = installed_version() or "not installed"
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'}), triton {triton_version}")
    print(f"platform: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("cuda: no device")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  "
          f"FUSEDOPT_BACKEND={os.environ.get('FUSEDOPT_BACKEND', '')!r}")
    cxx = os.environ.get("CXX", "c++")
    print(f"toolchain: {cxx}: {_version_of([cxx, '--version'])}; ninja: {_version_of(['ninja', '--version'])}")
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    print(f"nvcc: {_version_of([nvcc, '--version'], 'release') if nvcc else 'not found'} ({nvcc})")
    print(f"sources: {csrc_dir()}")
    print(f"JIT cache: {_jit.cache_root()}  (FUSEDOPT_CACHE_DIR, else TORCH_EXTENSIONS_DIR, else ~/.cache/fusedopt)")
    for device_type in ("cpu", "cuda"):
        print(f"backends for {device_type} tensors:")
        for name in backends.NAMES:
            print(f"  {name:10s} {_backend_status(name, device_type)}")
    return 0


#: the backends `build` knows how to prepare
_BUILT = ("cpu", "cuda", "triton")


def build(names: list[str]) -> int:
    failed = 0
    for name in names:
        device_type = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        # cuda: whether it can be built (a GPU-less image build can, with TORCH_CUDA_ARCH_LIST)
        reason = _jit.toolchain_problem("cuda") if name == "cuda" else backends.unavailable_reason(name, device_type)
        if reason:
            print(f"{name}: skipped ({reason})")
            continue
        try:
            if name == "triton":
                shipped_module("kernels", "adamw")
                print("triton: kernels import; Triton compiles each kernel at its first launch")
            else:
                print(f"{name}: built in {_jit.load_extension(name)}")
        except Exception as exc:  # noqa: BLE001  (report and go on with the others)
            failed += 1
            print(f"{name}: FAILED\n{exc}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fusedopt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends, JIT cache")
    b = sub.add_parser("build", help="pre-build the compiled backends")
    # no `choices`: argparse checks an empty nargs="*" list against them and fails
    b.add_argument("backends", nargs="*", metavar="{cpu,cuda,triton}", help="default: all three")
    sub.add_parser("bench", help="run the benchmarks (arguments after `bench` go to it)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "build":
        unknown = sorted(set(args.backends) - set(_BUILT))
        if unknown:
            parser.error(f"build: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(_BUILT)}")
        return build(args.backends or list(_BUILT))
    return shipped_module("bench", "run").main(rest)


if __name__ == "__main__":
    sys.exit(main())
