"""state_dtype=torch.bfloat16: every optimizer's states stored in bf16 (rounded
to nearest even at each store, widened to fp32 for the math), on every
backend that runs here, against the reference; the reference against torch."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from optim_db import optimizers
from helpers import (assert_same_state, assert_step_refused, beside_torch_adamw, clone_params, cross_on_triton,
                     grads_for, make_params, run, state_tensors)

from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB, FusedSophia

STEPS = 8
SHAPES = [(0,), (), (7,), (257,), (13, 70), (3, 4, 5)]

#: optimizer -> constructor arguments that exercise its elementwise states
OPTIMIZERS = optimizers(lr=1e-2, fused=True)
#: (param dtype, master_weights): the storage combinations bf16 states combine with
STORAGE = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.float16, False),
           (torch.float64, False)]


def step(opt, params, n, start=0):
    """n steps; Sophia also refreshes its Hessian estimate every other step."""
    for s in range(start, start + n):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        if isinstance(opt, FusedSophia) and s % 2 == 1:
            opt.update_hessian()
        opt.step()


def states_of(opt, params):
    """The state tensors other than step and master_param."""
    return {k: v for k, v in state_tensors(opt, params).items() if k[1] not in ("step", "master_param")}


@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: f"{str(s[0])[6:]}{'+master' if s[1] else ''}")
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
def test_bf16_states_match_reference(backend, name, storage):
    """Kernels store the same bf16 states as the reference, bit for bit (the
    same operations in the same order, each state rounded once to nearest
    even where it is stored, and read back as stored), and the params agree
    within the project's fp32 tolerance (LAMB's and Adafactor's norms sum in
    another order)."""
    cls, kw = OPTIMIZERS[name]
    dtype, master = storage
    # fp16 params round their fp32 math to bf16 states as fp32 params do, and with masters as bf16's do;
    # fp64 params take the fp32 path with fp64 math (test_adamw & co. run fp64 on triton)
    cross_on_triton(backend, dtype not in (torch.float16, torch.float64), "fp32 and bf16 + master params")
    a, b = make_params(SHAPES, dtype=dtype), make_params(SHAPES, dtype=dtype)
    ref = cls(a, backend="reference", master_weights=master, state_dtype=torch.bfloat16, **kw)
    ours = cls(b, backend=backend, master_weights=master, state_dtype=torch.bfloat16, **kw)
    step(ref, a, STEPS), step(ours, b, STEPS)
    states = states_of(ours, b)
    assert states and all(v.dtype == torch.bfloat16 for v in states.values())
    for key, v in states_of(ref, a).items():
        torch.testing.assert_close(states[key], v, atol=0, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    param_tol = {"atol": 1e-6, "rtol": 1e-5}
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb.detach(), pa.detach(), **param_tol)
    if master:
        for pa, pb in zip(a, b):
            if pa.numel():
                torch.testing.assert_close(ours.state[pb]["master_param"], ref.state[pa]["master_param"], **param_tol)


@pytest.mark.parametrize("master", [False, True])
def test_reference_is_torch_with_states_rounded_every_step(master):
    """The reference with bf16 states is torch.optim.AdamW whose moments are
    rounded to bf16 (nearest even) after every step, bit for bit; with master
    weights, torch runs on the fp32 masters and our bf16 param is the master
    rounded."""
    dtype = torch.bfloat16 if master else torch.float32
    ours = make_params(SHAPES, dtype=dtype)
    opt = FusedAdamW(ours, backend="reference", amsgrad=True, master_weights=master, state_dtype=torch.bfloat16)
    fp32, ref = beside_torch_adamw(opt, ours, STEPS, round_state=lambda key, m: m.bfloat16(), amsgrad=True)
    for p, q in zip(ours, fp32):
        if p.numel() == 0:
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key].bfloat16()), key
        if master:
            assert torch.equal(opt.state[p]["master_param"], q.detach())
        assert torch.equal(p.detach(), q.detach().to(dtype))


@pytest.mark.parametrize("storage", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16+master"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_states_halve_state_memory(name, storage):
    """State bytes (all but step and the master, which keeps fp32) exactly halve."""
    cls, kw = OPTIMIZERS[name]
    dtype, master = storage
    nbytes = {}
    for state_dtype in (None, torch.bfloat16):
        params = make_params(SHAPES, dtype=dtype)
        opt = cls(params, backend="reference", master_weights=master, state_dtype=state_dtype, **kw)
        step(opt, params, 1)
        nbytes[state_dtype] = sum(v.numel() * v.element_size() for v in states_of(opt, params).values())
        masters = [opt.state[p]["master_param"] for p in params if p.numel() and master]
        assert all(m.dtype == torch.float32 for m in masters)
    assert nbytes[None] > 0 and nbytes[torch.bfloat16] * 2 == nbytes[None]


@pytest.mark.parametrize("backend", backend_params())
def test_state_dict_holds_bf16_and_round_trips(backend):
    params = make_params(SHAPES)
    opt = FusedAdamW(params, backend=backend, state_dtype=torch.bfloat16)
    run(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][2]["exp_avg"].dtype == torch.bfloat16
    again = clone_params(params)
    opt2 = FusedAdamW(again, backend=backend, state_dtype=torch.bfloat16)
    opt2.load_state_dict(saved)
    assert opt2.state_dtype is torch.bfloat16 and copy.deepcopy(opt2).state_dtype is torch.bfloat16
    assert opt2.state[again[2]]["exp_avg"].dtype == torch.bfloat16
    run(opt, params, 3, start=3), run(opt2, again, 3, start=3)
    assert_same_state(opt, params, opt2, again)


@pytest.mark.parametrize("backend", backend_params())
def test_loading_fp32_states_converts_them(backend):
    """A torch.optim.AdamW state_dict (fp32 moments) loads into bf16 states,
    rounded once to nearest even, also for bf16 params with fp32 masters
    (torch's own load would have rounded the moments through the param
    dtype; ours takes them from the saved values); and bf16 states load back
    into an fp32-state optimizer as fp32."""
    fp32 = make_params(SHAPES)
    torch_opt = torch.optim.AdamW(fp32, foreach=False)
    run(torch_opt, fp32, 3)
    saved = copy.deepcopy(torch_opt.state_dict())
    for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
        params = [p.detach().to(dtype).requires_grad_() for p in fp32]
        opt = FusedAdamW(params, backend=backend, master_weights=master, state_dtype=torch.bfloat16)
        opt.load_state_dict(saved)
        for p, q in zip(params, fp32):
            if q.numel():
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(opt.state[p][key], torch_opt.state[q][key].bfloat16()), key
        run(opt, params, 1, start=3)
    back = clone_params(fp32)
    plain = FusedAdamW(back, backend=backend)
    plain.load_state_dict(opt.state_dict())
    assert plain.state[back[2]]["exp_avg"].dtype == torch.float32
    assert torch.equal(plain.state[back[2]]["exp_avg"], opt.state[params[2]]["exp_avg"].float())


def test_bad_state_dtype_raises():
    params = make_params([(3,)])
    with pytest.raises(ValueError, match="state_dtype must be None, torch.bfloat16 or torch.float8_e4m3fn"):
        FusedAdamW(params, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        FusedLAMB(params, state_dtype="bf16")
    with pytest.raises(ValueError, match="state_dtype"):
        FusedAdafactor(params, state_dtype=torch.float8_e5m2)


@pytest.mark.parametrize("backend", backend_params())
def test_a_state_of_another_dtype_raises_before_any_change(backend):
    """A state tensor swapped in by hand in another dtype than the optimizer
    stores: a clear error, and no param or state has moved."""
    params = make_params([(5,), (7,)])
    opt = FusedAdamW(params, backend=backend, state_dtype=torch.bfloat16)
    run(opt, params, 1)
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].float()
    assert_step_refused(opt, params, RuntimeError, "stores it as torch.bfloat16")
