"""Triton kernels of fusedopt (shipped in the wheel as ``fusedopt._kernels``).

Only ``@triton.jit`` functions and their launch helpers live here; they import
triton at module import, so fusedopt imports them lazily (on first use of the
triton backend) through ``fusedopt._resources.shipped_module``.
"""
