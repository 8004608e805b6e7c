"""Exact fp32 master weights kept as a bf16 param and a 16-bit remainder: the
specification of ``master_weights="remainder"`` (the kernels spell it as
join_remainder / split_remainder in csrc/include/fusedopt/numeric.h and
load_joined / store_split in kernels/_numeric.py; fusedopt/optim/masters.py
keeps the states).

An fp32 master's bit pattern M splits into its upper and lower 16 bits. The
bf16 param is the upper half rounded by the lower half's top bit, as
Transformer Engine's ``store_param_remainders`` does:

    param     = upper + (low >= 0x8000)        (on the 16-bit pattern)
    remainder = low, as an int16               (negative exactly when it rounded up)

and the master comes back as ``((param - (remainder < 0)) << 16) | low``.

* Adding 1 to a bf16 pattern moves its magnitude up by one ulp, carrying into
  the exponent where the mantissa is full (and from the largest finite value
  to inf, as round-to-nearest does there), so the param is the master rounded
  to nearest, ties away from zero: it equals round-to-nearest-even except at
  exact ties (low == 0x8000) whose upper half is even, where it is one ulp
  larger in magnitude. 16 bits cannot say more: an even bf16 value is the
  rounding of 65,537 fp32 values, one remainder short.
* Every fp32 value that is not NaN (zeros of both signs, subnormals, inf,
  the largest finite) comes back bit for bit. The +1 never wraps for them:
  only upper halves 0x7FFF and 0xFFFF (NaN patterns) would carry out.
* A NaN master gives the canonical NaN param 0x7FC0, as round-to-nearest
  does in fusedopt's kernels (csrc/include/fusedopt/numeric.h), and comes
  back as a NaN (its payload is not kept: 256 NaN upper halves cannot map
  onto the 254 bf16 NaNs one to one).
"""
from __future__ import annotations

import torch
from torch import Tensor

_CANONICAL_NAN = 0x7FC0


def split(master: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 master -> (bf16 param, int16 remainder), elementwise."""
    if master.dtype != torch.float32:
        raise TypeError(f"split takes fp32 masters, got {master.dtype}")
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    upper, low = bits >> 16, bits & 0xFFFF
    param = upper + (low >= 0x8000).to(torch.int64)
    param = torch.where(master.isnan(), _CANONICAL_NAN, param)
    return _bits16(param).view(torch.bfloat16), _bits16(low)


def join(param: Tensor, remainder: Tensor) -> Tensor:
    """(bf16 param, int16 remainder) -> the fp32 master, elementwise."""
    if param.dtype != torch.bfloat16 or remainder.dtype != torch.int16:
        raise TypeError(f"join takes a bf16 param and an int16 remainder, got {param.dtype} and {remainder.dtype}")
    upper = param.view(torch.int16).to(torch.int64) & 0xFFFF
    low = remainder.to(torch.int64) & 0xFFFF
    upper = (upper - (remainder < 0).to(torch.int64)) & 0xFFFF
    return _bits32((upper << 16) | low).view(torch.float32)


def _bits16(x: Tensor) -> Tensor:
    """int64 holding a 16-bit pattern -> int16 with that pattern."""
    x = x & 0xFFFF
    return torch.where(x >= 0x8000, x - 0x10000, x).to(torch.int16)


def _bits32(x: Tensor) -> Tensor:
    """int64 holding a 32-bit pattern -> int32 with that pattern."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 0x80000000, x - 0x100000000, x).to(torch.int32)
