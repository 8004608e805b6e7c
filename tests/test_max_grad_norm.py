"""max_grad_norm inside the step: the same as torch.nn.utils.clip_grad_norm_
followed by the step, with .grad never rewritten, on every backend here."""
from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from helpers import FP32_TOL, assert_same_state, bits, grads_for, make_params, tolerance, train_with_grad_scaler
from optim_db import optimizers

import fusedopt
from fusedopt import FusedAdamW

TOL = FP32_TOL


def two_groups(params):
    return [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0, "lr": 3e-3}]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("max_norm,dtype", [(0.5, torch.float32), (1e3, torch.float32), (0.5, torch.float64)])
def test_adamw_max_grad_norm_equals_clip_then_step(backend, max_norm, dtype):
    """fp64 params: the norm, the clip coefficient (torch keeps it in fp64) and
    the step in fp64, to fp64 rounding."""
    tol = tolerance(dtype)
    a, b = make_params(dtype=dtype), make_params(dtype=dtype)
    ta = torch.optim.AdamW(two_groups(a), foreach=False)
    fb = FusedAdamW(two_groups(b), backend=backend, max_grad_norm=max_norm)
    for step in range(6):
        grads = grads_for(a, step, scale=3.0)
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(a, max_norm)
        ta.step()
        fb.step()
        for q, g in zip(b, grads):
            assert torch.equal(q.grad, g)  # never rewritten
        torch.testing.assert_close(fb.last_grad_norm, norm, **tol)
    assert_same_state(ta, a, fb, b, **tol)


@pytest.mark.parametrize("backend", backend_params())
def test_max_grad_norm_under_grad_scaler(backend):
    """GradScaler: the norm is of the unscaled grads, as after scaler.unscale_()."""
    tn, fn = [], []

    def clip_then_step(scaler, opt, model):
        scaler.unscale_(opt)
        tn.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25))
        scaler.step(opt)

    def fused_step(scaler, opt, model):
        scaler.step(opt)
        fn.append(opt.last_grad_norm.clone())

    kw = dict(steps=7, spoil=(4, float("inf")), loss_scale=50.0)
    tm, to, _ = train_with_grad_scaler(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), step=clip_then_step,
                                       **kw)
    fm, fo, _ = train_with_grad_scaler(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend, max_grad_norm=0.25),
                                       step=fused_step, **kw)
    assert fn[4].isinf() or fn[4].isnan()  # the spoilt step's norm, its step skipped
    for t, f in zip(tn, fn):
        torch.testing.assert_close(f, t, **TOL, equal_nan=True)
    assert_same_state(to, list(tm.parameters()), fo, list(fm.parameters()), **TOL)


def test_max_grad_norm_validation_and_off_switch():
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedAdamW(make_params([(3,)]), max_grad_norm=-1.0)
    a, b = make_params([(5, 3)]), make_params([(5, 3)])
    plain, off = FusedAdamW(a), FusedAdamW(b, max_grad_norm=0)
    for p, q, g in zip(a, b, grads_for(a, 0, scale=100.0)):
        p.grad, q.grad = g, g.clone()
    plain.step()
    off.step()
    assert off.max_grad_norm is None and off.last_grad_norm is None
    assert_same_state(plain, a, off, b)


def test_last_grad_norm_of_a_step_without_grads_is_zero():
    """As clip_grad_norm_ returns 0 without grads, not the previous step's norm."""
    (p,) = make_params([(3,)])
    opt = FusedAdamW([p], max_grad_norm=1.0)
    p.grad = torch.full((3,), 4.0)
    opt.step()
    assert opt.last_grad_norm.item() == pytest.approx(48**0.5)
    p.grad = None
    opt.step()
    assert opt.last_grad_norm.item() == 0.0


@pytest.mark.parametrize("backend", backend_params())
def test_fused_clip_gives_clip_grad_norm_then_steps_bits(backend):
    """fp32: the fused coefficient is clip_grad_norm_'s, formed in fp32 from the
    fp32 norm, and applied in the kernel with one rounding, as clip_grad_norm_
    rounds the clipped grad: the same bits as fusedopt.clip_grad_norm_ + step."""
    a, b = make_params(), make_params()
    fused, plain = FusedAdamW(a, backend=backend, max_grad_norm=0.5), FusedAdamW(b, backend=backend)
    for step in range(4):
        grads = grads_for(a, step, scale=3.0)
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        fusedopt.clip_grad_norm_(b, 0.5, backend=backend)
        plain.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("name", list(optimizers(fused=True)))
def test_fp64_grad_multiplier_on_every_optimizer(backend, name):
    """fp64 params with max_grad_norm and a GradScaler scale: the multiplier
    reaches every kernel in fp64 (against the reference to fp64 rounding)."""
    cls, kw = optimizers(lr=1e-2, fused=True)[name]
    runs = []
    for which in ("reference", backend):
        params = make_params(dtype=torch.float64)
        opt = cls(params, backend=which, **{**kw, "max_grad_norm": 0.5})
        for step in range(4):
            for p, g in zip(params, grads_for(params, step, scale=24.0)):
                p.grad = g
            opt.grad_scale, opt.found_inf = torch.tensor([8.0]), torch.tensor([0.0])  # what GradScaler sets
            opt.step()
        runs.append((opt, params))
    assert_same_state(*runs[0], *runs[1], atol=1e-13, rtol=1e-12)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_scalars_are_the_torch_ops_bits(dtype):
    """The cpu backend's clip_scalars (one call a step) against what it
    replaces, norms.l2_from_power, norms.clip_coefficient and
    plans.grad_multiplier as torch ops: the same bits for powers from 0 to
    inf and NaN, clipping or not, with and without GradScaler's scale."""
    from fusedopt.backends import cpu
    from fusedopt.norms import clip_coefficient, l2_from_power
    from fusedopt.optim.plans import grad_multiplier

    g = torch.Generator().manual_seed(0)
    powers = torch.cat([torch.tensor([0.0, 1e-300, 5e-324, 1e-12, 1.0, 4.0, 1e30, 1e300, float("inf"), float("nan")],
                                     dtype=torch.float64),
                        torch.rand(300, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (300,),
                                                                                                   generator=g)])
    scales = [None, torch.tensor(65536.0), torch.tensor(3.0), torch.tensor(0.125, dtype=torch.float64)]
    for max_norm in (1.0, 0.5, 1e-3, 7.3, 1e6):
        for scale in scales:
            for power in powers:
                norm, mult = cpu.clip_scalars(power, scale, max_norm, dtype)
                ref_norm = l2_from_power(power, scale, dtype)
                ref_mult = grad_multiplier(scale, clip_coefficient(ref_norm, max_norm))
                assert norm.dtype == dtype and mult.dtype == torch.float64 and norm.dim() == mult.dim() == 0
                what = (float(power), max_norm, scale)
                assert torch.equal(bits(norm), bits(ref_norm)), what
                assert torch.equal(bits(mult), bits(ref_mult.reshape(()))), what
