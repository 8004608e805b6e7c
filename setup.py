"""Packaging only: no compiler runs at install time.

The C++/CUDA sources (csrc/), the Triton kernels (kernels/) and the benchmarks
(bench/) live at the top of the repository and are shipped inside the wheel as
``fusedopt._csrc``, ``fusedopt._kernels`` and ``fusedopt._bench``, so that the
first use of a backend can JIT-compile from an installed copy with the source
tree absent (see fusedopt/_resources.py).
"""
from setuptools import setup

setup(
    packages=[
        "fusedopt",
        "fusedopt.backends",
        "fusedopt.distributed",
        "fusedopt.optim",
        "fusedopt.reference",
        "fusedopt._kernels",
        "fusedopt._bench",
        "fusedopt._bench.examples",
        "fusedopt._csrc",
    ],
    package_dir={
        "fusedopt._kernels": "kernels",
        "fusedopt._bench": "bench",
        "fusedopt._csrc": "csrc",
    },
    package_data={
        "fusedopt._csrc": ["*.cpp", "*.h", "include/fusedopt/*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"],
        "fusedopt._bench": ["native/*.cpp"],
    },
    include_package_data=False,
)
