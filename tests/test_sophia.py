"""FusedSophia: the reference against a literal transcription of SophiaG
(issue #4), every backend that runs here against the reference, and the
Gauss-Newton-Bartlett loop."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import KERNEL_BACKENDS, TESTED_BACKENDS, backend_params
from helpers import assert_same_state, grads_for, make_params, many, tolerance

import fusedopt
from fusedopt import FusedSophia, gnb_hessian_loss
from fusedopt._resources import shipped_module



def run_sophia(opt, params, steps, hessian_every=2, bs=None, start=0):
    """Steps with update_hessian interleaved (on the same step's grads)."""
    for step in range(start, start + steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        if step % hessian_every == hessian_every - 1:
            opt.update_hessian()
        opt.step(bs=bs)
    return params


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("bs", [None, 64])
def test_reference_matches_the_written_algorithm(maximize, bs):
    kw = dict(lr=1e-2, betas=(0.9, 0.95), rho=0.03, weight_decay=0.1, maximize=maximize, bs=128)
    ours = make_params([(5, 4), (9,), ()])
    opt = FusedSophia(ours, backend="reference", **kw)
    run_sophia(opt, ours, 8, bs=bs)
    beta1, beta2 = kw["betas"]
    used_bs = bs if bs is not None else kw["bs"]
    expected = [p.detach().double() for p in make_params([(5, 4), (9,), ()])]
    m = [torch.zeros_like(p) for p in expected]
    h = [torch.zeros_like(p) for p in expected]
    for step in range(8):
        grads = [g.double() for g in grads_for(expected, step)]
        if step % 2 == 1:
            h = [beta2 * hi + (1 - beta2) * g * g for hi, g in zip(h, grads)]
        for i, (p, g) in enumerate(zip(expected, grads)):
            g = -g if maximize else g
            p.mul_(1 - kw["lr"] * kw["weight_decay"])
            m[i] = beta1 * m[i] + (1 - beta1) * g
            ratio = torch.clamp(m[i].abs() / (kw["rho"] * used_bs * h[i] + 1e-15), max=1)
            p -= kw["lr"] * torch.sign(m[i]) * ratio
    for p, e, mi, hi in zip(ours, expected, m, h):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), mi, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["hessian"].double(), hi, atol=1e-6, rtol=1e-5)
        assert opt.state[p]["step"].item() == 8


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.bfloat16, True), (torch.float16, True)])
@pytest.mark.parametrize("maximize", [False, True])
def test_backend_matches_reference(backend, dtype, master, maximize):
    kw = dict(lr=1e-2, rho=0.05, weight_decay=0.05, maximize=maximize, master_weights=master, bs=256)
    a, b = make_params(dtype=dtype), make_params(dtype=dtype)
    ref, opt = FusedSophia(a, backend="reference", **kw), FusedSophia(b, backend=backend, **kw)
    run_sophia(ref, a, 6), run_sophia(opt, b, 6)
    assert_same_state(ref, a, opt, b, **tolerance(dtype, master))


@pytest.mark.parametrize("backend", backend_params())
def test_many_tensors_non_contiguous_grad_scaler(backend):
    shapes = [(i % 5 + 1, 3) for i in range(many(backend, 150))] + [(0,), (40,)]
    a, b = make_params(shapes), make_params(shapes)
    b[-1] = torch.zeros(80)[::2].copy_(a[-1].detach()).requires_grad_()
    ref, opt = FusedSophia(a, backend="reference", lr=1e-2), FusedSophia(b, backend=backend, lr=1e-2)
    for step in range(4):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.clone()
        ref.update_hessian()
        opt.update_hessian()
        for o in (ref, opt):  # as GradScaler hands them over (here: no inf, scale 2)
            o.grad_scale, o.found_inf = torch.tensor(2.0), torch.tensor(float(step == 2))
        ref.step()
        opt.step()
    assert opt.state[b[0]]["step"].item() == 3  # the inf step did not count
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_state_dict_round_trip(backend):
    params = make_params()
    opt = FusedSophia(params, backend=backend, lr=1e-2)
    run_sophia(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = [p.detach().clone().requires_grad_() for p in params]
    opt2 = FusedSophia(again, backend=backend, lr=1e-2)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(opt2.state[again[3]]) == {"step", "exp_avg", "hessian"}
    run_sophia(opt, params, 3, start=3), run_sophia(opt2, again, 3, start=3)
    assert_same_state(opt, params, opt2, again)


def test_gnb_loss_gradient_is_unbiased_noise():
    """E over sampled labels of d CE / d logits = softmax - E[onehot] = 0: the
    loss's gradient carries no signal of its own, only the GNB curvature."""
    logits = torch.randn(64, 7, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    total = torch.zeros_like(logits)
    for _ in range(400):
        logits.grad = None
        gnb_hessian_loss(logits, generator=g).backward()
        total += logits.grad
    assert (total / 400).abs().max() < 0.01
    assert gnb_hessian_loss(torch.randn(2, 3, 5)).dim() == 0


@pytest.mark.parametrize("backend", backend_params([b for b in TESTED_BACKENDS if b != "triton"]))
def test_example_trains(backend):
    example = shipped_module("bench", "examples.sophia_gnb")
    losses = example.train(steps=120, backend=backend, log=None)
    assert losses[-1] < 0.5 * losses[0]


def test_bad_arguments():
    params = make_params([(3,)])
    for kw, match in [({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.9)}, "beta"), ({"rho": -1.0}, "rho"),
                      ({"weight_decay": -1.0}, "weight_decay"), ({"bs": 0}, "bs")]:
        with pytest.raises(ValueError, match=match):
            FusedSophia(params, **kw)
    assert copy.deepcopy(FusedSophia(make_params([(3,)]))).param_groups[0]["bs"] == 5120
    assert fusedopt.FusedSophia is FusedSophia
