"""The cuda backend: multi-tensor CUDA kernels (csrc/cuda, csrc/bindings_cuda.cpp),
JIT-compiled with nvcc on first use for the GPUs present.

One launch per bucket over the same device-side tables as the triton backend
(fusedopt/backends/_tables.py); the kernel reads lr, grad_mult, found_inf and
each tensor's step from device memory, so a step never waits on the host.
"""
from __future__ import annotations

import sys

import torch

from .. import _jit
from ..reference import lamb as lamb_spec
from ..reference import sophia as sophia_spec
from . import _adafactor_tables, _moment_ops, _sharded, _tables
from ._bucket import advance_steps
from ._dtypes import CODES, FP8_FORMATS, FP8_STATE_DTYPE, STATE_CODES
from ._named_ops import NamedOps
from ._traced import bucket_op, tensor_op

NAME = "cuda"
#: every launch is a custom op while Dynamo traces (_traced.py)
TRACEABLE = True
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


_ops = NamedOps("fusedopt_cuda")


def _launch(op: str, device: torch.device, **args) -> None:
    """The extension's op `op` with `args` (by name, as its schema in
    bindings_cuda.cpp names them) and the handle of `device`'s current stream,
    on `device`: every launch of this backend goes through here
    (tests/conftest.py points it at the kernels run on the CPU by tests/cuda_emu)."""
    with torch.cuda.device(device):
        getattr(_ops, op)(**args, stream=torch.cuda.current_stream(device).cuda_stream)


def _storage(bucket, state_dtype=None) -> dict:
    """The bucket's storage codes by the ops' argument names; master: 0 none,
    1 fp32 masters, 2 int16 remainders (master_weights="remainder")."""
    return dict(param_dtype=CODES[bucket.dtype],
                state_dtype=STATE_CODES[bucket.state_dtype] if state_dtype is None else CODES[state_dtype],
                master=0 if bucket.masters is None else 2 if bucket.remainders else 1)


def _moment_launch(op, bucket, *, lr, found_inf, **hyper):
    """Every op declared in _moment_ops: lr a float or 1-element fp32 tensor;
    grad_mult (fp64), found_inf (fp32): 1-element tensors or None; all on the
    bucket's device (the optimizer's base class sees to that). Returns each
    new weight's absmax (fp64) when the bucket has FP8 copies."""
    tables = _tables.launch_tables(_tables.moment_rows(bucket, op.states), bucket.device, _chunk(bucket))
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    advance_steps(bucket.steps, found_inf)
    fp8 = bucket.fp8 if op.fp8_copies else None
    copies, amax = {}, None
    if op.fp8_copies:  # zeros: a step GradScaler skips leaves them, and the optimizer discards them
        amax = torch.zeros(len(bucket.params), dtype=torch.float64, device=bucket.device) if fp8 else None
        copies = dict(fp8_format=FP8_FORMATS[fp8.weights[0].dtype] if fp8 else -1,
                      chunk_first=tables.chunk_first if fp8 else None, fp8_amax=amax,
                      fp8_partials=torch.zeros(tables.n_chunks, dtype=torch.float64, device=bucket.device)
                      if fp8 else None)
    _launch(op.name, bucket.device, **tables.walk(), **_storage(bucket), lr=0.0 if lr_tensor is not None else lr,
            lr_tensor=lr_tensor, **hyper, found_inf=found_inf, sr_seed=bucket.sr_seed, **copies)
    return amax


def __getattr__(name: str):  # cuda.adamw, cuda.sophia, ...: an op declared in _moment_ops
    return _moment_ops.bind(sys.modules[__name__], name, _moment_launch, bucket_op(NAME))


@tensor_op(NAME)
def power_sums(tensors, p):
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=device)
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    _launch("power_sums", device, **tables.walk(first=True), dtype=CODES[tensors[0].dtype], p=float(p),
            partials=partials, out=out)
    return out


@tensor_op(NAME)
def scale_(tensors, factor):
    device = tensors[0].device
    tables = _tables.launch_tables([tensors], device, CHUNK_SIZE)
    _launch("scale_", device, **tables.walk(), dtype=CODES[tensors[0].dtype], factor=factor)


@bucket_op(NAME)
def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket), device, _chunk(bucket))
    advance_steps(bucket.steps, found_inf)
    both = dict(**tables.walk(), **_storage(bucket), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                bias_correction=bias_correction, adam_w_mode=adam_w_mode, found_inf=found_inf)
    partials = torch.empty(2 * tables.n_chunks, dtype=torch.float64, device=device)
    p_sums = torch.empty(tables.n_tensors, dtype=torch.float64, device=device)
    u_sums = torch.empty_like(p_sums)
    _launch("lamb_moments", device, **both, chunk_first=tables.chunk_first, grad_averaging=grad_averaging,
            maximize=maximize, grad_mult=grad_mult, partials=partials, p_sums=p_sums, u_sums=u_sums)
    p_sums, u_sums = bucket.whole_tensor_sums(p_sums, u_sums)  # DTensors: over their shards
    ratio = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    _launch("lamb_apply", device, **both, ratio=ratio, sr_seed=bucket.sr_seed)


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
        counts = ((layout.n_tasks, layout.n_slices, layout.n_col_programs, layout.col_total) if layout
                  else (0, 0, 0, 0))
        #: every argument the two ops share, by name
        self.shared = dict(
            **tables.walk(first=True), **_storage(bucket, stats_dtype), layout=layout.packed if layout else None,
            **dict(zip(("n_tasks", "n_slices", "n_col_programs", "col_total"), counts)),
            lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor, beta2_decay=beta2_decay,
            eps1=torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2=eps2, d=d, weight_decay=weight_decay,
            maximize=maximize, beta1=beta1, grad_mult=grad_mult, found_inf=found_inf, sr_seed=bucket.sr_seed,
            col_partial=scratch(layout.col_total if layout else 0),
            p_partial=scratch(layout.n_tasks if layout else n_chunks), u_partial=scratch(n_chunks), rmean=self.rmean,
            sums=self.sums)


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
    _launch("adafactor", bucket.device, **a.shared, fp8_exp_avg=a.fp8_exp_avg)


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
        numel = args.tables.numel  # (absent with 0-d / 1-d tensors: never read)
        self.sharded = dict(row_sums=self.rv, row_base=numel, col_sums=self.rv, col_base=numel, full_rows=numel,
                            full_cols=numel)

    def _phase(self, number):
        _launch("adafactor_sharded", self.device, phase=number, **self.a.shared, **self.sharded, rv_sums=self.rv)

    def sums(self, row_sums, col_sums, layout):
        self.sharded = dict(row_sums=row_sums, row_base=layout.row_base, col_sums=col_sums, col_base=layout.col_base,
                            full_rows=layout.full_rows, full_cols=layout.full_cols)
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
def sophia_hessian(bucket, *, beta2):
    device = bucket.device
    tables = _tables.launch_tables(_tables.moment_rows(bucket, sophia_spec.OP.states), device, _chunk(bucket))
    _launch("sophia_hessian", device, **tables.walk(), param_dtype=CODES[bucket.dtype],
            state_dtype=STATE_CODES[bucket.state_dtype], has_master=bucket.masters is not None, beta2=beta2)


def fp8_update_(copies, amax, found_inf, recipe):
    """recipe.update_(copies, amax, found_inf) in one launch (the spec's torch
    ops are ~20 small launches, which cost more than a 10M step's own kernel on
    an H200: the step with FP8 copies took 1.27-1.42x the step)."""
    fp8_scales_update_(amax, copies.history_buffer, copies.scale_buffer, copies.scale_inv_buffer, found_inf,
                       recipe.fp8_max, recipe.margin)


@tensor_op(NAME)
def fp8_scales_update_(amax, history, scales, scale_inv, found_inf, fp8_max, margin):
    _launch("fp8_update_", amax.device, amax=amax, history=history, scales=scales, scale_inv=scale_inv,
            found_inf=found_inf, fp8_max=fp8_max, margin=margin)


@tensor_op(NAME)
def cast_fp8(inputs, outputs, scales):
    device = inputs[0].device
    tables = _tables.launch_tables([inputs, outputs], device, CHUNK_SIZE)
    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=device)
    amax = torch.empty(len(inputs), dtype=torch.float64, device=device)
    _launch("cast_fp8", device, **tables.walk(first=True), dtype=CODES[inputs[0].dtype],
            format=FP8_FORMATS[outputs[0].dtype], scales=scales, partials=partials, amax=amax)
    return amax
