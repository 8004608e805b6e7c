"""FusedAdafactor's phased step for DTensor params (the cpu backend's
kernels, csrc/cpu/adafactor_sharded.cpp, and the reference's torch ops), in
one process: with no mesh dims to sum over, the phases must give the fused
step's result, for every dtype and option. (Their collectives, and results
on real meshes, are tests/test_dtensor.py's.)"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, grads_for, state_tensors

import fusedopt
from fusedopt import FusedAdafactor
from fusedopt.backends import reference as reference_backend
from fusedopt.dtensor import TensorSums
from fusedopt.optim.adafactor import _Sharded

pytestmark = pytest.mark.adafactor

SHAPES = [(), (7,), (300,), (30, 20), (2, 5, 3), (33, 1), (1, 17), (3, 2, 1, 9)]
CONFIGS = {
    "defaults": {},
    "beta1_decay": {"beta1": 0.9, "weight_decay": 0.1, "lr": 3e-2},
    "d_eps_maximize": {"d": 2.0, "eps": (1e-20, 1e-2), "beta2_decay": -0.5, "maximize": True},
}
PHASED = {"reference": reference_backend.adafactor_sharded}
if "cpu" in fusedopt.available_backends("cpu"):
    from fusedopt.backends import cpu as cpu_backend

    PHASED["cpu"] = cpu_backend.adafactor_sharded


def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


@torch.no_grad()
def phased_step(opt: FusedAdafactor, phased, grad_mult=None, found_inf=None):
    """opt's step with every bucket taken through `phased` as a bucket of
    shards of tensors held whole (statistics over no mesh dim)."""
    plans, _ = opt._plans_of_this_step()
    for group, plan in zip(opt.param_groups, plans):
        for bucket in plan.buckets:
            shapes = [p.shape for p in bucket.params]
            bucket.stats = TensorSums([None] * len(shapes), shapes, shapes, list(range(len(shapes))), bucket.device)
            bucket.kind = _Sharded(bool(bucket.kind))
            eps1, eps2 = group["eps"]
            phased(bucket, lr=group["lr"], beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2, d=group["d"],
                   weight_decay=group["weight_decay"], maximize=group["maximize"], beta1=opt.beta1,
                   grad_mult=grad_mult, found_inf=found_inf)
    opt._plans = {}  # the buckets were changed


@pytest.mark.parametrize("phased", list(PHASED))
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype,master,state_dtype", [(torch.float32, False, None), (torch.float64, False, None),
                                                      (torch.bfloat16, True, None),
                                                      (torch.float32, False, torch.bfloat16)])
def test_phases_equal_the_fused_step(phased, config, dtype, master, state_dtype):
    kw = dict(CONFIGS[config], master_weights=master, state_dtype=state_dtype)
    a, b = make(dtype), make(dtype)
    ref = FusedAdafactor(a, backend="reference", **kw)
    opt = FusedAdafactor(b, backend=phased, **kw)
    for step in range(4):
        for params in (a, b):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
        ref.step()
        phased_step(opt, PHASED[phased])
    # the phases sum rows, columns and sum(u*u) in another order than the reference's torch ops
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    if state_dtype is torch.bfloat16:
        tol = 1e-2
    assert_same_state(ref, a, opt, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("phased", list(PHASED))
def test_phases_take_grad_scaler_and_clip_factors(phased):
    """grad_mult multiplies the grads; found_inf skips everything, steps too."""
    a, b = make(torch.float32), make(torch.float32)
    ref, opt = FusedAdafactor(a, backend="reference"), FusedAdafactor(b, backend=phased)
    for params in (a, b):
        for p, g in zip(params, grads_for(params, 0, scale=8.0)):
            p.grad = g
    ref.grad_scale, ref.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    ref.step()
    phased_step(opt, PHASED[phased], grad_mult=torch.tensor([1 / 8.0], dtype=torch.float64))
    assert_same_state(ref, a, opt, b, rtol=2e-6, atol=2e-6)
    before = [p.detach().clone() for p in b]
    states = {k: v.clone() for k, v in state_tensors(opt, b).items()}
    phased_step(opt, PHASED[phased], found_inf=torch.ones(1))
    assert all(torch.equal(p, q) for p, q in zip(b, before))
    after = state_tensors(opt, b)
    assert after.keys() == states.keys() and all(torch.equal(after[k], v) for k, v in states.items())
