"""Block-scaled FP8 optimizer states (``state_dtype=torch.float8_e4m3fn``), in
plain torch: the specification the kernels follow.

A state tensor x (fp32 values, the param's shape) is stored as

* ``q``: float8_e4m3fn, the param's shape, contiguous, and
* ``scale``: fp32, one per block of ``BLOCK`` = 256 consecutive elements
  (row-major order; the last block may be shorter), ``ceil(numel / 256)``,

recomputed at every store from the block's absmax, so that small and large
values in one tensor both keep 3 significant bits relative to their block:

    amax  = max |x_i| over the block's finite x_i
    scale = amax / 448                            (fp32, IEEE division)
    inv   = min(448 / amax, FLT_MAX) if amax > 0 else 0
    q_i   = fp8(clamp(x_i * inv, -448, 448))      (round to nearest even; NaN for inf and NaN x_i)
    x_i  ~= float(q_i) * scale                    (decoding)

(The min: 448 / amax overflows for amax < 448 / FLT_MAX, ~1.3e-36, a first
moment left to decay long enough, and the block's zeros would become
0 * inf = NaN. With FLT_MAX instead, |x_i * inv| < 448 still. Finite only: a
grad's inf or NaN makes its own state inf or NaN, as in torch; in the absmax
it would make the block's scale inf or NaN and all 256 values NaN.)

The second moments (``exp_avg_sq``, ``max_exp_avg_sq``, and Sophia's
``hessian``, an average of squared gradients) are stored as their square
roots, sqrt(v) (correctly rounded fp32), and decoded as s * s: v is a
square of gradients, so its values span twice the exponent range of the
gradients and, within one block, would underflow e4m3's 2^17 dynamic range
where sqrt(v) (on the scale of the gradients and of exp_avg) does not.

Every backend computes the same fp32 operations in the same order, so the
stored bits agree across backends (up to the ulp-level differences of the
update itself).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: elements per scale
BLOCK = 256
#: the storage format and its largest finite value
DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: states stored as sqrt(value)
SQRT_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "hessian"})


def scale_name(name: str) -> str:
    """The state_dict key of the scales of state `name`."""
    return name + "_scale"


def n_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def empty_like(p: Tensor) -> tuple[Tensor, Tensor]:
    """A zero state for param p: (q, scales)."""
    return (torch.zeros(p.shape, dtype=DTYPE, device=p.device),
            torch.zeros(n_blocks(p.numel()), dtype=torch.float32, device=p.device))


def _blocks(flat: Tensor) -> Tensor:
    """[n] -> [n_blocks, BLOCK], zero-padded."""
    pad = n_blocks(flat.numel()) * BLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 values x -> (q fp8 of x's shape, contiguous; scales fp32 [n_blocks])."""
    x = x.detach().float()
    blocks = _blocks(x.reshape(-1))
    finite = blocks.isfinite()
    amax = torch.where(finite, blocks.abs(), 0.0).amax(dim=1)
    scales = amax / FP8_MAX
    # a true division (torch computes `number / tensor` as a reciprocal times the number)
    inv = torch.where(amax > 0, (torch.full_like(amax, FP8_MAX) / amax).clamp(max=torch.finfo(torch.float32).max),
                      torch.zeros_like(amax))
    q = torch.where(finite, (blocks * inv[:, None]).clamp(-FP8_MAX, FP8_MAX), torch.nan).to(DTYPE)
    return q.reshape(-1)[:x.numel()].reshape(x.shape), scales


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    """(q, scales) -> fp32 values of q's shape."""
    blocks = _blocks(q.reshape(-1).float())
    return (blocks * scales.float()[:, None]).reshape(-1)[:q.numel()].reshape(q.shape)


def sqrt_rn(v: Tensor) -> Tensor:
    """Correctly rounded fp32 sqrt (through fp64: exact for fp32 inputs), as the
    kernels' IEEE sqrt; torch's vectorised CPU sqrt is off by an ulp at times."""
    return v.double().sqrt().float()


def encode(name: str, value: Tensor) -> tuple[Tensor, Tensor]:
    """State `name`'s fp32 value -> (q, scales) as stored."""
    value = value.detach().float()
    return quantize(sqrt_rn(value) if name in SQRT_STATES else value)


def decode(name: str, q: Tensor, scales: Tensor) -> Tensor:
    """State `name` as stored -> its fp32 value."""
    x = dequantize(q, scales)
    return x * x if name in SQRT_STATES else x


def store_(name: str, q: Tensor, scales: Tensor, value: Tensor) -> None:
    """Write state `name`'s new fp32 value into its storage, in place."""
    new_q, new_scales = encode(name, value)
    q.copy_(new_q)
    scales.copy_(new_scales)
