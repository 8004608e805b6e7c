"""The triton backend: kernels/ (shipped as fusedopt._kernels), one launch per
bucket over device-side pointer tables (fusedopt/backends/_tables.py).

Runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which is how the
kernels are tested on machines without a GPU.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

from .._resources import shipped_module
from ..reference import adafactor as adafactor_spec
from ..reference import lamb as lamb_spec
from . import _tables
from ._bucket import advance_steps
from ._dtypes import CODES, FP8_FORMATS, STATE_CODES

NAME = "triton"
DEVICE_TYPES = ("cuda", "cpu")

#: elements per program, and per loop iteration inside a program; tests shrink
#: them to cross chunk and block boundaries with small tensors
CHUNK_SIZE = 1 << 16
BLOCK_SIZE = 1024
NUM_WARPS = 4


#: the oldest triton with everything the kernels use (tl.gather: kernels/fp8_states.py);
#: tested with 3.6 (compiled for sm_80/sm_90) and 3.9 (also the interpreter)
MIN_TRITON = (3, 3)


def installed_version() -> str | None:
    """The installed triton's version, None if there is none. Torch's nightly,
    ROCm and XPU wheels ship the `triton` module in packages of other names;
    the module itself is imported only when no package says."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import triton

    return getattr(triton, "__version__", "0")


def unavailable_reason(device_type: str) -> str | None:
    version = installed_version()
    if version is None:
        return "triton is not installed (`pip install triton`)"
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"triton {version} is too old: the kernels need triton >= {need} (`pip install -U triton`)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors triton runs only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def load() -> None:
    for name in ("adafactor", "adamw", "fp8", "lamb", "norms", "sophia"):
        shipped_module("kernels", name)


def _sizes(bucket) -> tuple[int, int]:
    return _tables.launch_sizes(bucket, CHUNK_SIZE, BLOCK_SIZE)


def adamw(bucket, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mult, found_inf):
    """lr: float or 1-element fp32 tensor; grad_mult (fp64), found_inf (fp32):
    1-element tensors or None; all on the bucket's device."""
    kernels = shipped_module("kernels", "adamw")
    block, chunk = _sizes(bucket)
    tables = _tables.launch_tables(_tables.moment_rows(bucket), bucket.device, chunk)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    advance_steps(bucket.steps, found_inf)
    fp8 = bucket.fp8 is not None
    amax = torch.zeros(len(bucket.params), dtype=torch.float64, device=bucket.device) if fp8 else None
    kernels.launch_adamw(
        tables, p_kind=CODES[bucket.dtype], s_kind=STATE_CODES[bucket.state_dtype], master=bucket.masters is not None,
        amsgrad=amsgrad,
        maximize=maximize, lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, grad_mult=grad_mult, found_inf=found_inf,
        sr_seed=bucket.sr_seed, block=block, num_warps=NUM_WARPS,
        fp8_format=FP8_FORMATS[bucket.fp8.weights[0].dtype] if fp8 else None, fp8_amax=amax,
    )
    return amax


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
    block, chunk = _sizes(bucket)
    tables = _tables.launch_tables(_tables.moment_rows(bucket), bucket.device, chunk)
    advance_steps(bucket.steps, found_inf)
    common = dict(p_kind=CODES[bucket.dtype], s_kind=STATE_CODES[bucket.state_dtype],
                  master=bucket.masters is not None, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, bias_correction=bias_correction, adam_w_mode=adam_w_mode,
                  found_inf=found_inf, block=block, num_warps=NUM_WARPS)
    p_sums = torch.empty(tables.n_tensors, dtype=torch.float64, device=bucket.device)
    u_sums = torch.empty_like(p_sums)
    kernels.launch_lamb_moments(tables, p_sums, u_sums, grad_averaging=grad_averaging, maximize=maximize,
                                grad_mult=grad_mult, **common)
    p_sums, u_sums = bucket.whole_tensor_sums(p_sums, u_sums)  # DTensors: over their shards
    ratio = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    kernels.launch_lamb_apply(tables, ratio, sr_seed=bucket.sr_seed, **common)


#: rows x columns of a program of Adafactor's factored row and column passes
FACTOR_ROWS = 16
FACTOR_COLS = 128


def adafactor(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult, found_inf):
    kernels = shipped_module("kernels", "adafactor")
    numeric = shipped_module("kernels", "_numeric")
    exact, bits = numeric.EXACT, numeric.f64_bits  # launch options: no FP contraction; how scalars travel
    combine = shipped_module("kernels", "norms")._combine_kernel
    device = bucket.device
    block, chunk = _sizes(bucket)
    tables = _tables.launch_tables(_tables.adafactor_rows(bucket), device, chunk)
    advance_steps(bucket.steps, found_inf)
    eps1 = torch.finfo(bucket.dtype).eps if eps1 is None else eps1
    n, n_chunks = tables.n_tensors, tables.n_chunks
    dummy = tables.numel  # stands in for absent pointer arguments
    stats_dtype, exp_avg_dtype = _tables.adafactor_storage(bucket)
    flags = dict(P_KIND=CODES[bucket.dtype], S_KIND=CODES[stats_dtype], MASTER=bucket.masters is not None,
                 GRAD_MULT=grad_mult is not None, MAXIMIZE=maximize, HAS_FOUND_INF=found_inf is not None)
    pointers = dict(grad_mult_ptr=dummy if grad_mult is None else grad_mult,
                    found_inf_ptr=dummy if found_inf is None else found_inf)
    head = (tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, n)
    math_dtype = torch.float64 if bucket.dtype == torch.float64 else torch.float32  # rmean's and the scale's
    p_sq = torch.empty(n, dtype=torch.float64, device=device)
    u_sq = torch.empty_like(p_sq)
    if bucket.kind:  # tensors of 2+ dims
        ft = _tables.factored_tables([p.shape for p in bucket.params], device, FACTOR_ROWS, FACTOR_COLS)
        rows, cols, slice_first = ft.rows, ft.cols, ft.slice_first
        rmean = torch.empty(ft.n_slices, dtype=math_dtype, device=device)
        p_part = torch.empty(len(ft.row_tensor), dtype=torch.float64, device=device)
        kernels._row_stats[(len(ft.row_tensor),)](
            tables.table, n, ft.row_tensor, ft.row_start, rows, cols, tables.numel, bits(beta2_decay),
            pointers["grad_mult_ptr"], pointers["found_inf_ptr"], p_part, **flags, RB=FACTOR_ROWS, CB=FACTOR_COLS,
            num_warps=NUM_WARPS, **exact)
        combine[(n,)](p_part, ft.row_first, p_sq, IS_MAX=False, BLOCK=256, num_warps=NUM_WARPS, **exact)
        kernels._col_stats[(len(ft.col_tensor),)](
            tables.table, n, ft.col_tensor, ft.col_batch, ft.col_start, ft.col_slice, rows, cols, bits(beta2_decay),
            bits(eps1), pointers["grad_mult_ptr"], pointers["found_inf_ptr"], rmean, **flags, RB=FACTOR_ROWS,
            CB=FACTOR_COLS,
            num_warps=NUM_WARPS, **exact)
        u_part = torch.empty(n_chunks, dtype=torch.float64, device=device)
        kernels._factored_unorm[(n_chunks,)](
            *head, rows, cols, slice_first, rmean, bits(eps1), pointers["grad_mult_ptr"], pointers["found_inf_ptr"],
            u_part, **flags, CHUNK=tables.chunk_size, BLOCK=block, num_warps=NUM_WARPS, **exact)
        combine[(n,)](u_part, tables.chunk_first, u_sq, IS_MAX=False, BLOCK=256, num_warps=NUM_WARPS, **exact)
    else:  # 0-d and 1-d tensors
        rows = cols = slice_first = dummy
        rmean = torch.empty(1, dtype=math_dtype, device=device)
        partials = torch.empty(2 * n_chunks, dtype=torch.float64, device=device)
        kernels._vector_stats[(n_chunks,)](
            *head, n_chunks, bits(beta2_decay), bits(eps1), pointers["grad_mult_ptr"], pointers["found_inf_ptr"],
            partials, **flags, CHUNK=tables.chunk_size, BLOCK=block, num_warps=NUM_WARPS, **exact)
        combine[(n,)](partials, tables.chunk_first, p_sq, IS_MAX=False, BLOCK=256, num_warps=NUM_WARPS, **exact)
        combine[(n,)](partials[n_chunks:], tables.chunk_first, u_sq, IS_MAX=False, BLOCK=256, num_warps=NUM_WARPS,
                      **exact)
    scale = adafactor_spec.scales(p_sq, u_sq, tables.numel, torch.stack(bucket.steps), lr, eps2, d, math_dtype)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    kernels._apply[(n_chunks,)](
        *head, rows, cols, slice_first, rmean, bits(eps1), bits(0.0 if lr_tensor is not None else lr),
        dummy if lr_tensor is None else lr_tensor, bits(weight_decay), bits(0.0 if beta1 is None else 1.0 - beta1),
        scale,
        pointers["grad_mult_ptr"], pointers["found_inf_ptr"], 0 if bucket.sr_seed is None else bucket.sr_seed,
        SR=bucket.sr_seed is not None, **flags, FACTORED=bool(bucket.kind),
        BETA1=beta1 is not None, M_KIND=STATE_CODES[exp_avg_dtype], LR_IS_PTR=lr_tensor is not None,
        CHUNK=tables.chunk_size, BLOCK=block, num_warps=NUM_WARPS, **exact)


def sophia(bucket, *, lr, beta1, rho, bs, weight_decay, maximize, grad_mult, found_inf):
    kernels = shipped_module("kernels", "sophia")
    block, chunk = _sizes(bucket)
    tables = _tables.launch_tables(_tables.moment_rows(bucket, "hessian"), bucket.device, chunk)
    advance_steps(bucket.steps, found_inf)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    kernels.launch_step(tables, p_kind=CODES[bucket.dtype], s_kind=STATE_CODES[bucket.state_dtype],
                        master=bucket.masters is not None, lr=lr,
                        lr_tensor=lr_tensor, beta1=beta1, rho_bs=rho * bs, weight_decay=weight_decay,
                        maximize=maximize, grad_mult=grad_mult, found_inf=found_inf, block=block,
                        num_warps=NUM_WARPS, sr_seed=bucket.sr_seed)


def sophia_hessian(bucket, *, beta2):
    kernels = shipped_module("kernels", "sophia")
    block, chunk = _sizes(bucket)
    tables = _tables.launch_tables(_tables.moment_rows(bucket, "hessian"), bucket.device, chunk)
    kernels.launch_hessian(tables, p_kind=CODES[bucket.dtype], s_kind=STATE_CODES[bucket.state_dtype], beta2=beta2,
                           block=block, num_warps=NUM_WARPS)


def cast_fp8(inputs, outputs, scales):
    kernels = shipped_module("kernels", "fp8")
    device = inputs[0].device
    tables = _tables.launch_tables([inputs, outputs], device, CHUNK_SIZE)
    amax = torch.empty(len(inputs), dtype=torch.float64, device=device)
    kernels.launch_cast(tables, scales, amax, kind=CODES[inputs[0].dtype], fmt=FP8_FORMATS[outputs[0].dtype],
                        block=BLOCK_SIZE, num_warps=NUM_WARPS)
    return amax
