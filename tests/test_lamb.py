"""FusedLAMB: the reference against a literal transcription of the algorithm
(apex's FusedLAMB, as issue #3 writes it out), and every backend that runs
here against the reference, over every switch."""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from helpers import FP32_TOL, assert_same_state, grads_for, make_params, many, run, tolerance, train_with_grad_scaler

from fusedopt import FusedLAMB


SWITCHES = ["bias_correction", "adam_w_mode", "grad_averaging", "use_nvlamb", "maximize"]
CONFIGS = [dict(zip(SWITCHES, values)) for values in itertools.product([True, False], repeat=len(SWITCHES))]
FP32 = FP32_TOL


def literal_lamb(params, grads_per_step, *, lr, betas, eps, weight_decay, bias_correction, adam_w_mode,
                 grad_averaging, max_grad_norm, use_nvlamb, maximize):
    """The issue's pseudocode, line by line, in fp64."""
    beta1, beta2 = betas
    state = [{"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in params]
    for grads in grads_per_step:
        G = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        c = G / max_grad_norm if max_grad_norm and G > max_grad_norm else 1.0
        for p, grad, st in zip(params, grads, state):
            st["step"] += 1
            g = grad.double() / c
            if maximize:
                g = -g
            if not adam_w_mode:
                g = g + weight_decay * p
            st["m"] = beta1 * st["m"] + ((1 - beta1) if grad_averaging else 1.0) * g
            st["v"] = beta2 * st["v"] + (1 - beta2) * g * g
            bc1, bc2 = (1 - beta1 ** st["step"], 1 - beta2 ** st["step"]) if bias_correction else (1.0, 1.0)
            u = (st["m"] / bc1) / (torch.sqrt(st["v"] / bc2) + eps)
            if adam_w_mode:
                u = u + weight_decay * p
            pn, un = p.norm(), u.norm()
            ratio = lr * pn / un if (use_nvlamb or weight_decay != 0) and pn != 0 and un != 0 else lr
            p -= ratio * u
    return params, state


@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("max_grad_norm,weight_decay", [(1.0, 0.01), (None, 0.01), (0.0, 0.0), (1e4, 0.1)])
def test_reference_matches_the_written_algorithm(config, max_grad_norm, weight_decay):
    kw = dict(CONFIGS[config], lr=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay,
              max_grad_norm=max_grad_norm)
    shapes = [(5, 4), (9,), (), (3, 0)]
    ours = make_params(shapes)
    grads = [grads_for(ours, step, scale=2.0) for step in range(5)]
    opt = FusedLAMB(ours, backend="reference", **kw)
    for step_grads in grads:
        for p, g in zip(ours, step_grads):
            p.grad = g
        opt.step()
    expected, state = literal_lamb([p.detach().double() for p in make_params(shapes)], grads, **kw)
    for p, e, st in zip(ours, expected, state):
        torch.testing.assert_close(p.detach().double(), e, **FP32)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), st["m"], **FP32)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), st["v"], **FP32)
        assert opt.state[p]["step"].item() == st["step"]


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("config", [0, 5, 10, 21, 31])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.bfloat16, True), (torch.float16, True)])
def test_backend_matches_reference(backend, config, dtype, master):
    kw = dict(CONFIGS[config], lr=1e-2, weight_decay=0.02, max_grad_norm=1.0, master_weights=master)
    a, b = make_params(dtype=dtype), make_params(dtype=dtype)
    ref, opt = FusedLAMB(a, backend="reference", **kw), FusedLAMB(b, backend=backend, **kw)
    run(ref, a, 6, scale=2.0), run(opt, b, 6, scale=2.0)
    assert_same_state(ref, a, opt, b, **tolerance(dtype, master))
    torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm, **FP32)


@pytest.mark.parametrize("backend", backend_params())
def test_grads_untouched_many_tensors_and_non_contiguous(backend):
    shapes = [(i % 7 + 1, 5) for i in range(many(backend, 200))] + [(0,), (300,)]
    a, b = make_params(shapes), make_params(shapes)
    b[-1] = torch.zeros(600)[::2].copy_(a[-1].detach()).requires_grad_()  # a strided view
    ref, opt = FusedLAMB(a, backend="reference"), FusedLAMB(b, backend=backend)
    for step in range(3):
        grads = grads_for(a, step, scale=0.5)
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g, g.clone()
        ref.step()
        opt.step()
        assert all(torch.equal(q.grad, g) for q, g in zip(b, grads))
    assert_same_state(ref, a, opt, b, **FP32)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_grad_makes_its_tensor_nan_as_in_apex(backend):
    """Without GradScaler a NaN grad makes ||u|| NaN; apex's ratio test
    (norms != 0) then takes lr * ||p|| / NaN, so every element of that tensor
    becomes NaN, and the other tensors step normally."""
    a, b = make_params([(5, 4), (7,)]), make_params([(5, 4), (7,)])
    ref, ours = FusedLAMB(a, backend="reference", max_grad_norm=None), FusedLAMB(b, backend=backend,
                                                                                 max_grad_norm=None)
    for params, opt in ((a, ref), (b, ours)):
        grads = grads_for(params, 0)
        grads[0][1, 2] = float("nan")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    assert b[0].isnan().all() and not b[1].isnan().any()
    assert_same_state(ref, a, ours, b, **FP32)


@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler_and_tensor_lr(backend):
    def train(opt_backend):
        return train_with_grad_scaler(
            lambda ps: FusedLAMB(ps, lr=torch.tensor(1e-2), backend=opt_backend, max_grad_norm=0.5),
            spoil=(3, float("nan")))

    rm, ro, _ = train("reference")
    fm, fo, snaps = train(backend)
    assert all(torch.equal(x, y) for x, y in zip(snaps[2], snaps[3]))  # the NaN step changed nothing
    assert fo.state[next(fm.parameters())]["step"].item() == 5
    assert_same_state(ro, list(rm.parameters()), fo, list(fm.parameters()), **FP32)


@pytest.mark.parametrize("backend", backend_params())
def test_state_dict_round_trip(backend):
    params = make_params()
    opt = FusedLAMB(params, backend=backend, weight_decay=0.05)
    run(opt, params, 3)
    sd = opt.state_dict()
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][2]["step"].dtype == torch.float32 and sd["state"][2]["step"].dim() == 0
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    again = [p.detach().clone().requires_grad_() for p in params]
    opt2 = FusedLAMB(again, backend=backend, weight_decay=0.05)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    run(opt, params, 2, start=3), run(opt2, again, 2, start=3)
    assert_same_state(opt, params, opt2, again)


def test_bad_arguments():
    params = make_params([(3,)])
    for kw, match in [({"lr": -1.0}, "learning rate"), ({"eps": -1.0}, "epsilon"), ({"betas": (1.0, 0.9)}, "beta"),
                      ({"weight_decay": -1.0}, "weight_decay"), ({"max_grad_norm": -1.0}, "max_grad_norm"),
                      ({"backend": "nope"}, "unknown fusedopt backend")]:
        with pytest.raises(ValueError, match=match):
            FusedLAMB(params, **kw)
    params[0].grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        FusedLAMB(params).step()
    assert copy.deepcopy(FusedLAMB(make_params([(3,)]))).max_grad_norm == 1.0
