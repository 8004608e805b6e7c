"""fusedopt.clip_grad_norm_ and grad_norm against torch.nn.utils.clip_grad_norm_,
on every backend that runs here."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU_BACKENDS, backend_params

import fusedopt

NORM_TYPES = [2.0, 1.0, float("inf"), 3.5, 0.5]
SHAPES = [(3, 5), (1,), (257,), (13, 70), ()]


def params_with_grads(shapes=SHAPES, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.zeros(s, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def twins(*args, **kwargs):
    a = params_with_grads(*args, **kwargs)
    b = params_with_grads(*args, **kwargs)
    return a, b


def tolerance(dtype):
    """Ours sums in fp64; torch in fp32, and for bf16/fp16 grads it rounds
    each per-tensor norm, the total and the clip coefficient to the grads' dtype.
    fp64 grads: fp64 throughout on both sides, the clip coefficient included."""
    if dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        return {"atol": 2 * eps, "rtol": 2 * eps}
    if dtype == torch.float64:
        return {"atol": 1e-14, "rtol": 1e-13}
    return {"atol": 1e-6, "rtol": 1e-5}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_clip_grad_norm_matches_torch(backend, norm_type, dtype):
    a, b = twins(dtype=dtype, scale=3.0)
    expected = torch.nn.utils.clip_grad_norm_(a, max_norm=1.0, norm_type=norm_type)
    got = fusedopt.clip_grad_norm_(b, max_norm=1.0, norm_type=norm_type, backend=backend)
    assert got.dtype == expected.dtype and got.device == expected.device and got.dim() == 0
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    for p, q in zip(a, b):
        torch.testing.assert_close(q.grad, p.grad, **tolerance(dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_terms_overflow_and_underflow_as_torch_sums_do_not(backend):
    """Each |x|^p is formed in the grads' math precision, as torch forms it, so
    a term beyond fp32's range is inf and one below it 0, on every backend
    alike; the sums are fp64 everywhere, so four fp32 squares whose sum
    exceeds fp32's range still give a finite norm (torch's fp32 sum: inf)."""
    cases = {"overflowing term": ([1e20, 1.0], math.inf), "underflowing terms": ([1e-30, 1e-30], 0.0),
             "overflowing sum": ([1.5e19] * 4, 3e19)}
    for name, (values, norm) in cases.items():
        p = torch.zeros(len(values), requires_grad=True)
        p.grad = torch.tensor(values)
        total = fusedopt.grad_norm([p], 2.0, backend=backend)
        if name != "overflowing sum":
            assert total.item() == torch.nn.utils.get_total_norm([p.grad]).item() == norm, name
        else:
            assert total.item() == pytest.approx(norm, rel=1e-6), name


@pytest.mark.parametrize("backend", backend_params())
def test_no_clipping_below_max_norm_and_mixed_dtypes(backend):
    a, b = twins(scale=1e-3)
    for params in (a, b):  # one bf16 grad among fp32 ones, one param without grad
        params[1].grad = None
        params[2] = params[2].detach().bfloat16().requires_grad_()
        params[2].grad = torch.full((257,), 1e-3, dtype=torch.bfloat16)
    before = [None if p.grad is None else p.grad.clone() for p in b]
    expected = torch.nn.utils.clip_grad_norm_(a, max_norm=100.0)
    got = fusedopt.clip_grad_norm_(b, max_norm=100.0, backend=backend)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tolerance(torch.bfloat16))  # torch rounds the bf16 group's norm
    for p, g in zip(b, before):  # coefficient clamped to 1: unchanged
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_tensors_bare_tensor_empty_list(backend):
    a, b = twins()
    for params in (a, b):
        params.append(torch.zeros(0, requires_grad=True))
        params[-1].grad = torch.zeros(0)
    expected = torch.nn.utils.clip_grad_norm_(a[:-1], max_norm=0.5, norm_type=float("inf"))  # torch fails on empties
    got = fusedopt.clip_grad_norm_(b, max_norm=0.5, norm_type=float("inf"), backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    t = params_with_grads([(40,)])[0]
    u = params_with_grads([(40,)])[0]
    torch.testing.assert_close(fusedopt.clip_grad_norm_(u, 0.1, backend=backend),
                               torch.nn.utils.clip_grad_norm_(t, 0.1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(u.grad, t.grad, atol=1e-6, rtol=1e-5)
    assert fusedopt.clip_grad_norm_([], 1.0).item() == 0.0
    with pytest.warns(UserWarning, match="empty generator") as caught:
        assert fusedopt.clip_grad_norm_((p for p in []), 1.0).item() == 0.0
    assert caught[0].filename == __file__  # attributed to the caller, as torch's warning is


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_complex_grads_clip_as_torch_does(backend, norm_type):
    """|z| is the modulus: for p = 2 the (re, im) pairs' sum of squares, for
    other p the modulus itself; the total is real, as torch's."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 3, dtype=torch.complex64, generator=gen) * 4,
             torch.randn(7, generator=gen) * 4,
             torch.randn(6, dtype=torch.complex128, generator=gen)[::2] * 4]  # a strided view
    ours, theirs = [], []
    for g in grads:
        for out in (ours, theirs):
            p = torch.zeros_like(g, requires_grad=True)
            p.grad = g.clone()
            out.append(p)
    got = fusedopt.clip_grad_norm_(ours, 1.0, norm_type=norm_type, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type)
    assert got.dtype == expected.dtype == torch.float64 and not got.is_complex()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fusedopt.grad_norm(ours[:1], norm_type=norm_type, backend=backend),
                               torch.linalg.vector_norm(ours[0].grad, norm_type), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_complex32_grads_are_refused_before_anything_changes(backend):
    p, q = torch.zeros(3, dtype=torch.complex32), torch.zeros(4, requires_grad=True)
    p.grad, q.grad = torch.zeros(3, dtype=torch.complex32), torch.full((4,), 5.0)
    with pytest.raises(TypeError, match="complex32"):
        fusedopt.clip_grad_norm_([q, p], 1.0, backend=backend)
    assert torch.equal(q.grad, torch.full((4,), 5.0))


@pytest.mark.parametrize("backend", backend_params())
def test_error_if_nonfinite_raises_before_any_grad_changes(backend):
    params = params_with_grads(scale=10.0)
    params[3].grad[2, 2] = float("nan")
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedopt.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g, atol=0, rtol=0, equal_nan=True)
    total = fusedopt.clip_grad_norm_(params, 1.0, backend=backend)  # without the check: NaN, as torch
    assert total.isnan()


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_and_many_grads(backend):
    a, b = twins([(i % 5 + 1, 7) for i in range(300)])
    for params in (a, b):
        params.append(torch.zeros(6, 8, requires_grad=True))
        params[-1].grad = torch.arange(96.0).reshape(12, 8)[::2]  # a strided view
        params.append(torch.zeros(9, 4, requires_grad=True))
        params[-1].grad = torch.randn(4, 9, generator=torch.Generator().manual_seed(5)).t()
    expected = torch.nn.utils.clip_grad_norm_(a, 2.0)
    got = fusedopt.clip_grad_norm_(b, 2.0, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    for p, q in zip(a, b):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_grad_norm_total_and_per_tensor(backend, norm_type):
    params = params_with_grads()
    params.append(torch.zeros(0, requires_grad=True))
    params[-1].grad = torch.zeros(0)
    total, norms = fusedopt.grad_norm(params, norm_type, per_tensor=True, backend=backend)
    expected = [torch.linalg.vector_norm(p.grad.double(), norm_type) if p.numel() else torch.zeros((), dtype=torch.float64)
                for p in params]
    torch.testing.assert_close(norms, torch.stack(expected).float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.stack(expected), norm_type).float(),
                               atol=1e-6, rtol=1e-6)
    assert fusedopt.grad_norm(params, norm_type, backend=backend).dim() == 0


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the cpu backend")
def test_cpu_reduction_is_deterministic_across_thread_counts():
    params = params_with_grads([(300_001,), (4097,)])
    grads = [p.grad for p in params]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(fusedopt.grad_norm(params, backend="cpu", per_tensor=True)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results)
    assert grads[0] is params[0].grad  # grad_norm changes nothing


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("-inf")])
def test_bad_norm_type(bad):
    with pytest.raises(ValueError, match="norm_type"):
        fusedopt.clip_grad_norm_(params_with_grads(), 1.0, norm_type=bad)


def test_sparse_grad_is_refused():
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedopt.clip_grad_norm_([p], 1.0)
    assert math.isclose(torch.nn.utils.clip_grad_norm_([torch.zeros(1, requires_grad=True)], 1.0).item(), 0.0)


@pytest.mark.parametrize("backend", backend_params())
def test_general_p_is_rounded_as_the_grads_math_precision(backend):
    """|x|^p for fp32 grads takes p rounded to fp32 (torch's pow, the C++
    kernels); triton once took the exact double p there: 1e-7 apart at p=3.3."""
    from fusedopt import norms

    grads = [torch.randn(10_000, generator=torch.Generator().manual_seed(3)) * 10]
    (_, ours), (_, ref) = norms.power_sums(grads, 3.3, backend)[0], norms.power_sums(grads, 3.3, "reference")[0]
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)  # the fp64 sums, before any rounding to fp32
