"""Complex params, as torch's Adam family takes them: pairs of reals
(view_as_real) with complex states; FusedAdafactor refuses them as
torch.optim.Adafactor does. And master_weights takes only True/False."""
from __future__ import annotations

import pytest
import torch
from conftest import TESTED_BACKENDS, backend_params
from optim_db import optimizers

import fusedopt
from fusedopt import FusedAdafactor, FusedAdamW


def complex_and_real(seed: int = 0):
    """A complex param, a plain real one beside it (the same group), and their grads for 4 steps."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    r = torch.randn(7, generator=g)
    grads = [(torch.randn(5, 3, dtype=torch.complex64, generator=g), torch.randn(7, generator=g)) for _ in range(4)]
    return p, r, grads


def run(opt_class, p, r, grads, **kwargs):
    p, r = p.clone().requires_grad_(), r.clone().requires_grad_()
    opt = opt_class([p, r], **kwargs)
    for gp, gr in grads:
        p.grad, r.grad = gp.clone(), gr.clone()
        opt.step()
    return p.detach(), r.detach(), opt


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_adamw_complex_params_equal_torch(backend, amsgrad, maximize):
    """FusedAdamW on a complex param equals torch.optim.AdamW's for-loop
    (which steps view_as_real); the states are complex and load into torch's
    optimizer and back."""
    p, r, grads = complex_and_real()
    kwargs = dict(lr=0.1, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    got_p, got_r, mine = run(FusedAdamW, p, r, grads, backend=backend, max_grad_norm=1.0, **kwargs)
    want_p, want_r = p.clone().requires_grad_(), r.clone().requires_grad_()
    theirs = torch.optim.AdamW([want_p, want_r], foreach=False, **kwargs)
    for gp, gr in grads:
        want_p.grad, want_r.grad = gp.clone(), gr.clone()
        # max_grad_norm: the norm of every real component, as clip_grad_norm_ takes complex grads
        torch.nn.utils.clip_grad_norm_([want_p, want_r], 1.0)
        theirs.step()
    torch.testing.assert_close(got_p, want_p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_r, want_r.detach(), rtol=1e-5, atol=1e-6)
    state = mine.state[mine.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.complex64
    back = torch.optim.AdamW([want_p, want_r], **kwargs)
    back.load_state_dict(mine.state_dict())
    assert back.state[want_p]["exp_avg"].dtype == torch.complex64
    again = FusedAdamW([got_p.clone().requires_grad_(), got_r.clone().requires_grad_()], backend=backend, **kwargs)
    again.load_state_dict(theirs.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["exp_avg"], theirs.state[want_p]["exp_avg"])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("opt_class", [cls for name, (cls, _) in optimizers(complex=True).items() if name != "adamw"])
def test_complex_params_are_pairs_of_reals(backend, opt_class):
    """The optimizers that take complex params (besides FusedAdamW, compared
    with torch above; torch has none of these) step one exactly as they
    step its view_as_real."""
    p, r, grads = complex_and_real(1)
    got_p, got_r, _ = run(opt_class, p, r, grads, backend=backend, lr=0.01, max_grad_norm=1.0)
    real_grads = [(torch.view_as_real(gp), gr) for gp, gr in grads]
    want_p, want_r, _ = run(opt_class, torch.view_as_real(p), r, real_grads, backend=backend, lr=0.01,
                            max_grad_norm=1.0)
    assert torch.equal(torch.view_as_real(got_p), want_p)
    assert torch.equal(got_r, want_r)


def test_complex_refusals():
    """FusedAdafactor raises torch.optim.Adafactor's RuntimeError at step
    (torch's optim_db error case); complex params with state_dtype, a
    complex32 param, and master_weights that is not a bool are refused."""
    p = torch.rand(2, 3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.rand_like(p)
    opt = FusedAdafactor([p])
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        opt.step()
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        torch.optim.Adafactor([p]).step()
    with pytest.raises(ValueError, match="states are complex"):
        FusedAdamW([p], state_dtype=torch.bfloat16)
    for value in ("yes", "Remainder", 1, None):
        with pytest.raises(ValueError, match="master_weights must be True, False or 'remainder'"):
            FusedAdamW([torch.zeros(2, requires_grad=True)], master_weights=value)
    assert "reference" in TESTED_BACKENDS and fusedopt.FusedSophia._supports_complex


def test_complex_param_given_new_storage():
    """p.data = new (as vector_to_parameters does): the step updates the new
    storage, not the old one a cached plan's real view still reads."""
    p, r, grads = complex_and_real(2)
    mine, ref = p.clone().requires_grad_(), p.clone().requires_grad_()
    opt, theirs = FusedAdamW([mine], lr=0.1), torch.optim.AdamW([ref], lr=0.1, foreach=False)
    for i, (gp, _) in enumerate(grads):
        if i == 2:
            new = torch.randn_like(p)
            mine.data, ref.data = new.clone(), new.clone()
        mine.grad, ref.grad = gp.clone(), gp.clone()
        opt.step()
        theirs.step()
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_a_copied_optimizer_steps():
    """copy.deepcopy / pickle of an optimizer (real and complex params) steps as the original."""
    import copy

    for dtype in (torch.float32, torch.complex64):
        p = torch.randn(4, dtype=dtype, requires_grad=True)
        p.grad = torch.randn_like(p)
        opt = FusedAdamW([p], lr=0.1)
        opt.step()
        twin = copy.deepcopy(opt)
        q = twin.param_groups[0]["params"][0]
        q.grad = p.grad.clone()
        opt.step()
        twin.step()
        assert torch.equal(p.detach(), q.detach())
