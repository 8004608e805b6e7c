"""The cpu backend: the C++ extension (csrc/cpu, csrc/bindings_cpu.cpp),
JIT-built on first use. One OpenMP parallel region per bucket; per-element
math from csrc/include/fusedopt/*.h."""
from __future__ import annotations

import torch

from .. import _jit
from ..reference import lamb as lamb_spec
from . import _tables, cpu_fakes

NAME = "cpu"
DEVICE_TYPES = ("cpu",)

#: elements per chunk: the unit of work handed to one OpenMP thread
CHUNK_SIZE = 1 << 16


def unavailable_reason(device_type: str) -> str | None:
    return _jit.toolchain_problem("cpu")


def load() -> None:
    _jit.load_extension("cpu")
    cpu_fakes.register()


def _chunk(bucket) -> int:
    return _tables.launch_sizes(bucket, CHUNK_SIZE)[1]


def adamw(bucket, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mult, found_inf):
    """lr: float or 1-element fp32 tensor; grad_mult (fp64), found_inf (fp32):
    1-element tensors or None; all on the CPU. The extension advances the steps.
    Returns each new weight's absmax (fp64) when the bucket has FP8 copies."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    fp8 = bucket.fp8 is not None
    amax = torch.zeros(len(bucket.params), dtype=torch.float64) if fp8 else None
    chunk = _chunk(bucket)
    torch.ops.fusedopt_cpu.adamw(
        bucket.params, bucket.grads, bucket.states["exp_avg"], bucket.states["exp_avg_sq"],
        bucket.states["max_exp_avg_sq"] if amsgrad else [], bucket.states.get("exp_avg_scale", []),
        bucket.states.get("exp_avg_sq_scale", []), bucket.states.get("max_exp_avg_sq_scale", []) if amsgrad else [],
        bucket.masters or [], bucket.steps,
        bucket.fp8.weights if fp8 else [], bucket.fp8.scales if fp8 else [], amax,
        0.0 if lr_tensor is not None else lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
        grad_mult, found_inf, bucket.sr_seed, chunk,
    )
    return amax


def fp8_update_(copies, amax, found_inf, recipe):
    """recipe.update_(copies, amax, found_inf) in one call (the ~15 small torch
    ops of the spec cost more than the cast itself right after a step)."""
    torch.ops.fusedopt_cpu.fp8_update_(amax, copies.history_buffer, copies.scale_buffer, copies.scale_inv_buffer,
                                       found_inf, recipe.fp8_max, recipe.margin)


def power_sums(tensors, p):
    return torch.ops.fusedopt_cpu.power_sums(tensors, float(p), CHUNK_SIZE)


def scale_(tensors, factor):
    torch.ops.fusedopt_cpu.scale_(tensors, factor, CHUNK_SIZE)


def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    """Moments pass (advances the steps, reduces sum p^2 and u^2 per tensor),
    the trust ratios (reference/lamb.py), then the apply pass."""
    states = bucket.states
    lists = (bucket.params, bucket.grads, states["exp_avg"], states["exp_avg_sq"], states.get("exp_avg_scale", []),
             states.get("exp_avg_sq_scale", []), bucket.masters or [], bucket.steps)
    hyper = (beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, maximize)
    p_sums, u_sums = torch.ops.fusedopt_cpu.lamb_moments(*lists, *hyper, grad_mult, found_inf, _chunk(bucket))
    p_sums, u_sums = bucket.whole_tensor_sums(p_sums, u_sums)  # DTensors: over their shards
    ratio = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    torch.ops.fusedopt_cpu.lamb_apply(*lists, ratio, *hyper, found_inf, bucket.sr_seed, _chunk(bucket))


def adafactor(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult, found_inf):
    """One launch per bucket kind (factored tensors, or 0-d/1-d ones); all
    passes run inside the extension, which also advances the steps."""
    factored = bucket.kind
    states = bucket.states
    shapes = [p.shape for p in bucket.params]
    rows = torch.tensor([s[-2] for s in shapes] if factored else [], dtype=torch.int64)
    cols = torch.tensor([s[-1] for s in shapes] if factored else [], dtype=torch.int64)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    torch.ops.fusedopt_cpu.adafactor(
        bucket.params, bucket.grads, states.get("exp_avg", []), states.get("variance", []), states.get("row_var", []),
        states.get("col_var", []), states.get("exp_avg_scale", []), bucket.masters or [], bucket.steps, rows, cols,
        0.0 if lr_tensor is not None else lr, lr_tensor, beta2_decay,
        torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2, d, weight_decay, maximize, beta1, grad_mult,
        found_inf, bucket.sr_seed, _chunk(bucket),
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
        return torch.ops.fusedopt_cpu.adafactor_sharded(
            number, bucket.params, bucket.grads, states.get("exp_avg", []), states.get("variance", []),
            states.get("row_var", []), states.get("col_var", []), bucket.masters or [], bucket.steps, dims, numel,
            list(inputs), 0.0 if lr_tensor is not None else lr, lr_tensor, beta2_decay,
            torch.finfo(bucket.dtype).eps if eps1 is None else eps1, eps2, d, weight_decay, maximize, beta1,
            grad_mult, found_inf, bucket.sr_seed, _chunk(bucket))

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


def sophia(bucket, *, lr, beta1, rho, bs, weight_decay, maximize, grad_mult, found_inf):
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    states = bucket.states
    torch.ops.fusedopt_cpu.sophia(
        bucket.params, bucket.grads, states["exp_avg"], states["hessian"], states.get("exp_avg_scale", []),
        states.get("hessian_scale", []), bucket.masters or [], bucket.steps, 0.0 if lr_tensor is not None else lr,
        lr_tensor, beta1, rho * bs, weight_decay, maximize, grad_mult, found_inf, bucket.sr_seed, _chunk(bucket))


def sophia_hessian(bucket, *, beta2):
    torch.ops.fusedopt_cpu.sophia_hessian(bucket.params, bucket.grads, bucket.states["hessian"],
                                          bucket.states.get("hessian_scale", []), bucket.masters is not None, beta2,
                                          _chunk(bucket))


def cast_fp8(inputs, outputs, scales):
    """inputs, outputs: aligned lists (same shapes and strides); scales: fp32
    [n] on the CPU. Returns the inputs' absmax (fp64 [n])."""
    return torch.ops.fusedopt_cpu.cast_fp8(inputs, outputs, scales, CHUNK_SIZE)
