"""The cuda backend: multi-tensor CUDA kernels (csrc/cuda, csrc/bindings_cuda.cpp),
JIT-compiled with nvcc on first use for the GPUs present.

One launch per bucket over the same device-side tables as the triton backend
(fusedopt/backends/_tables.py); the kernel reads lr, grad_mult, found_inf and
each tensor's step from device memory, so a step never waits on the host.
"""
from __future__ import annotations

import torch

from .. import _jit
from ..reference import lamb as lamb_spec
from . import _tables
from ._bucket import advance_steps
from ._dtypes import CODES, FP8_FORMATS, FP8_STATE_DTYPE, STATE_CODES

NAME = "cuda"
DEVICE_TYPES = ("cuda",)

#: elements per thread block's chunk
CHUNK_SIZE = 1 << 16


def unavailable_reason(device_type: str) -> str | None:
    if torch.version.cuda is not None and not torch.cuda.is_available():
        return "no CUDA device"  # (a build is still possible with TORCH_CUDA_ARCH_LIST: `python -m fusedopt build`)
    return _jit.toolchain_problem("cuda")


def load() -> None:
    _jit.load_extension("cuda")


def _chunk(bucket) -> int:
    return _tables.launch_sizes(bucket, CHUNK_SIZE)[1]


def _launch(op: str, device: torch.device, *args) -> None:
    """The extension's op `op` with `args` and the handle of `device`'s current
    stream, on `device`: every launch of this backend goes through here
    (tests/conftest.py points it at the kernels run on the CPU by tests/cuda_emu)."""
    with torch.cuda.device(device):
        getattr(torch.ops.fusedopt_cuda, op)(*args, torch.cuda.current_stream(device).cuda_stream)


def adamw(bucket, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mult, found_inf):
    """lr: float or 1-element fp32 tensor; grad_mult (fp64), found_inf (fp32):
    1-element tensors or None; all on the bucket's device (the optimizer's base
    class sees to that)."""
    tables = _tables.launch_tables(_tables.moment_rows(bucket), bucket.device, _chunk(bucket))
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    advance_steps(bucket.steps, found_inf)
    fp8 = bucket.fp8 is not None
    amax = partials = None
    if fp8:  # zeros: a step GradScaler skips leaves them, and the optimizer discards them
        amax = torch.zeros(len(bucket.params), dtype=torch.float64, device=bucket.device)
        partials = torch.zeros(tables.n_chunks, dtype=torch.float64, device=bucket.device)
    _launch("adamw", bucket.device,
            tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.chunk_size,
            CODES[bucket.dtype], STATE_CODES[bucket.state_dtype],
            bucket.masters is not None, 0.0 if lr_tensor is not None else lr, lr_tensor, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, grad_mult, found_inf, bucket.sr_seed,
            FP8_FORMATS[bucket.fp8.weights[0].dtype] if fp8 else -1, tables.chunk_first if fp8 else None, partials,
            amax)
    return amax


def power_sums(tensors, p):
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=device)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    _launch("power_sums", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_first, tables.chunk_size, CODES[tensors[0].dtype], float(p), partials, out)
    return out


def scale_(tensors, factor):
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    _launch("scale_", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_size, CODES[tensors[0].dtype], factor)


def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket), device, _chunk(bucket))
    advance_steps(bucket.steps, found_inf)
    head = (tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start)
    kind, state_kind, master = CODES[bucket.dtype], STATE_CODES[bucket.state_dtype], bucket.masters is not None
    partials = torch.empty(2 * tables.n_chunks, dtype=torch.float64, device=device)
    p_sums = torch.empty(tables.n_tensors, dtype=torch.float64, device=device)
    u_sums = torch.empty_like(p_sums)
    _launch("lamb_moments", device, *head, tables.chunk_first, tables.chunk_size, kind, state_kind, master, beta1,
            beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, maximize, grad_mult, found_inf,
            partials, p_sums, u_sums)
    p_sums, u_sums = bucket.whole_tensor_sums(p_sums, u_sums)  # DTensors: over their shards
    ratio = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    _launch("lamb_apply", device, *head, tables.chunk_size, kind, state_kind, master, ratio, beta1, beta2, eps,
            weight_decay, bias_correction, adam_w_mode, found_inf, bucket.sr_seed)


def adafactor(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult, found_inf):
    """The launch sequence of csrc/cuda/adafactor.cu for one bucket kind
    (factored tensors with their task layout, or 0-d/1-d ones), on the
    current stream, with fp64 scratch allocated here."""
    device = bucket.device
    tables = _tables.launch_tables(_tables.adafactor_rows(bucket), device, _chunk(bucket))
    advance_steps(bucket.steps, found_inf)
    stats_dtype, exp_avg_dtype = _tables.adafactor_storage(bucket)
    n, n_chunks = tables.n_tensors, tables.n_chunks
    layout = _tables.factored_tasks([p.shape for p in bucket.params], device) if bucket.kind else None

    def scratch(size):
        return torch.empty(max(size, 1), dtype=torch.float64, device=device)

    col_partial = scratch(layout.col_total if layout else 0)
    p_partial = scratch(layout.n_tasks if layout else n_chunks)
    u_partial, rmean, sums = scratch(n_chunks), scratch(layout.n_slices if layout else 0), scratch(3 * n)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    _launch("adafactor", device,
            tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.chunk_first,
            tables.chunk_size, CODES[bucket.dtype], CODES[stats_dtype], bucket.masters is not None,
            exp_avg_dtype == FP8_STATE_DTYPE, layout.packed if layout else None,
            *((layout.n_tasks, layout.n_slices, layout.n_col_programs, layout.col_total) if layout else (0, 0, 0, 0)),
            0.0 if lr_tensor is not None else lr, lr_tensor, beta2_decay,
            torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2, d, weight_decay, maximize, beta1,
            grad_mult, found_inf, bucket.sr_seed, col_partial, p_partial, u_partial, rmean, sums)


def sophia(bucket, *, lr, beta1, rho, bs, weight_decay, maximize, grad_mult, found_inf):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket, "hessian"), device, _chunk(bucket))
    advance_steps(bucket.steps, found_inf)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    _launch("sophia", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.chunk_size,
            CODES[bucket.dtype], STATE_CODES[bucket.state_dtype], bucket.masters is not None,
            0.0 if lr_tensor is not None else lr, lr_tensor, beta1, rho * bs, weight_decay, maximize, grad_mult,
            found_inf, bucket.sr_seed)


def sophia_hessian(bucket, *, beta2):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket, "hessian"), device, _chunk(bucket))
    _launch("sophia_hessian", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_size, CODES[bucket.dtype], STATE_CODES[bucket.state_dtype], bucket.masters is not None, beta2)


def fp8_update_(copies, amax, found_inf, recipe):
    """recipe.update_(copies, amax, found_inf) in one launch (the spec's torch
    ops are ~20 small launches, which cost more than a 10M step's own kernel on
    an H200: the step with FP8 copies took 1.27-1.42x the step)."""
    _launch("fp8_update_", amax.device, amax, copies.history_buffer, copies.scale_buffer, copies.scale_inv_buffer,
            found_inf, recipe.fp8_max, recipe.margin)


def cast_fp8(inputs, outputs, scales):
    device = inputs[0].device
    tables = _tables.launch_tables([inputs, outputs], device, CHUNK_SIZE)
    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=device)
    amax = torch.empty(len(inputs), dtype=torch.float64, device=device)
    _launch("cast_fp8", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_first, tables.chunk_size, CODES[inputs[0].dtype], FP8_FORMATS[outputs[0].dtype], scales,
            partials, amax)
    return amax
