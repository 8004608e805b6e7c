"""FP8 weight casting: ``cast_to_fp8`` (a multi-tensor scaled, saturating cast
with each tensor's absmax, in one pass) and ``Float8Recipe`` (delayed scaling
for the FP8 weight copies an optimizer writes during its step).

The cast of tensor x with scale s is exactly torch's

    (x.float() * s).clamp(-max, max).to(dtype)        max: 448 (e4m3fn), 57344 (e5m2)

(round to nearest even; the clamp makes it saturate; NaN stays NaN), computed
per (device, dtype) group in one launch that also reduces absmax(x) (of the
input, before scaling; NaN if x holds one). See csrc/include/fusedopt/fp8.h.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import backends
from .backends._dtypes import FP8_FORMATS

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_fp8_dtype(dtype) -> None:
    if dtype not in FP8_FORMATS:
        raise ValueError(f"fp8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}")


def _scales_tensor(scales, n: int, device: torch.device) -> Tensor:
    """One fp32 scale per tensor on `device`, from a 1-D tensor or a sequence of
    numbers / 1-element tensors (no host sync for tensors already there)."""
    if isinstance(scales, Tensor):
        s = scales.detach().reshape(-1)
    else:
        s = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to(device) for v in scales]) \
            if len(scales) else torch.empty(0)
    if s.numel() != n:
        raise ValueError(f"cast_to_fp8: {n} tensors but {s.numel()} scales (one per tensor)")
    return s.to(device=device, dtype=torch.float32)


def cast_to_fp8(tensors: Tensor | Sequence[Tensor], scales, dtype: torch.dtype = torch.float8_e4m3fn, *,
                backend: str | None = None) -> tuple[list[Tensor], Tensor]:
    """``(fp8_tensors, amaxes)``: ``saturate(x * scale).to(dtype)`` for each
    tensor (a new tensor of x's shape, contiguous) and each input's absmax
    (fp32, one per tensor, on the first tensor's device; 0 for an empty one).

    `scales`: one scale per tensor, a 1-D tensor or a sequence of numbers or
    1-element tensors. Inputs: float32, bfloat16 or float16 (fp64 would be
    rounded twice; cast it to fp32 yourself). One launch per (device, dtype)
    group of inputs; `backend` as for the optimizers (default automatic).
    """
    _check_fp8_dtype(dtype)
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    for t in tensors:
        if not isinstance(t, Tensor) or t.dtype not in _INPUT_DTYPES:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"cast_to_fp8 takes float32, bfloat16 or float16 tensors, got {got}")
        if t.layout != torch.strided:
            raise TypeError(f"cast_to_fp8 does not support sparse tensors (got {t.layout})")
    backends.validate_name(backend)
    if not tensors:
        return [], torch.zeros(0, dtype=torch.float32)
    first = tensors[0].device
    scale_values = _scales_tensor(scales, len(tensors), first)
    outputs = [torch.empty(t.shape, dtype=dtype, device=t.device) for t in tensors]
    zero = torch.zeros((), dtype=torch.float32, device=first)
    amaxes = [zero] * len(tensors)  # 0-d pieces, stacked at the end: no host round trip
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, _), index in groups.items():
        impl = backends.get(backends.resolve(backend, device, "cast_fp8"))
        amax = impl.cast_fp8([tensors[i].contiguous() for i in index], [outputs[i] for i in index],
                             scale_values[index].to(device).contiguous())
        amax = amax.to(device=first, dtype=torch.float32)
        for j, i in enumerate(index):
            amaxes[i] = amax[j]
    return outputs, torch.stack(amaxes)
