"""Stochastic rounding fp32 -> bf16, in plain torch: the specification.

Unbiased rounding: add 16 uniformly random bits below the bits bf16 keeps,
then truncate. A value x between two bf16 neighbours lo < x < hi rounds to hi
with probability (x - lo) / (hi - lo), so E[round(x)] = x and updates smaller
than half a bf16 ulp still move a bf16 weight on average.

The random bits are a counter-based hash of (launch seed, tensor slot in the
launch, element offset), so every backend draws the same bits for the same
element, in any order (csrc/include/fusedopt/numeric.h and kernels/_numeric.py
spell the same functions with 32-bit unsigned arithmetic; here it is emulated
on int64 with masks). NaN becomes 0x7FC0 as in round-to-nearest; a value
within an ulp of the largest bf16 may round up to infinity.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 on uint32 values held in an int64 tensor."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32  # int64 products wrap; the low 32 bits are right
    x = x ^ (x >> 15)
    x = (x * 0xD35A2D97) & _M32
    return x ^ (x >> 15)


def tensor_key(seed: int, tensor: int) -> int:
    """The key of tensor slot `tensor` in a launch with `seed`."""
    return int(mix32(torch.tensor(seed & _M32) ^ mix32(torch.tensor(tensor & _M32))))


def random_bits(key: int, offsets: Tensor) -> Tensor:
    """32 random bits per element, from its flat offset (int64 tensor):
    mix32(mix32(counter) ^ key). The key enters after a first hash of the
    offset: XORed into the offset itself, the streams of two keys would be the
    same bits at offsets i and i ^ (key0 ^ key1), whole tensors' noise shifted
    copies of each other."""
    low, high = offsets & _M32, offsets >> 32
    return mix32(mix32((low + high * 0x9E3779B9) & _M32) ^ key)


def memory_offsets(t: Tensor) -> Tensor:
    """Each element's flat offset in memory (what the kernels index by), for a
    dense tensor of any strides."""
    return torch.arange(t.numel(), device=t.device).as_strided(t.shape, t.stride())


def round_bf16_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 `x` rounded to bf16 with the low 16 of `bits` (same shape) as the noise."""
    u = x.float().view(torch.int32).to(torch.int64) & _M32
    rounded = (u + (bits & 0xFFFF)) >> 16
    rounded = torch.where(x.isnan(), 0x7FC0, rounded)
    return rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # keeps the low 16 bits


def store_stochastic_(param: Tensor, value: Tensor, seed: int, tensor: int) -> None:
    """param (bf16, dense) = value rounded stochastically, with the bits the
    kernels draw for slot `tensor` of a launch with `seed`."""
    bits = random_bits(tensor_key(seed, tensor), memory_offsets(param))
    param.copy_(round_bf16_stochastic(value, bits))
