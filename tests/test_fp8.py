"""FP8 casting: fusedopt.cast_to_fp8 bit for bit against torch's
(x.float() * s).clamp(-max, max).to(dtype), with each input's absmax, on
every backend that runs here."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_params

import fusedopt

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def torch_cast(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype)


def hard_values() -> torch.Tensor:
    """fp32 values where a conversion goes wrong if it is wrong anywhere: every
    fp8 value, the midpoints between neighbours (ties) and the floats just
    beside them, subnormals, overflow, specials, and random bit patterns."""
    parts = [torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 448.0, 464.0, 480.0,
                           57344.0, 61440.0, 1e30, -1e30])]
    for dtype in FP8:
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
        v = v[v.isfinite()].unique()
        mid = (v[1:] + v[:-1]) / 2
        parts += [v, mid, torch.nextafter(mid, torch.tensor(float("inf"))), torch.nextafter(mid, torch.tensor(-1e9))]
    g = torch.Generator().manual_seed(0)
    parts.append(torch.randint(0, 2**32, (20000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32))
    parts.append(torch.randn(20000, generator=g) * 300)
    x = torch.cat(parts)
    return torch.cat([x, -x])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fp8 bit patterns, NaNs compared as NaN (their sign bit carries no meaning)."""
    a8, b8 = a.view(torch.uint8), b.view(torch.uint8)
    nan = a.float().isnan()
    return bool(torch.equal(nan, b.float().isnan()) and torch.equal(a8[~nan], b8[~nan]))


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("backend", backend_params())
def test_cast_is_torchs_bit_for_bit(backend, dtype, monkeypatch):
    """Element by element; the chunking is the next test's. (Triton gets its
    production chunk and block sizes here: the suite's small ones made the
    interpreter take ~30 s per dtype over these ~82K values.)"""
    from fusedopt.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "CHUNK_SIZE", 1 << 16)
    monkeypatch.setattr(triton_backend, "BLOCK_SIZE", 1024)
    x = hard_values()
    for scale in (1.0, 0.37, 2.0**-10, 1000.0):
        (out,), amax = fusedopt.cast_to_fp8([x], [scale], dtype, backend=backend)
        assert out.dtype == dtype and out.shape == x.shape
        assert same_bits(out, torch_cast(x, scale, dtype)), scale
        assert amax.isnan().item()  # x holds a NaN: torch's amax is NaN too
    finite = x[x.isfinite()]
    (_,), amax = fusedopt.cast_to_fp8([finite], torch.ones(1), dtype, backend=backend)
    assert amax.dtype == torch.float32 and amax.item() == finite.abs().max().item()


@pytest.mark.parametrize("backend", backend_params())
def test_many_tensors_dtypes_layouts_and_empty(backend):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1000, generator=g) * 50, torch.randn(7, 13, generator=g).bfloat16(),
          torch.randn(300, generator=g).half() * 1e-3, torch.empty(0), torch.randn(3, 257, generator=g),
          torch.randn(40, 30, generator=g).t(), torch.tensor(2.5)]
    scales = [1.0, torch.tensor(3.0), 1000.0, 1.0, torch.tensor([0.5]), 7.0, 100.0]
    for dtype in FP8:
        outs, amax = fusedopt.cast_to_fp8(xs, scales, dtype, backend=backend)
        assert amax.shape == (len(xs),)
        for x, s, out, a in zip(xs, scales, outs, amax):
            assert out.shape == x.shape and same_bits(out, torch_cast(x, float(s), dtype))
            assert a.item() == (x.float().abs().max().item() if x.numel() else 0.0)


def test_a_bare_tensor_and_no_tensors():
    (out,), amax = fusedopt.cast_to_fp8(torch.ones(4), torch.tensor([2.0]))
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.float(), torch.full((4,), 2.0))
    assert amax.tolist() == [1.0]
    outs, amax = fusedopt.cast_to_fp8([], [])
    assert outs == [] and amax.numel() == 0


def test_bad_arguments():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        fusedopt.cast_to_fp8([x], [1.0], torch.float16)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fusedopt.cast_to_fp8([x.double()], [1.0])
    with pytest.raises(ValueError, match="2 tensors but 1 scales"):
        fusedopt.cast_to_fp8([x, x], [1.0])
    with pytest.raises(ValueError, match="unknown fusedopt backend"):
        fusedopt.cast_to_fp8([x], [1.0], backend="tpu")
