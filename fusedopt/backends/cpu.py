"""The cpu backend: the C++ extension (csrc/cpu, csrc/bindings_cpu.cpp),
JIT-built on first use. One OpenMP parallel region per bucket; per-element
math from csrc/include/fusedopt/*.h. Each op's contract is its schema in
bindings_cpu.cpp; the calls here name every argument, checked against it
(_named_ops.py): no argument can land in another's place."""
from __future__ import annotations

import sys

import torch

from .. import _jit
from ..reference import lamb as lamb_spec
from . import _held, _moment_ops, _tables, cpu_fakes
from ._named_ops import NamedOps

NAME = "cpu"
DEVICE_TYPES = ("cpu",)
#: the fusedopt_cpu ops are custom ops with fake impls (cpu_fakes): Dynamo traces them
TRACEABLE = True

#: elements per chunk: the unit of work handed to one OpenMP thread
CHUNK_SIZE = 1 << 16


_ops = NamedOps("fusedopt_cpu")


def unavailable_reason(device_type: str) -> str | None:
    return _jit.toolchain_problem("cpu")


def load() -> None:
    _jit.load_extension("cpu")
    cpu_fakes.register()
    _ops.resolve()


def _chunk(bucket) -> int:
    return _tables.launch_sizes(bucket, CHUNK_SIZE)[1]


def _moment_launch(op, bucket, *, lr, grad_mult, found_inf, **hyper):
    """Every op declared in _moment_ops (_moment_ops.bind makes ``cpu.<name>``):
    lr a float or 1-element fp32 tensor; grad_mult (fp64), found_inf (fp32):
    1-element tensors or None; all on the CPU. The extension advances the steps.
    Returns each new weight's absmax (fp64) when the bucket has FP8 copies.
    The bucket's lists are held in the extension after its first launch
    (_held.py): later launches pass the scalars only."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    scalars = dict(lr=0.0 if lr_tensor is not None else lr, **hyper, sr_seed=bucket.sr_seed, chunk_size=_chunk(bucket))
    tensors = dict(lr_tensor=lr_tensor, grad_mult=grad_mult, found_inf=found_inf)
    amax = None
    if op.fp8_copies:
        amax = tensors["fp8_amax"] = torch.zeros(len(bucket.params), dtype=torch.float64) if bucket.fp8 else None
    held = bucket.launch_cache.get("held") if _held.usable() else 0
    if held is None:
        held = bucket.launch_cache["held"] = (_held.Table(_moment_lists(op, bucket), bucket.params)
                                              if _held.holdable(bucket.params, bucket.grads) else 0)
    if held:
        _held.call(held, op.name, scalars, tensors)
    else:
        getattr(_ops, op.name)(**_moment_lists(op, bucket), grads=bucket.grads, **scalars, **tensors)
    return amax


def _moment_lists(op, bucket) -> dict:
    """A moment op's tensor lists but the grads, by the schema's names (exp_avgs, exp_avg_scales, ...)."""
    states = bucket.states
    lists = dict(params=bucket.params, masters=bucket.masters or [], steps=bucket.steps)
    for name in op.states:
        lists[f"{name}s"], lists[f"{name}_scales"] = states.get(name, []), states.get(f"{name}_scale", [])
    if op.fp8_copies:
        fp8 = bucket.fp8
        lists.update(fp8_weights=fp8.weights if fp8 else [], fp8_scales=fp8.scales if fp8 else [])
    return lists


def __getattr__(name: str):  # cpu.adamw, cpu.sophia, ...: an op declared in _moment_ops
    return _moment_ops.bind(sys.modules[__name__], name, _moment_launch)


def fp8_update_(copies, amax, found_inf, recipe):
    """recipe.update_(copies, amax, found_inf) in one call (the ~15 small torch
    ops of the spec cost more than the cast itself right after a step)."""
    _ops.fp8_update_(amax=amax, history=copies.history_buffer, scales=copies.scale_buffer,
                                       scale_inv=copies.scale_inv_buffer, found_inf=found_inf,
                                       fp8_max=recipe.fp8_max, margin=recipe.margin)


def power_sums(tensors, p):
    return _ops.power_sums(tensors=tensors, p=float(p), chunk_size=CHUNK_SIZE)


def clip_scalars(power, grad_scale, max_norm, dtype):
    """max_grad_norm's (norm in `dtype`, grad multiplier in fp64), 0-d, from
    the grads' sum of squares: norms.l2_from_power, norms.clip_coefficient and
    plans.grad_multiplier bit for bit, in two calls instead of ~8 tiny ops
    (the root is torch's: its fp64 sqrt is not always correctly rounded)."""
    return _ops.clip_scalars(root=power.sqrt(), grad_scale=grad_scale, max_norm=float(max_norm),
                             fp64=dtype == torch.float64)


def scale_(tensors, factor):
    _ops.scale_(tensors=tensors, factor=factor, chunk_size=CHUNK_SIZE)


def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    """Moments pass (advances the steps, reduces sum p^2 and u^2 per tensor),
    the trust ratios (reference/lamb.py), then the apply pass."""
    states = bucket.states
    both = dict(params=bucket.params, grads=bucket.grads, exp_avgs=states["exp_avg"], exp_avg_sqs=states["exp_avg_sq"],
                exp_avg_scales=states.get("exp_avg_scale", []), exp_avg_sq_scales=states.get("exp_avg_sq_scale", []),
                masters=bucket.masters or [], steps=bucket.steps, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, bias_correction=bias_correction, adam_w_mode=adam_w_mode,
                grad_averaging=grad_averaging, maximize=maximize, found_inf=found_inf, chunk_size=_chunk(bucket))
    p_sums, u_sums = _ops.lamb_moments(**both, grad_mult=grad_mult)
    p_sums, u_sums = bucket.whole_tensor_sums(p_sums, u_sums)  # DTensors: over their shards
    ratio = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    _ops.lamb_apply(**both, ratio=ratio, sr_seed=bucket.sr_seed)


def adafactor(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult, found_inf):
    """One launch per bucket kind (factored tensors, or 0-d/1-d ones); all
    passes run inside the extension, which also advances the steps."""
    factored = bucket.kind
    states = bucket.states
    shapes = [p.shape for p in bucket.params]
    rows = torch.tensor([s[-2] for s in shapes] if factored else [], dtype=torch.int64)
    cols = torch.tensor([s[-1] for s in shapes] if factored else [], dtype=torch.int64)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    _ops.adafactor(
        params=bucket.params, grads=bucket.grads, exp_avgs=states.get("exp_avg", []),
        variances=states.get("variance", []), row_vars=states.get("row_var", []), col_vars=states.get("col_var", []),
        exp_avg_scales=states.get("exp_avg_scale", []), masters=bucket.masters or [], steps=bucket.steps, rows=rows,
        cols=cols, lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor, beta2_decay=beta2_decay,
        eps1=torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2=eps2, d=d, weight_decay=weight_decay,
        maximize=maximize, beta1=beta1, grad_mult=grad_mult, found_inf=found_inf, sr_seed=bucket.sr_seed,
        chunk_size=_chunk(bucket),
    )


def adafactor_sharded(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult,
                      found_inf):
    """FusedAdafactor on the local shards of DTensor params (a bucket with
    ``stats``, every member launched, empty shards too): the phases of
    csrc/cpu/adafactor_sharded.cpp, each one launch over the bucket, with the
    statistics summed over the shards between them (fusedopt.dtensor:
    TensorSums). Every rank makes the same collectives, whatever found_inf."""
    stats, states = bucket.stats, bucket.states
    layout = bucket.launch_cache.get("adafactor_sharded")
    if layout is None:
        layout = bucket.launch_cache["adafactor_sharded"] = _sharded_layout(stats, bucket.kind.factored)
    dims, numel, row_counts, col_counts, slice_counts = layout
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None

    def phase(number, inputs=()):  # three float64 vectors, empty where a phase has nothing to give
        return _ops.adafactor_sharded(
            phase=number, params=bucket.params, grads=bucket.grads, exp_avgs=states.get("exp_avg", []),
            variances=states.get("variance", []), row_vars=states.get("row_var", []),
            col_vars=states.get("col_var", []), masters=bucket.masters or [], steps=bucket.steps, dims=dims,
            numel=numel, inputs=list(inputs), lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor,
            beta2_decay=beta2_decay, eps1=torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2=eps2, d=d,
            weight_decay=weight_decay, maximize=maximize, beta1=beta1, grad_mult=grad_mult, found_inf=found_inf,
            sr_seed=bucket.sr_seed, chunk_size=_chunk(bucket))

    if bucket.kind.factored:
        row_sums, col_sums, p_sq = phase(0)
        stats.reduce_parts_(list(row_sums.split(row_counts)), dims=(-1,))
        stats.reduce_parts_(list(col_sums.split(col_counts)), dims=(-2,))
        rv_sums = phase(1, (row_sums, col_sums))[0]
        stats.reduce_parts_(list(rv_sums.split(slice_counts)), dims=(-2,))
        u_sq = phase(2, (rv_sums,))[0]
        p_sq, u_sq = bucket.whole_tensor_sums(p_sq, u_sq)
        phase(3, (rv_sums, p_sq, u_sq))
    else:
        p_sq, u_sq = bucket.whole_tensor_sums(*phase(0)[:2])
        phase(3, (p_sq, u_sq))


def _sharded_layout(stats, factored: bool):
    """adafactor_sharded's dims [n, 5] (B, local R and C, whole R and C) and
    whole numel [n], and each member's count of rows, columns and slices."""
    dims, rows, cols, slices = [], [], [], []
    for shape, local in zip(stats.shapes, stats.local_shapes):
        if not factored:
            continue
        batch = local[:-2].numel()
        dims.append([batch, local[-2], local[-1], shape[-2], shape[-1]])
        rows.append(batch * local[-2])
        cols.append(batch * local[-1])
        slices.append(batch)
    numel = torch.tensor([shape.numel() for shape in stats.shapes], dtype=torch.int64)
    return torch.tensor(dims, dtype=torch.int64).reshape(-1), numel, rows, cols, slices


def sophia_hessian(bucket, *, beta2):
    _ops.sophia_hessian(params=bucket.params, grads=bucket.grads, hessians=bucket.states["hessian"],
                                          hessian_scales=bucket.states.get("hessian_scale", []),
                                          has_master=bucket.masters is not None, beta2=beta2,
                                          chunk_size=_chunk(bucket))


def cast_fp8(inputs, outputs, scales):
    """inputs, outputs: aligned lists (same shapes and strides); scales: fp32
    [n] on the CPU. Returns the inputs' absmax (fp64 [n])."""
    return _ops.cast_fp8(inputs=inputs, outputs=outputs, scales=scales, chunk_size=CHUNK_SIZE)
