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
from . import _adafactor_tables, _sharded, _tables
from ._bucket import advance_steps
from ._dtypes import CODES, FP8_FORMATS, FP8_STATE_DTYPE, STATE_CODES
from ._traced import bucket_op, tensor_op

NAME = "cuda"
#: every launch is a custom op while Dynamo traces (_traced.py)
TRACEABLE = True
#: the ops whose kernels take master_weights="remainder"'s int16 remainders (Bucket.remainders)
REMAINDER_OPS = frozenset({"adafactor", "adamw", "lamb", "sophia"})
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


def _master_code(bucket) -> int:
    """The kernels' master code: 0 none, 1 fp32 masters, 2 int16 remainders (master_weights="remainder")."""
    return 0 if bucket.masters is None else 2 if bucket.remainders else 1


@bucket_op(NAME)
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
            _master_code(bucket), 0.0 if lr_tensor is not None else lr,
            lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mult, found_inf, bucket.sr_seed,
            FP8_FORMATS[bucket.fp8.weights[0].dtype] if fp8 else -1, tables.chunk_first if fp8 else None, partials,
            amax)
    return amax


@tensor_op(NAME)
def power_sums(tensors, p):
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=device)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    _launch("power_sums", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_first, tables.chunk_size, CODES[tensors[0].dtype], float(p), partials, out)
    return out


@tensor_op(NAME)
def scale_(tensors, factor):
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    _launch("scale_", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_size, CODES[tensors[0].dtype], factor)


@bucket_op(NAME)
def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket), device, _chunk(bucket))
    advance_steps(bucket.steps, found_inf)
    head = (tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start)
    kind, state_kind, master = CODES[bucket.dtype], STATE_CODES[bucket.state_dtype], _master_code(bucket)
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


class _AdafactorArgs:
    """The arguments the adafactor ops share for one bucket: tables, task
    layout (factored), switches, hyperparameters and fp64 scratch."""

    def __init__(self, bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult,
                 found_inf):
        device = bucket.device
        self.tables = tables = _tables.launch_tables(_adafactor_tables.adafactor_rows(bucket), device, _chunk(bucket))
        stats_dtype, exp_avg_dtype = _adafactor_tables.adafactor_storage(bucket)
        self.n, n_chunks = tables.n_tensors, tables.n_chunks
        self.layout = layout = (_adafactor_tables.factored_tasks([p.shape for p in bucket.params], device)
                                if _factored(bucket.kind) else None)

        def scratch(size):
            return torch.empty(max(size, 1), dtype=torch.float64, device=device)

        self.rmean = scratch(layout.n_slices if layout else 0)
        self.sums = scratch(3 * self.n)  # sum(p^2), sum(u^2), the scale, per tensor
        self.fp8_exp_avg = exp_avg_dtype == FP8_STATE_DTYPE
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        self.head = (tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.chunk_first,
                     tables.chunk_size, CODES[bucket.dtype], CODES[stats_dtype], _master_code(bucket))
        self.middle = (layout.packed if layout else None,
                       *((layout.n_tasks, layout.n_slices, layout.n_col_programs, layout.col_total) if layout
                         else (0, 0, 0, 0)),
                       0.0 if lr_tensor is not None else lr, lr_tensor, beta2_decay,
                       torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2, d, weight_decay, maximize,
                       beta1, grad_mult, found_inf, bucket.sr_seed)
        self.scratch = (scratch(layout.col_total if layout else 0), scratch(layout.n_tasks if layout else n_chunks),
                        scratch(n_chunks), self.rmean, self.sums)


def _factored(kind) -> bool:
    return bool(getattr(kind, "factored", kind))  # (a sharded bucket's kind carries it)


@bucket_op(NAME)
def adafactor(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult, found_inf):
    """The launch sequence of csrc/cuda/adafactor.cu for one bucket kind
    (factored tensors with their task layout, or 0-d/1-d ones), on the
    current stream, with fp64 scratch allocated here."""
    a = _AdafactorArgs(bucket, lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, weight_decay=weight_decay,
                       maximize=maximize, beta1=beta1, grad_mult=grad_mult, found_inf=found_inf)
    advance_steps(bucket.steps, found_inf)
    _launch("adafactor", bucket.device, *a.head, a.fp8_exp_avg, *a.middle, *a.scratch)


def adafactor_sharded(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult,
                      found_inf):
    """FusedAdafactor on the local shards of DTensor params: _sharded.step
    with the phases of csrc/cuda/adafactor.cu's adafactor_sharded_cuda."""
    def make_phases(live):
        return _ShardedPhases(live, _AdafactorArgs(live, lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d,
                                                   weight_decay=weight_decay, maximize=maximize, beta1=beta1,
                                                   grad_mult=grad_mult, found_inf=found_inf))

    _sharded.step(bucket, make_phases, lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, found_inf=found_inf)


class _ShardedPhases:
    """_sharded.step's launches on the cuda backend: one op, a phase each
    (0 sums or vector stats, 1 factors, 2 unorm, 3 apply), its results in
    the fp64 scratch (sums: sum(p^2), sum(u^2), the scale per tensor)."""

    def __init__(self, live, args: _AdafactorArgs):
        self.device, self.a = live.device, args
        self.rv = torch.zeros(max(args.layout.n_slices if args.layout else 0, 1), dtype=torch.float64,
                              device=live.device)
        self.sharded = (self.rv, self.rv, self.rv, args.tables.numel, args.tables.numel, args.tables.numel,
                        args.tables.numel)  # (absent with 0-d / 1-d tensors: never read)

    def _phase(self, number):
        row_sums, row_base, col_sums, col_base, full_rows, full_cols, _ = self.sharded
        _launch("adafactor_sharded", self.device, number, *self.a.head, *self.a.middle, *self.a.scratch, row_sums,
                row_base, col_sums, col_base, full_rows, full_cols, self.rv)

    def sums(self, row_sums, col_sums, layout):
        self.sharded = (row_sums, layout.row_base, col_sums, layout.col_base, layout.full_rows, layout.full_cols,
                        self.rv)
        self._phase(0)
        return self.a.sums[:self.a.n]

    def factors(self, row_sums, col_sums, layout):
        self._phase(1)
        return self.rv

    def unorm(self, rmean):
        self.a.rmean.copy_(rmean)
        self._phase(2)
        return self.a.sums[self.a.n:2 * self.a.n]

    def vector_stats(self):
        self._phase(0)
        return self.a.sums[:self.a.n], self.a.sums[self.a.n:2 * self.a.n]

    def apply(self, scale, rmean):
        self.a.sums[2 * self.a.n:].copy_(scale)
        self._phase(3)


@bucket_op(NAME)
def sophia(bucket, *, lr, beta1, rho, bs, weight_decay, maximize, grad_mult, found_inf):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket, "hessian"), device, _chunk(bucket))
    advance_steps(bucket.steps, found_inf)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    _launch("sophia", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.chunk_size,
            CODES[bucket.dtype], STATE_CODES[bucket.state_dtype], _master_code(bucket),
            0.0 if lr_tensor is not None else lr, lr_tensor, beta1, rho * bs, weight_decay, maximize, grad_mult,
            found_inf, bucket.sr_seed)


@bucket_op(NAME)
def sophia_hessian(bucket, *, beta2):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket, "hessian"), device, _chunk(bucket))
    _launch("sophia_hessian", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_size, CODES[bucket.dtype], STATE_CODES[bucket.state_dtype], bucket.masters is not None, beta2)


def fp8_update_(copies, amax, found_inf, recipe):
    """recipe.update_(copies, amax, found_inf) in one launch (the spec's torch
    ops are ~20 small launches, which cost more than a 10M step's own kernel on
    an H200: the step with FP8 copies took 1.27-1.42x the step)."""
    fp8_scales_update_(amax, copies.history_buffer, copies.scale_buffer, copies.scale_inv_buffer, found_inf,
                       recipe.fp8_max, recipe.margin)


@tensor_op(NAME)
def fp8_scales_update_(amax, history, scales, scale_inv, found_inf, fp8_max, margin):
    _launch("fp8_update_", amax.device, amax, history, scales, scale_inv, found_inf, fp8_max, margin)


@tensor_op(NAME)
def cast_fp8(inputs, outputs, scales):
    device = inputs[0].device
    tables = _tables.launch_tables([inputs, outputs], device, CHUNK_SIZE)
    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=device)
    amax = torch.empty(len(inputs), dtype=torch.float64, device=device)
    _launch("cast_fp8", device, tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
            tables.chunk_first, tables.chunk_size, CODES[inputs[0].dtype], FP8_FORMATS[outputs[0].dtype], scales,
            partials, amax)
    return amax
