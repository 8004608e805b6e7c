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
#: the same without the reference: the backends tested against it
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


def backend_params(backends=CPU_BACKENDS):
    """`backends` as pytest params, triton's marked (``-m "not triton"`` skips the slow interpreter)."""
    return [pytest.param(b, marks=[pytest.mark.triton] if b == "triton" else []) for b in backends]


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
    return f"fusedopt backends for CPU tensors here: {CPU_BACKENDS}; CUDA: {HAS_CUDA}"
