"""Gradient norms and clipping: ``clip_grad_norm_`` (a drop-in for
torch.nn.utils.clip_grad_norm_), ``grad_norm``, and the global norm that the
optimizers' ``max_grad_norm`` uses.

Per (device, dtype) group one backend call reduces every tensor (two-level,
deterministic: chunk partials, then each tensor's partials in order, in fp64;
see csrc/include/fusedopt/norms.h) and one call scales them. The total norm
and the clip coefficient stay on the device: nothing waits on the host unless
``error_if_nonfinite=True`` asks for a check.

The total is the p-norm of all elements, ``(sum |x|^p)^(1/p)`` (``max |x|``
for p = inf), returned in the dtype torch.nn.utils.clip_grad_norm_ returns
(the promotion of the grads' dtypes) on the first grad's device. Unlike
torch, an empty tensor simply contributes nothing (torch's inf-norm raises on
one). Complex grads count |z| (for p = 2 their real views, no copy) and are
scaled as pairs of reals.

DTensor grads (FSDP2, tensor parallel) are reduced on their local shards and
each tensor's sum is then summed (max for inf) over the mesh dims that shard
it (fusedopt.dtensor): the norm of the whole model's gradient, the same on
every rank, returned as a plain tensor; plain grads beside them are whole on
every rank and counted once.
"""
from __future__ import annotations

import math
import os
import sys
import types
import warnings
from typing import Iterable

import torch
from torch import Tensor

from . import backends, dtensor


def _check_norm_type(norm_type) -> float:
    p = float(norm_type)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    return p


def _dense(t: Tensor) -> Tensor:
    """t itself when a kernel can walk it as a flat array, else a contiguous copy."""
    if t.is_contiguous():
        return t
    return t if t.stride() == torch.empty_like(t, memory_format=torch.preserve_format).stride() else t.contiguous()


_COMPLEX = (torch.complex64, torch.complex128)


def _check(tensors: list[Tensor]) -> None:
    for t in tensors:
        if t.is_sparse or t.layout != torch.strided:
            raise RuntimeError(f"fusedopt norms do not support sparse tensors (got {t.layout})")
        if not (t.is_floating_point() or t.dtype in _COMPLEX):
            raise TypeError("fusedopt norms take floating-point tensors (fp32, fp64, bf16, fp16) and complex64, "
                            f"complex128, got {t.dtype}")


def _as_real(t: Tensor, p: float) -> Tensor:
    """What the real kernels read for t: a complex tensor's |z|^p summed is its
    (re, im) pairs' for p = 2 (a view); other p need |z| itself (a copy)."""
    if t.dtype not in _COMPLEX:
        return t
    return torch.view_as_real(t) if p == 2.0 else t.abs()


def _groups(tensors: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of the non-empty tensors per (device, dtype), in order (_check'ed by the caller)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _backend(requested: str | None, device: torch.device):
    return backends.get(backends.resolve(requested, device))


def power_sums(tensors: list[Tensor], p: float, backend: str | None = None) -> list[tuple[list[int], Tensor]]:
    """[(indices, fp64 sums of |x|^p, or max |x| for p = inf, on their device)]
    for each (device, dtype) group of the non-empty `tensors`: one launch each."""
    _check(tensors)
    tensors = [_as_real(t, p) for t in tensors]
    out = []
    for (device, _), index in _groups(tensors).items():
        out.append((index, _backend(backend, device).power_sums([_dense(tensors[i]) for i in index], p)))
    return out


def _kernel_inputs(grads: list[Tensor]) -> tuple[list[Tensor], list | None, list[Tensor]]:
    """The grads as the norm kernels read them (DTensors' local shards, with
    pending sums, Partial, reduced first), each one's dtensor.Sharding (None
    when every grad is plain), and the tensors a clip scales in place (the
    local shards as they are: scaling partial sums scales their sum)."""
    for i, g in enumerate(grads):
        dtensor.check_tensor(g, f"fusedopt norms: grad {i}", pending_sums=True)
    if not any(map(dtensor.is_dtensor, grads)):
        return grads, None, grads
    own = [dtensor.local(g) for g in grads]
    shardings, read, pending = [], list(own), []
    for i, g in enumerate(grads):
        if not dtensor.is_dtensor(g):
            shardings.append(None)
            continue
        placements = dtensor.replicated(g.placements)
        shardings.append(dtensor.sharding_for(g.device_mesh, placements, g.dim()))
        if placements != tuple(g.placements):
            pending.append(i)
    if pending:
        reduced = dtensor.reduced_locals([grads[i] for i in pending],
                                         [dtensor.replicated(grads[i].placements) for i in pending])
        for i, t in zip(pending, reduced):
            read[i] = t
    return read, shardings, own


#: (device, shardings, parts' indices) -> (TensorSums, the parts' index tensors): built once per layout of
#: grads (a clip_grad_norm_ call per step sees the same one), so no step copies indices to the device
_whole_tensor_plans: dict = {}


def _whole_tensor_parts(parts: list[tuple[list[int], Tensor]], shardings: list, p: float,
                        device: torch.device) -> list[tuple[list[int], Tensor]]:
    """power_sums' parts of local shards -> one part with every tensor's sum
    (max for inf) over its whole tensor: a collective per process group."""
    key = (device, tuple(shardings), tuple(tuple(index) for index, _ in parts))
    plan = _whole_tensor_plans.get(key)
    if plan is None:
        if len(_whole_tensor_plans) > 64:
            _whole_tensor_plans.clear()
        every = list(range(len(shardings)))
        plan = _whole_tensor_plans[key] = (dtensor.TensorSums(shardings, None, None, every, device),
                                           [torch.tensor(index, device=device) for index, _ in parts])
    stats, indices = plan
    full = torch.zeros(len(shardings), dtype=torch.float64, device=device)
    for index, (_, sums) in zip(indices, parts):
        full.index_copy_(0, index, sums.to(device))
    stats.reduce_(full.unsqueeze(0), op="max" if math.isinf(p) else "sum")
    return [(list(range(len(shardings))), full)]


def power_total(parts: list[tuple[list[int], Tensor]], p: float, device: torch.device) -> Tensor:
    """The sum of |x|^p (max |x| for p = inf) over power_sums' parts (fp64, 0-d, on `device`)."""
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.cat([s.to(device, non_blocking=True) for _, s in parts])
    return sums.max() if math.isinf(p) else sums.sum()  # max propagates NaN


def root(total: Tensor, p: float) -> Tensor:
    """power_total -> the p-norm."""
    if math.isinf(p):
        return total
    return total.sqrt() if p == 2.0 else total.pow(1.0 / p)


def l2_from_power(power: Tensor, grad_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The L2 norm from a sum of squares, GradScaler's scale divided out (in
    fp64), in `dtype`: the norm an optimizer's fused clipping reports."""
    total = power.sqrt()
    if grad_scale is not None:
        total = total / grad_scale.to(device=total.device, dtype=torch.float64).reshape(())
    return total.to(dtype)


def clip_coefficient(total: Tensor, max_norm: float) -> Tensor:
    """clip_grad_norm_'s min(max_norm / (total + 1e-6), 1), in total's dtype, on its device (no host sync)."""
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)


def combine(parts: list[tuple[list[int], Tensor]], p: float, device: torch.device) -> Tensor:
    """The total p-norm (fp64, 0-d, on `device`) from power_sums' parts."""
    return root(power_total(parts, p, device), p)


def per_tensor_norms(parts: list[tuple[list[int], Tensor]], p: float, count: int,
                     device: torch.device) -> Tensor:
    """fp64 norms of `count` tensors (0 for the empty ones) from power_sums' parts."""
    norms = torch.zeros(count, dtype=torch.float64, device=device)
    for index, sums in parts:
        values = sums.to(device) if math.isinf(p) else sums.to(device).pow(1.0 / p)
        norms[torch.tensor(index, device=device)] = values
    return norms


#: where fusedopt's and torch's code lives (frames a warning is not attributed to)
_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _callers_level() -> int:
    """warnings.warn's stacklevel of the first frame outside fusedopt and
    torch (their decorators' wrappers included): the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _with_grads(parameters) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters that have a grad, and their grads."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=_callers_level())
    params = [p for p in parameters if p.grad is not None]
    return params, [p.grad for p in params]


def _result_dtype(grads: list[Tensor]) -> torch.dtype:
    """torch's: the promotion of the grads' norms' dtypes (a complex grad's norm is real)."""
    dtype = None
    for g in grads:
        real = g.real.dtype if g.dtype in _COMPLEX else g.dtype
        dtype = real if dtype is None else torch.promote_types(dtype, real)
    return dtype


def _local_norm(parameters, p: float, backend: str | None, across=None):
    """(parts, own, dtype): power_sums' parts of every grad (DTensors: of their
    whole tensors), the tensors a clip scales, the norm's dtype; None when no
    param has a grad. `across` (fusedopt.distributed's cross-stage rule)
    names the params another pipeline stage counts: they count 0 here."""
    params, grads = _with_grads(parameters)
    if not grads:
        return None
    device = grads[0].device
    grads, shardings, own = _kernel_inputs(grads)
    parts = power_sums(grads, p, backend)
    if shardings is not None:
        parts = _whole_tensor_parts(parts, shardings, p, device)
    if across is not None and across.uncounted:
        parts = [(index, torch.where(torch.tensor([id(params[i]) not in across.uncounted for i in index],
                                                  device=sums.device), sums, 0.0)) for index, sums in parts]
    return parts, own, _result_dtype(grads)


def _clip(parameters, max_norm: float, norm_type: float, error_if_nonfinite: bool, backend: str | None,
          across=None) -> Tensor:
    """clip_grad_norm_, for this process's grads or (`across`) with the other pipeline stages'."""
    p = _check_norm_type(norm_type)
    if not isinstance(max_norm, Tensor) and not float(max_norm) >= 0.0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
    local = _local_norm(parameters, p, backend, across)
    if local is None and across is None:
        return torch.tensor(0.0)
    parts, own, dtype = local if local is not None else ([], [], torch.float32)
    device = own[0].device if own else across.device
    power = power_total(parts, p, device)
    if across is not None:  # every stage takes part, with or without grads
        power = across.reduce_power(power, p)
    total = root(power, p).to(dtype)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    scale_(own, clip_coefficient(total, max_norm), backend)
    return total


@torch.no_grad()
def grad_norm(parameters: Tensor | Iterable[Tensor], norm_type: float = 2.0, per_tensor: bool = False,
              backend: str | None = None):
    """The total p-norm of the parameters' grads, without clipping.

    With ``per_tensor=True`` returns ``(total, norms)`` where ``norms`` holds
    one norm per parameter that has a grad, in order (fp32 on the first grad's
    device; 0 for empty grads).
    """
    if torch.compiler.is_compiling():
        parameters, traceable = _traceable(parameters, backend)
        if not traceable:
            return _eager(grad_norm, parameters, norm_type, per_tensor, backend)
    p = _check_norm_type(norm_type)
    local = _local_norm(parameters, p, backend)
    if local is None:
        total = torch.tensor(0.0)
        return (total, torch.zeros(0)) if per_tensor else total
    parts, own, dtype = local
    total = combine(parts, p, own[0].device).to(dtype)
    if per_tensor:
        return total, per_tensor_norms(parts, p, len(own), own[0].device).float()
    return total


def scale_(tensors: list[Tensor], factor: Tensor, backend: str | None = None) -> None:
    """tensors *= factor (a 0-d or 1-element tensor), one launch per (device, dtype). The
    kernels take the factor in fp64 and round it once to the math precision
    (fp32, fp64 for fp64 tensors, whose clip coefficient torch keeps in fp64)."""
    _check(tensors)
    tensors = [torch.view_as_real(t) if t.dtype in _COMPLEX else t for t in tensors]
    for (device, _), index in _groups(tensors).items():
        views = [tensors[i] for i in index]
        dense = [_dense(t) for t in views]
        _backend(backend, device).scale_(dense, factor.detach().to(device=device, dtype=torch.float64).reshape(1))
        for original, copy in zip(views, dense):
            if copy is not original:
                original.copy_(copy)


@torch.no_grad()
def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None,
                    backend: str | None = None) -> Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_: scale the grads in place by
    ``min(max_norm / (total_norm + 1e-6), 1)`` and return the total norm.

    ``foreach`` is accepted and ignored (the fused path is always taken);
    ``backend`` picks the implementation as for the optimizers. Unlike torch,
    a negative or NaN ``max_norm`` is a ValueError (torch would flip or wipe
    the grads), as are norm types torch takes but that are not norms (0,
    negative, -inf).
    """
    if torch.compiler.is_compiling():
        parameters, traceable = _traceable(parameters, backend)
        if not traceable or error_if_nonfinite:  # (that check reads the norm on the host)
            return _eager(_clip, parameters, max_norm, norm_type, error_if_nonfinite, backend)
    return _clip(parameters, max_norm, norm_type, error_if_nonfinite, backend)


def _traceable(parameters, backend: str | None) -> tuple[object, bool]:
    """Under torch.compile: (the parameters, read once where they are an
    iterator, and whether Dynamo can trace the norm into the graph: plain
    tensors whose grads a TRACEABLE backend reads, its launches being custom
    ops). Otherwise the call runs eagerly behind a graph break (DTensor grads
    make collectives; other backends read scalars or pointer tables on the
    host; an empty generator is passed on as it is)."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    elif not isinstance(parameters, (list, tuple)):
        listed = list(parameters)
        if not listed:
            return parameters, False
        parameters = listed
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        if type(g) not in (Tensor, torch.nn.Parameter) or g.layout is not torch.strided:
            return parameters, False
        if not getattr(backends.resolved(backend, g.device), "TRACEABLE", False):
            return parameters, False  # (also until a first eager call has chosen the backend)
    return parameters, True


@torch._disable_dynamo  # the eager call behind a graph break (see _traceable)
def _eager(function, *args):
    return function(*args)
