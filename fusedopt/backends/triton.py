"""The triton backend: kernels/ (shipped as fusedopt._kernels), one launch per
bucket over device-side pointer tables (fusedopt/backends/_tables.py).

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which is how the
kernels are tested on machines without a GPU.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .._resources import shipped_module
from ..reference import lamb as lamb_spec
from . import _tables
from ._bucket import advance_steps
from ._dtypes import CODES

NAME = "triton"
DEVICE_TYPES = ("cuda", "cpu")

#: elements per program, and per loop iteration inside a program; tests shrink
#: them to cross chunk and block boundaries with small tensors
CHUNK_SIZE = 1 << 16
BLOCK_SIZE = 1024
NUM_WARPS = 4


def unavailable_reason(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (`pip install triton`)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors triton runs only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def load() -> None:
    for name in ("adamw", "lamb", "norms"):
        shipped_module("kernels", name)


def adamw(bucket, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mult, found_inf):
    """lr: float or 1-element fp32 tensor; grad_mult, found_inf: 1-element
    fp32 tensors or None; all on the bucket's device."""
    kernels = shipped_module("kernels", "adamw")
    tables = _tables.launch_tables(_tables.moment_rows(bucket), bucket.device, CHUNK_SIZE)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    advance_steps(bucket.steps, found_inf)
    kernels.launch_adamw(
        tables, p_kind=CODES[bucket.dtype], master=bucket.masters is not None, amsgrad=amsgrad,
        maximize=maximize, lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, grad_mult=grad_mult, found_inf=found_inf,
        block=BLOCK_SIZE, num_warps=NUM_WARPS,
    )


def power_sums(tensors, p):
    kernels = shipped_module("kernels", "norms")
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    kernels.launch_power_sums(tables, out, kind=CODES[tensors[0].dtype], p=float(p), block=BLOCK_SIZE,
                              num_warps=NUM_WARPS)
    return out


def scale_(tensors, factor):
    kernels = shipped_module("kernels", "norms")
    tables = _tables.launch_tables([tensors], tensors[0].device, CHUNK_SIZE)
    kernels.launch_scale(tables, factor, kind=CODES[tensors[0].dtype], block=BLOCK_SIZE, num_warps=NUM_WARPS)


def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    kernels = shipped_module("kernels", "lamb")
    tables = _tables.launch_tables(_tables.moment_rows(bucket), bucket.device, CHUNK_SIZE)
    advance_steps(bucket.steps, found_inf)
    common = dict(p_kind=CODES[bucket.dtype], master=bucket.masters is not None, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, bias_correction=bias_correction, adam_w_mode=adam_w_mode,
                  found_inf=found_inf, block=BLOCK_SIZE, num_warps=NUM_WARPS)
    p_sums = torch.empty(tables.n_tensors, dtype=torch.float64, device=bucket.device)
    u_sums = torch.empty_like(p_sums)
    kernels.launch_lamb_moments(tables, p_sums, u_sums, grad_averaging=grad_averaging, maximize=maximize,
                                grad_mult=grad_mult, **common)
    ratio = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    kernels.launch_lamb_apply(tables, ratio, **common)
