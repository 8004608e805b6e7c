"""The reference backend: the plain-torch spec (fusedopt.reference), applied
one tensor at a time with fp32 (fp64 for fp64 params) working copies.

Readable first, fast never: it reads found_inf and a tensor lr with .item()
(a host sync on GPUs), which the other backends never do.
"""
from __future__ import annotations

import sys

import torch

from ..reference import adafactor as adafactor_spec
from ..reference import fp8_states
from ..reference import lamb as lamb_spec
from ..reference import remainder
from ..reference import sophia as sophia_spec
from ..reference import stochastic
from . import _moment_ops
from ._bucket import advance_steps
from ._dtypes import FP8_STATE_DTYPE, math_dtype

NAME = "reference"
DEVICE_TYPES = ("cpu", "cuda")

_SKIP = object()


def _begin(bucket, grad_mult, found_inf):
    """What every update starts with: advance the steps (not when GradScaler
    found inf/NaN, then _SKIP: nothing else moves) and read grad_mult."""
    advance_steps(bucket.steps, found_inf)
    if found_inf is not None and found_inf.item() != 0:
        return _SKIP
    return None if grad_mult is None else float(grad_mult.item())


def _load_weight(bucket, i, dtype):
    """A working copy (math precision) of tensor i's weight: its fp32 master,
    the master joined from the bf16 param and its remainder, or the param."""
    param = bucket.params[i]
    if bucket.masters is None:
        return param.to(dtype, copy=True)
    if bucket.remainders:
        return remainder.join(param, bucket.masters[i]).to(dtype)
    return bucket.masters[i].to(dtype, copy=True)


def _store_weight(bucket, i, work):
    """The new weight from its working copy: the master and the param rounded
    once from it to nearest, or the pair of a bf16 param and its remainder,
    or the param rounded stochastically (bucket.sr_seed) with the bits every
    backend draws."""
    param = bucket.params[i]
    if bucket.masters is not None and bucket.remainders:
        bits, low = remainder.split(work.float())
        param.copy_(bits)
        bucket.masters[i].copy_(low)
        return
    if bucket.masters is not None:
        bucket.masters[i].copy_(work)
    if bucket.sr_seed is None:
        param.copy_(work)
    else:
        stochastic.store_stochastic_(param, work, bucket.sr_seed, i)


def _load_state(bucket, name, i, dtype):
    """A working copy (math precision) of state `name` of tensor i: decoded
    when the bucket stores block-scaled FP8 states."""
    stored = bucket.states[name][i]
    if stored.dtype == FP8_STATE_DTYPE:
        return fp8_states.decode(name, stored, bucket.states[fp8_states.scale_name(name)][i]).to(dtype)
    return stored.to(dtype, copy=True)


def _store_state(bucket, name, i, value):
    """Store the new value of state `name` of tensor i, rounded once to its
    storage (block-scaled FP8: quantized with fresh scales)."""
    stored = bucket.states[name][i]
    if stored.dtype == FP8_STATE_DTYPE:
        fp8_states.store_(name, stored, bucket.states[fp8_states.scale_name(name)][i], value)
    else:
        stored.copy_(value)


def unavailable_reason(device_type: str) -> str | None:
    return None


def load() -> None:
    return None


def _moment_launch(op, bucket, *, lr, grad_mult, found_inf, **hyper):
    """Every op declared in _moment_ops: its reference update, one tensor at a
    time on working copies, each stored value rounded once from them. Returns
    each new weight's absmax (fp64) when the bucket has FP8 copies."""
    mult = _begin(bucket, grad_mult, found_inf)
    fp8 = bucket.fp8 if op.fp8_copies else None
    amax = torch.zeros(len(bucket.params), dtype=torch.float64, device=bucket.device) if fp8 else None
    if mult is _SKIP:
        return amax
    lr = float(lr)
    dtype = math_dtype(bucket.dtype)
    present = [name for name in op.states if name in bucket.states]
    for i in range(len(bucket.params)):
        work = _load_weight(bucket, i, dtype)
        states = {name: _load_state(bucket, name, i, dtype) for name in present}
        op.reference(work, bucket.grads[i].to(dtype), [states.get(name) for name in op.states],
                     step=float(bucket.steps[i].item()), lr=lr, grad_mult=mult, **hyper)
        _store_weight(bucket, i, work)
        for name in present:
            if name not in op.read_only:
                _store_state(bucket, name, i, states[name])
        if fp8 is not None:
            copy = fp8.weights[i]
            fmax = torch.finfo(copy.dtype).max
            copy.copy_((work.float() * fp8.scales[i]).clamp(-fmax, fmax).to(copy.dtype))
            amax[i] = work.float().abs().amax()
    return amax


def __getattr__(name: str):  # reference.adamw, reference.sophia, ...: an op declared in _moment_ops
    return _moment_ops.bind(sys.modules[__name__], name, _moment_launch)


def power_sums(tensors, p):
    """Per-tensor sum of |x|^p (max |x| for p = inf): each term in the math
    precision (fp32, fp64 for fp64), so it overflows and underflows as
    torch's does, and summed in fp64, as every backend does."""
    out = []
    for t in tensors:
        x = t.detach().to(math_dtype(t.dtype)).abs()
        terms = x if p in (1.0, float("inf")) else x.square() if p == 2.0 else x.pow(p)
        terms = terms.double()
        out.append(terms.max() if p == float("inf") else terms.sum())
    return torch.stack(out)


def scale_(tensors, factor):
    """x *= factor, in fp32 (fp64 for fp64) and rounded once to x's dtype."""
    for t in tensors:
        t.mul_(factor.to(math_dtype(t.dtype)).reshape(()))


def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb,
         maximize, grad_mult, found_inf):
    """The two passes of reference/lamb.py, one tensor at a time. The update
    direction is formed from the moments as stored (rounded to their dtype),
    which is what the kernels' second pass reads back."""
    mult = _begin(bucket, grad_mult, found_inf)
    if mult is _SKIP:  # the collectives of DTensor statistics are made whatever the data says
        zeros = torch.zeros(len(bucket.params), dtype=torch.float64, device=bucket.device)
        bucket.whole_tensor_sums(zeros, zeros)
        return
    dtype = math_dtype(bucket.dtype)
    works, directions = [], []
    for i in range(len(bucket.params)):
        work = _load_weight(bucket, i, dtype)
        m, v = _load_state(bucket, "exp_avg", i, dtype), _load_state(bucket, "exp_avg_sq", i, dtype)
        lamb_spec.moments_(work, bucket.grads[i].to(dtype), m, v, beta1=beta1, beta2=beta2,
                           weight_decay=weight_decay, adam_w_mode=adam_w_mode, grad_averaging=grad_averaging,
                           maximize=maximize, grad_mult=mult)
        _store_state(bucket, "exp_avg", i, m)
        _store_state(bucket, "exp_avg_sq", i, v)
        works.append(work)
        directions.append(lamb_spec.direction(
            work, _load_state(bucket, "exp_avg", i, dtype), _load_state(bucket, "exp_avg_sq", i, dtype),
            step=float(bucket.steps[i].item()), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, adam_w_mode=adam_w_mode))
    p_sums = torch.stack([w.double().square().sum() for w in works])
    u_sums = torch.stack([u.double().square().sum() for u in directions])
    p_sums, u_sums = bucket.whole_tensor_sums(p_sums, u_sums)  # DTensors: over their shards
    ratios = lamb_spec.trust_ratio(p_sums, u_sums, lr, weight_decay, use_nvlamb)
    for i, (work, u) in enumerate(zip(works, directions)):
        work.sub_(u * ratios[i].to(dtype))
        _store_weight(bucket, i, work)


def adafactor(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult, found_inf):
    """reference/adafactor.py one tensor at a time, on working copies in the
    math precision (with .item() for the per-tensor scalars, as torch)."""
    mult = _begin(bucket, grad_mult, found_inf)
    if mult is _SKIP:
        return
    lr = float(lr)
    dtype = math_dtype(bucket.dtype)
    eps1 = torch.finfo(bucket.dtype).eps if eps1 is None else eps1
    scales = {fp8_states.scale_name(name) for name in bucket.states}
    names = [name for name in bucket.states if name not in scales]
    for i in range(len(bucket.params)):
        work = _load_weight(bucket, i, dtype)
        copies = {name: _load_state(bucket, name, i, dtype) for name in names}

        def stored(name, value, i=i):
            """Store a state where the spec updates it, and go on with what was stored."""
            _store_state(bucket, name, i, value)
            return value.copy_(_load_state(bucket, name, i, dtype))

        adafactor_spec.adafactor_update_(
            work, bucket.grads[i].to(dtype), copies.get("row_var"), copies.get("col_var"), copies.get("variance"),
            copies.get("exp_avg"), step=float(bucket.steps[i].item()), lr=lr, beta2_decay=beta2_decay, eps1=eps1,
            eps2=eps2, d=d, weight_decay=weight_decay, maximize=maximize, beta1=beta1, grad_mult=mult,
            stored=stored)
        _store_weight(bucket, i, work)


def adafactor_sharded(bucket, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize, beta1, grad_mult,
                      found_inf):
    """reference/adafactor.py on the local shards of DTensor params (a
    bucket with ``stats``, fusedopt.dtensor.TensorSums), in phases with the
    statistics of the whole tensors summed over the shards between them (the
    kernel backends' adafactor_sharded run the same phases):

      1. per local row and column, the sums of g*g  -> row sums over the mesh dims sharding the last dim,
                                                       column sums over those sharding dim -2
      2. row_var and col_var (0-d/1-d: variance) updated; the sum of row_var
         over the local rows of each slice             -> over the mesh dims sharding dim -2 (the row mean)
      3. u and sum(u*u); sum(p*p) (before the decay)   -> both over every sharded mesh dim
      4. the update, with the per-tensor scale of adafactor_spec.scales

    Members whose local shard is empty take part with zeros. Every rank makes
    the same collectives whatever the data (with GradScaler's found_inf set,
    on zeros, and nothing is updated)."""
    stats = bucket.stats
    mult = _begin(bucket, grad_mult, found_inf)
    skip = mult is _SKIP
    dtype = math_dtype(bucket.dtype)
    eps1 = torch.finfo(bucket.dtype).eps if eps1 is None else eps1
    lr = float(lr)
    factored = bool(bucket.kind.factored)
    launched = {j: i for i, j in enumerate(stats.slots)}  # member -> launch index
    works, grads, copies = {}, {}, {}
    names = [name for name in bucket.states if not name.endswith("_scale")]
    for j, i in launched.items():
        works[j] = _load_weight(bucket, i, dtype)
        g = bucket.grads[i].to(dtype, copy=True)
        if not skip and mult is not None:
            g.mul_(mult)
        grads[j] = g.neg_() if maximize else g
        copies[j] = {name: _load_state(bucket, name, i, dtype) for name in names}

    def zeros(shape):
        return torch.zeros(shape, dtype=torch.float64, device=bucket.device)

    def stored(j, name, value):
        """Store a state as its storage holds it, and go on with what was stored."""
        if skip:
            return value
        _store_state(bucket, name, launched[j], value)
        return value.copy_(_load_state(bucket, name, launched[j], dtype))

    members = range(stats.n)
    u = {}
    if factored:
        rows = [grads[j].double().square().sum(-1) if j in grads and not skip else zeros(stats.local_shapes[j][:-1])
                for j in members]
        cols = [grads[j].double().square().sum(-2) if j in grads and not skip
                else zeros((*stats.local_shapes[j][:-2], stats.local_shapes[j][-1])) for j in members]
        stats.reduce_parts_(rows, dims=(-1,))
        stats.reduce_parts_(cols, dims=(-2,))
        row_sums = []
        for j in members:
            if j in grads and not skip:
                shape = stats.shapes[j]
                w = float(bucket.steps[launched[j]].item()) ** beta2_decay
                state = copies[j]
                stored(j, "row_var", state["row_var"].lerp_((rows[j] / shape[-1]).to(dtype).unsqueeze(-1), w))
                stored(j, "col_var", state["col_var"].lerp_((cols[j] / shape[-2]).to(dtype).unsqueeze(-2), w))
                row_sums.append(state["row_var"].double().sum(-2))
            else:
                row_sums.append(zeros((*stats.local_shapes[j][:-2], 1)))
        stats.reduce_parts_(row_sums, dims=(-2,))
        for j in grads:
            state = copies[j]
            rmean = (row_sums[j] / stats.shapes[j][-2]).to(dtype).unsqueeze(-2).clamp_(min=eps1)
            var_estimate = (state["row_var"] @ state["col_var"]).div_(rmean)
            u[j] = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grads[j])
    else:
        for j in grads:
            w = float(bucket.steps[launched[j]].item()) ** beta2_decay
            variance = stored(j, "variance", copies[j]["variance"].lerp_(grads[j] * grads[j], w))
            u[j] = variance.clamp(min=eps1 * eps1).rsqrt_().mul_(grads[j])
    sums = torch.zeros((2, stats.n), dtype=torch.float64, device=bucket.device)
    if not skip:
        for j in grads:
            sums[0, j] = works[j].double().square().sum()
            sums[1, j] = u[j].double().square().sum()
    stats.reduce_(sums)
    if skip or not launched:
        return
    index = torch.tensor(stats.slots, device=bucket.device)
    numel = torch.tensor([stats.shapes[j].numel() for j in stats.slots], device=bucket.device)
    scales = adafactor_spec.scales(sums[0, index], sums[1, index], numel, torch.stack(bucket.steps), lr, eps2, d,
                                   dtype)
    decay = 1 - lr * weight_decay
    for j, i in launched.items():
        work = works[j].mul_(decay)
        if beta1 is None:
            work.add_(u[j] * scales[i])
        else:
            m = stored(j, "exp_avg", copies[j]["exp_avg"].lerp_(u[j] * -scales[i], 1 - beta1))
            work.sub_(m)
        _store_weight(bucket, i, work)


def sophia_hessian(bucket, *, beta2):
    dtype = math_dtype(bucket.dtype)
    for i, grad in enumerate(bucket.grads):
        h = _load_state(bucket, "hessian", i, dtype)
        sophia_spec.hessian_update_(h, grad.to(dtype), beta2=beta2)
        _store_state(bucket, "hessian", i, h)


def cast_fp8(inputs, outputs, scales):
    """outputs[i] = torch's (x.float() * scale).clamp(-max, max).to(fp8); the
    inputs' absmax (fp64), NaN-propagating."""
    fmax = torch.finfo(outputs[0].dtype).max
    for x, y, s in zip(inputs, outputs, scales):
        y.copy_((x.float() * s).clamp(-fmax, fmax).to(y.dtype))
    return torch.stack([x.float().abs().amax() for x in inputs]).double()
