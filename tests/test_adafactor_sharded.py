"""FusedAdafactor's phased step for DTensor params (the cpu backend's
kernels, csrc/cpu/adafactor_sharded.cpp, and the reference's torch ops), in
one process: with no mesh dims to sum over, the phases must give the fused
step's result, for every dtype and option. (Their collectives, and results
on real meshes, are tests/test_dtensor.py's.)"""
from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from helpers import assert_same_state, cross_on_triton, grads_for, state_tensors

import fusedopt
from fusedopt import FusedAdafactor
from fusedopt.backends import reference as reference_backend
from fusedopt.dtensor import TensorSums
from fusedopt.optim.adafactor import _Sharded


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
if "triton" in fusedopt.available_backends("cpu"):
    from fusedopt.backends import triton as triton_backend

    PHASED["triton"] = triton_backend.adafactor_sharded
if not torch.cuda.is_available():  # the cuda backend's kernels, emulated on the CPU (tests/cuda_emu)
    from fusedopt.backends import cuda as cuda_backend

    PHASED["cuda"] = cuda_backend.adafactor_sharded


def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


@torch.no_grad()
def phased_step(opt: FusedAdafactor, phased, grad_mult=None, found_inf=None):
    """opt's step with every bucket taken through `phased` as a bucket of
    shards of tensors held whole (statistics over no mesh dim). The plan and
    its buckets are kept from step to step, as a step keeps them."""
    plans, _ = opt._plans_of_this_step()
    for group, plan in zip(opt.param_groups, plans):
        for bucket in plan.buckets:
            if bucket.stats is None:
                shapes = [p.shape for p in bucket.params]
                bucket.stats = TensorSums([None] * len(shapes), shapes, shapes, list(range(len(shapes))),
                                          bucket.device)
                bucket.kind = _Sharded(bool(bucket.kind))
            eps1, eps2 = group["eps"]
            phased(bucket, lr=group["lr"], beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2, d=group["d"],
                   weight_decay=group["weight_decay"], maximize=group["maximize"], beta1=opt.beta1,
                   grad_mult=grad_mult, found_inf=found_inf)


@pytest.mark.parametrize("backend", backend_params(list(PHASED)))
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype,master,state_dtype", [(torch.float32, False, None), (torch.float64, False, None),
                                                      (torch.bfloat16, True, None),
                                                      (torch.float32, False, torch.bfloat16)])
def test_phases_equal_the_fused_step(backend, config, dtype, master, state_dtype):
    cross_on_triton(backend, (config, dtype, state_dtype) in (("defaults", torch.float32, None),
                                                              ("beta1_decay", torch.bfloat16, None),
                                                              ("d_eps_maximize", torch.float32, torch.bfloat16)),
                    "defaults in fp32, beta1 with bf16 params and masters, the rest with bf16 states")
    kw = dict(CONFIGS[config], master_weights=master, state_dtype=state_dtype)
    a, b = make(dtype), make(dtype)
    ref = FusedAdafactor(a, backend="reference", **kw)
    opt = FusedAdafactor(b, backend=backend, **kw)
    for step in range(4):
        for params in (a, b):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
        ref.step()
        phased_step(opt, PHASED[backend])
    # the phases sum rows, columns and sum(u*u) in another order than the reference's torch ops
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    if state_dtype is torch.bfloat16:
        tol = 1e-2
    assert_same_state(ref, a, opt, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", backend_params(list(PHASED)))
def test_phases_take_grad_scaler_and_clip_factors(backend):
    """grad_mult multiplies the grads; found_inf skips everything, steps too."""
    a, b = make(torch.float32), make(torch.float32)
    ref, opt = FusedAdafactor(a, backend="reference"), FusedAdafactor(b, backend=backend)
    for params in (a, b):
        for p, g in zip(params, grads_for(params, 0, scale=8.0)):
            p.grad = g
    ref.grad_scale, ref.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    ref.step()
    phased_step(opt, PHASED[backend], grad_mult=torch.tensor([1 / 8.0], dtype=torch.float64))
    assert_same_state(ref, a, opt, b, rtol=2e-6, atol=2e-6)
    before = [p.detach().clone() for p in b]
    states = {k: v.clone() for k, v in state_tensors(opt, b).items()}
    phased_step(opt, PHASED[backend], found_inf=torch.ones(1))
    assert all(torch.equal(p, q) for p, q in zip(b, before))
    after = state_tensors(opt, b)
    assert after.keys() == states.keys() and all(torch.equal(after[k], v) for k, v in states.items())


@pytest.mark.parametrize("backend", backend_params(list(PHASED)))
def test_an_empty_shard_updates_its_replicated_statistics(backend):
    """A member whose local shard is empty ([0, 6] of a [4, 6] tensor whose
    rows are elsewhere) launches nothing, but its col_var, replicated, moves
    with the whole columns' sums (here 0: col_var * (1 - w)); its step too."""
    params = [torch.randn(5, 6, requires_grad=True)]
    opt = FusedAdafactor(params, backend=backend)
    params[0].grad = torch.randn(5, 6)
    with torch.no_grad():
        plans, _ = opt._plans_of_this_step()
    bucket = plans[0].buckets[0]
    col_var = torch.rand(1, 6) + 0.5
    empty = {"param": torch.zeros(0, 6), "grad": torch.zeros(0, 6), "row_var": torch.zeros(0, 1),
             "col_var": col_var.clone(), "step": torch.full((), 4.0)}
    bucket.params.append(empty["param"])
    bucket.grads.append(empty["grad"])
    bucket.states["row_var"].append(empty["row_var"])
    bucket.states["col_var"].append(empty["col_var"])
    bucket.steps.append(empty["step"])
    shapes = [torch.Size((5, 6)), torch.Size((4, 6))]
    bucket.stats = TensorSums([None, None], shapes, [torch.Size((5, 6)), torch.Size((0, 6))], [0, 1], bucket.device)
    bucket.kind = _Sharded(True)
    group = opt.param_groups[0]
    with torch.no_grad():
        PHASED[backend](bucket, lr=group["lr"], beta2_decay=group["beta2_decay"], eps1=None, eps2=group["eps"][1],
                        d=group["d"], weight_decay=0.0, maximize=False, beta1=None, grad_mult=None, found_inf=None)
    w = 5.0 ** group["beta2_decay"]
    assert float(empty["step"]) == 5.0
    torch.testing.assert_close(empty["col_var"], col_var * (1 - w), rtol=1e-6, atol=0)
