"""The bf16 param + int16 remainder encoding of fp32 masters
(fusedopt/reference/remainder.py), over every upper half and every class of
lower half: split and join are exact for every fp32 value but NaN, NaN stays
NaN, and the param is torch's round-to-nearest-even but at exact ties."""
from __future__ import annotations

import pytest
import torch

from fusedopt.reference import remainder


def patterns() -> torch.Tensor:
    """Every 16-bit upper half (sign, exponent, mantissa: every carry) with
    lower halves of every class the encoding tells apart (0, below the
    rounding point, the tie, above it, the extremes) and random ones: 2M fp32
    bit patterns, as int32."""
    upper = torch.arange(0x10000, dtype=torch.int64)
    lows = torch.tensor([0x0000, 0x0001, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=torch.int64)
    lows = torch.cat([lows, torch.randint(0, 0x10000, (24,), generator=torch.Generator().manual_seed(0))])
    bits = (upper[:, None] << 16 | lows[None, :]).flatten()
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


def test_split_join_exact_for_every_class_of_fp32():
    bits = patterns()
    master = bits.view(torch.float32)
    param, rem = remainder.split(master)
    assert param.dtype == torch.bfloat16 and rem.dtype == torch.int16
    back = remainder.join(param, rem)
    nan = master.isnan()
    assert torch.equal(back.view(torch.int32)[~nan], bits[~nan]), "a non-NaN master did not come back bit for bit"
    assert back[nan].isnan().all() and param[nan].isnan().all()
    # the param: torch's round-to-nearest-even but at exact ties with an even upper half, where it is one
    # ulp larger in magnitude; NaN: 0x7FC0, as fusedopt's kernels round (torch keeps the payload's top bits)
    rne = master.to(torch.bfloat16).view(torch.int16)
    got = param.view(torch.int16)
    tie = ((bits & 0xFFFF) == 0x8000) & ~nan
    assert torch.equal(got[~tie & ~nan], rne[~tie & ~nan])
    assert (got[nan] == 0x7FC0).all()
    assert torch.equal(got[tie].to(torch.int32) & 0xFFFF, ((bits[tie] >> 16) + 1) & 0xFFFF)
    even = tie & (((bits >> 16) & 1) == 0)
    assert torch.equal(got[even].to(torch.int32) & 0xFFFF, ((rne[even].to(torch.int32) & 0xFFFF) + 1) & 0xFFFF)
    assert torch.equal((rem < 0), ((bits & 0xFFFF) >= 0x8000))  # the remainder's sign says "rounded up"


@pytest.mark.parametrize("value,param_bits", [
    (0.0, 0x0000), (-0.0, 0x8000), (float("inf"), 0x7F80), (float("-inf"), 0xFF80),
    (3.4028234663852886e38, 0x7F80),  # the largest fp32 rounds to inf, as round-to-nearest does
    (1.401298464324817e-45, 0x0000),  # the smallest subnormal
    (-1.1754942106924411e-38, 0x8080),  # the largest subnormal, negative: carries into the exponent
    (1.0, 0x3F80), (1.00390625, 0x3F80 + 1),  # 1 + 2^-8 is 1's bf16 successor
])
def test_edges(value, param_bits):
    master = torch.tensor([value], dtype=torch.float32)
    param, rem = remainder.split(master)
    assert int(param.view(torch.int16)) & 0xFFFF == param_bits
    assert torch.equal(remainder.join(param, rem).view(torch.int32), master.view(torch.int32))


def test_ties_and_nan():
    """An exact tie rounds the magnitude up (0x3F80_8000 -> 0x3F81, where RNE
    keeps 0x3F80) and still comes back; NaN masters of any payload give 0x7FC0."""
    tie = torch.tensor([0x3F808000, 0xBF808000 - 2**32], dtype=torch.int32)
    param, rem = remainder.split(tie.view(torch.float32))
    assert (param.view(torch.int16).to(torch.int32) & 0xFFFF).tolist() == [0x3F81, 0xBF81]
    assert torch.equal(remainder.join(param, rem).view(torch.int32), tie)
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -1, 0x7FFF8000], dtype=torch.int64)
    nans = torch.where(nans >= 2**31, nans - 2**32, nans).to(torch.int32)
    param, rem = remainder.split(nans.view(torch.float32))
    assert (param.view(torch.int16) == 0x7FC0).all()
    assert remainder.join(param, rem).isnan().all()
    with pytest.raises(TypeError):
        remainder.split(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        remainder.join(param, rem.to(torch.int32))
