"""Hypothesis property tests: random shapes, dtypes and hyperparameters, every
backend that runs here against the reference."""
from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, KERNEL_BACKENDS, backend_params
from helpers import assert_same_state, grads_for, run, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedopt import FusedAdamW

pytestmark = pytest.mark.adamw

shapes = st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)
hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-5, 0.5),
    "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
    "eps": st.floats(1e-10, 1e-3),
    "weight_decay": st.floats(0.0, 0.5),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
})
dtypes = st.sampled_from([(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                          (torch.bfloat16, True), (torch.float16, True)])


def check(backend, shape_list, kw, dtype, master, seed):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in shape_list]
    a = [t.to(dtype).requires_grad_() for t in init]
    b = [t.to(dtype).requires_grad_() for t in init]
    ref = FusedAdamW(a, backend="reference", master_weights=master, **kw)
    opt = FusedAdamW(b, backend=backend, master_weights=master, **kw)
    run(ref, a, 3, seed=seed), run(opt, b, 3, seed=seed)
    # (16-bit params with masters too: over random params a master may sit at a rounding boundary)
    assert_same_state(ref, a, opt, b, **tolerance(dtype))


@pytest.mark.parametrize("backend", backend_params([b for b in KERNEL_BACKENDS if b != "triton"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape_list=shapes, kw=hyper, dtype=dtypes, seed=st.integers(0, 2**16))
def test_kernel_backend_matches_reference(backend, shape_list, kw, dtype, seed):
    check(backend, shape_list, kw, dtype[0], dtype[1], seed)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton does not run on CPU tensors here")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape_list=shapes, kw=hyper, dtype=dtypes, seed=st.integers(0, 2**16))
def test_triton_matches_reference(shape_list, kw, dtype, seed):
    check("triton", shape_list, kw, dtype[0], dtype[1], seed)


@settings(max_examples=30, deadline=None)
@given(shape_list=shapes, kw=hyper, seed=st.integers(0, 2**16))
def test_reference_equals_torch(shape_list, kw, seed):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in shape_list]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    ta = torch.optim.AdamW(a, foreach=False, **kw)
    fb = FusedAdamW(b, backend="reference", **kw)
    for step in range(3):
        for p, q, grad in zip(a, b, grads_for(a, step, seed)):
            p.grad, q.grad = grad, grad.clone()
        ta.step()
        fb.step()
    assert_same_state(ta, a, fb, b)
