"""Shared test setup.

Without a GPU the Triton kernels run through the Triton interpreter, which must
be switched on before triton is first imported: hence the environment variable
is set here, at collection time, before any test module imports fusedopt's
kernels. Launch chunks are shrunk so that small tensors cross chunk and block
boundaries (the interpreter is slow; tests keep sizes small).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt.backends import cpu as cpu_backend  # noqa: E402
from fusedopt.backends import triton as triton_backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

#: backends that run on CPU tensors here (builds the cpu extension once per session)
CPU_BACKENDS = fusedopt.available_backends("cpu")
#: what the backend-parametrized tests run: those, and without a GPU the cuda
#: backend, its kernels run on CPU tensors by the emulator in tests/cuda_emu
TESTED_BACKENDS = CPU_BACKENDS + ([] if HAS_CUDA else ["cuda"])
#: the same without the reference: the backends tested against it
KERNEL_BACKENDS = [b for b in TESTED_BACKENDS if b != "reference"]

_MARKS = {"triton": [pytest.mark.triton], "cuda": [pytest.mark.cuda_emulated]}


def backend_params(backends=TESTED_BACKENDS):
    """`backends` as pytest params, marked: triton (``-m "not triton"`` skips
    the slow interpreter) and cuda_emulated."""
    return [pytest.param(b, marks=_MARKS.get(b, [])) for b in backends]


@pytest.fixture(scope="session")
def emulated_cuda_ops():
    """The emulated cuda ops, called by name as the cuda backend calls its own."""
    from cuda_emu.build import load

    from fusedopt.backends._named_ops import NamedOps

    load()
    return NamedOps("fusedopt_cuda_emu")


@pytest.fixture(autouse=True)
def emulated_cuda(request, monkeypatch):
    """A test run with backend "cuda" on a machine without a GPU gets the cuda
    backend wired to the emulated kernels (tests/cuda_emu): CPU tensors, the
    same Python driver (fusedopt/backends/cuda.py) and kernel sources."""
    callspec = getattr(request.node, "callspec", None)
    if HAS_CUDA or callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    from fusedopt import backends
    from fusedopt.backends import cuda as cuda_backend

    ops = request.getfixturevalue("emulated_cuda_ops")
    monkeypatch.setattr(cuda_backend, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device_type: None)
    monkeypatch.setattr(cuda_backend, "load", lambda: None)
    monkeypatch.setattr(cuda_backend, "_launch", lambda op, device, **args: getattr(ops, op)(**args, stream=0))
    # a block's loop takes 1024 elements: chunks of one full and one partial iteration
    monkeypatch.setattr(cuda_backend, "CHUNK_SIZE", 1280)
    monkeypatch.setattr(backends, "_resolved", {})
    yield


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunk sizes that small test tensors cross: 100 elements per CPU chunk (not
    a multiple of any vector width), 256 per Triton program in blocks of 64,
    4 x 8 tiles for Triton's factored Adafactor passes."""
    monkeypatch.setattr(cpu_backend, "CHUNK_SIZE", 100)
    if not HAS_CUDA:
        monkeypatch.setattr(triton_backend, "CHUNK_SIZE", 256)
        monkeypatch.setattr(triton_backend, "BLOCK_SIZE", 64)
        monkeypatch.setattr(triton_backend, "FACTOR_ROWS", 4)
        monkeypatch.setattr(triton_backend, "FACTOR_COLS", 8)


def pytest_report_header(config):
    return (f"fusedopt backends for CPU tensors here: {CPU_BACKENDS}; CUDA: {HAS_CUDA}"
            f"{'' if HAS_CUDA else ' (the cuda backend runs emulated: tests/cuda_emu)'}")


def pytest_configure(config):
    """One marker per optimizer of optim_db (``-m sophia``), so a new entry needs no line in pyproject.toml."""
    from optim_db import OPTIM_DB

    for info in OPTIM_DB:
        config.addinivalue_line("markers", f"{info.name}: {info.cls.__name__} tests")


def pytest_collection_modifyitems(config, items):
    """Tests in tests/test_<name>.py or test_<name>_*.py carry the marker of optim_db's `<name>`."""
    from optim_db import OPTIM_DB

    names = {info.name for info in OPTIM_DB}
    for item in items:
        stem = item.path.stem.removeprefix("test_")
        name = next((n for n in names if stem == n or stem.startswith(n + "_")), None)
        if name is not None:
            item.add_marker(getattr(pytest.mark, name))
