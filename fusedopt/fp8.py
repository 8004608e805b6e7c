"""FP8 weight casting: ``cast_to_fp8`` (a multi-tensor scaled, saturating cast
with each tensor's absmax, in one pass) and ``Float8Recipe`` (delayed scaling
for the FP8 weight copies FusedAdamW writes during its step).

The cast of tensor x with scale s is exactly torch's

    (x.float() * s).clamp(-max, max).to(dtype)        max: 448 (e4m3fn), 57344 (e5m2)

(round to nearest even; the clamp makes it saturate; NaN stays NaN), computed
per (device, dtype) group in one launch that also reduces absmax(x) (of the
input, before scaling; NaN if x holds one). See csrc/include/fusedopt/fp8.h.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import backends
from .backends._bucket import Fp8Copies
from .backends._dtypes import FP8_FORMATS

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_fp8_dtype(dtype) -> None:
    if dtype not in FP8_FORMATS:
        raise ValueError(f"fp8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}")


def _scales_tensor(scales, n: int, device: torch.device) -> Tensor:
    """One fp32 scale per tensor on `device`, from a 1-D tensor or a sequence of
    numbers / 1-element tensors (no host sync for tensors already there)."""
    if isinstance(scales, Tensor):
        if scales.is_complex() or not (scales.is_floating_point() or scales.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"cast_to_fp8: scales must be real numbers, got {scales.dtype}")
        s = scales.detach().reshape(-1)
    elif isinstance(scales, (list, tuple)):
        values = []
        for i, v in enumerate(scales):
            if isinstance(v, Tensor) and (v.numel() != 1 or v.is_complex()):
                raise ValueError(f"cast_to_fp8: scales[{i}] must be one real number, got a tensor of shape "
                                 f"{tuple(v.shape)} ({v.dtype})")
            if not isinstance(v, (Tensor, numbers.Real)):
                raise TypeError(f"cast_to_fp8: scales[{i}] must be a number, got {type(v).__name__}")
            values.append(torch.as_tensor(v, dtype=torch.float32).reshape(()).to(device))
        s = torch.stack(values) if values else torch.empty(0)
    else:
        raise TypeError(f"cast_to_fp8: scales must be a 1-D tensor or a sequence of numbers, got "
                        f"{type(scales).__name__}")
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


_FLT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Float8Recipe:
    """Delayed scaling of the FP8 weight copies (``FusedAdamW(..., fp8=recipe)``).

    Per weight w (the fp32 master, or an fp32 param): a history of the last
    ``amax_history_len`` values of max|w|, and a scale

        scale = fp8_max / max(history) / 2**margin       (kept as it was while max(history) is 0 or not finite)

    Step t writes the copy ``saturate(w_t * scale)`` in the same pass that
    updates w_t, with the scale derived before step t (the delay: w_t's own
    absmax is known only once the pass is done). Then max|w_t| joins the
    history and the next scale is formed, on the device. ``opt.fp8_weight(p)``
    returns the copy and ``1 / scale`` of the scale it was cast with. When the
    state is created, the history starts with max|w_0| and the first copy is
    cast from w_0, so a copy exists from the first step on.
    """

    dtype: torch.dtype = torch.float8_e4m3fn
    margin: int = 0
    amax_history_len: int = 16

    def __post_init__(self):
        _check_fp8_dtype(self.dtype)
        if not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"Float8Recipe: margin must be a non-negative int, got {self.margin!r}")
        if not isinstance(self.amax_history_len, int) or self.amax_history_len < 1:
            raise ValueError(f"Float8Recipe: amax_history_len must be a positive int, got {self.amax_history_len!r}")

    @property
    def fp8_max(self) -> float:
        return torch.finfo(self.dtype).max

    def scale_from(self, amax: Tensor, old_scale: Tensor) -> Tensor:
        """fp8_max / amax / 2**margin (fp32) at most FLT_MAX, or `old_scale` where
        amax is 0 or not finite. (An amax below fp8_max / FLT_MAX, ~1e-36, would
        give an inf scale: copies 0 * inf = NaN, scale_inv 0. Transformer Engine
        clamps likewise.)"""
        amax = amax.float()
        # a tensor numerator: python_float / tensor is reciprocal(t) * float in torch, rounded twice
        scale = (torch.full_like(amax, self.fp8_max) / amax / (2.0**self.margin)).clamp(max=_FLT_MAX)
        return torch.where((amax > 0) & torch.isfinite(amax), scale, old_scale.float())

    def cast(self, w: Tensor, scale: Tensor) -> Tensor:
        """saturate(w * scale) in the recipe's dtype, as torch computes it (the spec of the kernels' copy)."""
        return (w.float() * scale).clamp(-self.fp8_max, self.fp8_max).to(self.dtype)

    def initial_state(self, w: Tensor) -> dict[str, Tensor]:
        """The FP8 state of weight w before its first step: history [max|w|, 0, ...],
        the scale from it, and the copy of w cast with that scale."""
        amax = w.detach().float().abs().amax() if w.numel() else torch.zeros((), device=w.device)
        history = torch.zeros(self.amax_history_len, dtype=torch.float32, device=w.device)
        history[0] = amax
        scale = self.scale_from(amax, torch.ones((), device=w.device))
        copy = torch.empty_like(w, dtype=self.dtype, memory_format=torch.preserve_format)
        copy.copy_(self.cast(w.detach(), scale))
        return {"fp8_weight": copy, "fp8_scale": scale, "fp8_scale_inv": scale.reciprocal(),
                "fp8_amax_history": history}

    def update_(self, copies: Fp8Copies, amax: Tensor, found_inf: Tensor | None = None) -> None:
        """After a step that cast every copy with its scale and measured the
        new weights' absmax (`amax`, one per copy): scale_inv = 1 / the scale
        used, amax joins each history, the next scales. About twenty small
        torch ops per bucket (on a GPU, launches), on the device, whatever
        the number of params; all left as they were when GradScaler found
        inf/NaN (`found_inf` nonzero). This is the spec: a backend may do the
        same in one call (``fp8_update_``: C++ on the cpu backend, one kernel
        on the cuda backend), tested against it bit for bit."""
        scales, history = copies.scale_buffer, copies.history_buffer
        new_history = torch.cat([amax.to(torch.float32)[:, None], history[:, :-1]], dim=1)
        new_scales = self.scale_from(new_history.amax(dim=1), scales)
        new_invs = scales.reciprocal()
        if found_inf is not None:
            skip = found_inf.reshape(()) != 0
            new_history = torch.where(skip, history, new_history)
            new_scales = torch.where(skip, scales, new_scales)
            new_invs = torch.where(skip, copies.scale_inv_buffer, new_invs)
        history.copy_(new_history)
        scales.copy_(new_scales)
        copies.scale_inv_buffer.copy_(new_invs)


def delayed_scaling_update_(recipe: Float8Recipe, copies: Fp8Copies, amax: Tensor, found_inf: Tensor | None,
                            backend) -> None:
    """``recipe.update_(copies, amax, found_inf)`` through `backend` (a backend
    module): its one-call ``fp8_update_`` when it has one, else the spec's torch ops."""
    update = getattr(backend, "fp8_update_", None)
    if update is not None:
        update(copies, amax, found_inf, recipe)
    else:
        recipe.update_(copies, amax, found_inf)


#: a param's FP8 state entries, and the Fp8Copies buffer each is a row of
_BUFFERS = {"fp8_scale": "scale_buffer", "fp8_scale_inv": "scale_inv_buffer", "fp8_amax_history": "history_buffer"}
#: fp32 elements per row where a buffer's rows are padded: a scale_inv row is what
#: torch._scaled_mm takes as a scale pointer, and cuBLASLt refuses one that is not
#: 16-byte aligned (CUBLAS_STATUS_NOT_SUPPORTED at +4 and +8 bytes, seen on an H200)
_ROW_WIDTH = {"fp8_scale_inv": 4}


def bucket_copies(weights: list[Tensor], states: list[dict]) -> Fp8Copies:
    """The Fp8Copies of a bucket: `weights` (the copies as the kernels write
    them) and the params' state dicts, whose scale, scale_inv and history
    entries become rows of one buffer each (allocated and filled here, or
    reused when they already are consecutive rows of one). scale_inv's
    buffer is column 0 of an [n, 4] tensor (_ROW_WIDTH): each row 16-byte
    aligned, as torch._scaled_mm needs its scales."""
    buffers = {}
    for name, field in _BUFFERS.items():
        rows = [state[name] for state in states]
        width = _ROW_WIDTH.get(name)
        buffer = _common_buffer(rows, width)
        if buffer is None:
            buffer = torch.stack(rows)
            if width is not None:
                padded = buffer.new_zeros((len(rows), width))
                padded[:, 0] = buffer
                buffer = padded[:, 0]
            for state, row in zip(states, buffer.unbind(0)):
                state[name] = row
        buffers[field] = buffer
    return Fp8Copies(weights=weights, scales=[state["fp8_scale"] for state in states], **buffers)


def _common_buffer(rows: list[Tensor], width: int | None = None) -> Tensor | None:
    """The buffer whose rows `rows` are, in order and all of it, if there is
    one: a contiguous [n, ...] tensor, or with `width`, column 0 of a
    contiguous [n, width] one (rows of 0-d scalars)."""
    base = rows[0]._base
    if base is None or base.shape[0] != len(rows) or not base.is_contiguous():
        return None
    if width is not None and base.shape[1:] != (width,):
        return None
    row_shape = base.shape[1:] if width is None else torch.Size()
    step = base[0].numel() * base.element_size()
    start = base.data_ptr()
    if all(r._base is base and r.data_ptr() == start + i * step and r.shape == row_shape
           for i, r in enumerate(rows)):
        return base if width is None else base[:, 0]
    return None
