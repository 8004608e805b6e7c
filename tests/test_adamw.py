"""FusedAdamW against torch.optim.AdamW (the reference) and every backend that
runs here against the reference."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import CPU_BACKENDS, KERNEL_BACKENDS, backend_params
from helpers import (assert_same_state, assert_step_refused, assert_within_ulps, beside_torch_adamw, clone_params,
                     grads_for, make_params, many, run, state_tensors, train_with_grad_scaler)
from helpers import tolerance as helpers_tolerance

from fusedopt import FusedAdamW


CONFIGS = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True, "weight_decay": 0.1},
    "no_decay": {"weight_decay": 0.0, "lr": 1e-2},
    "betas_eps": {"betas": (0.8, 0.99), "eps": 1e-6, "lr": 3e-3},
    "amsgrad_maximize": {"amsgrad": True, "maximize": True, "betas": (0.5, 0.9)},
    "beta1_above_half": {"betas": (0.3, 0.95)},  # the other branch of lerp
}
STEPS = 10


KERNEL_PARAMS = backend_params(KERNEL_BACKENDS)


def tolerance(backend, dtype=torch.float32):
    """Against torch.optim.AdamW: the reference is torch's own ops, exact;
    a kernel backend within helpers.tolerance (fp32 params, or fp64 ones:
    triton takes the hyperparameters as fp64 bits)."""
    return {"atol": 0.0, "rtol": 0.0} if backend == "reference" else helpers_tolerance(dtype)


# --- the reference against torch.optim.AdamW --------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_torch(config, dtype):
    """The spec is torch's single-tensor AdamW, operation for operation: same bits."""
    kw = CONFIGS[config]
    a, b = make_params(dtype=dtype), make_params(dtype=dtype)
    ta = torch.optim.AdamW(a, foreach=False, **kw)
    fb = FusedAdamW(b, backend="reference", **kw)
    run(ta, a, STEPS), run(fb, b, STEPS)
    assert_same_state(ta, a, fb, b)


# --- every backend against torch / the reference ----------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", backend_params())
def test_backend_matches_torch(backend, config, dtype):
    kw = CONFIGS[config]
    a, b = make_params(dtype=dtype), make_params(dtype=dtype)
    ta = torch.optim.AdamW(a, foreach=False, **kw)
    fb = FusedAdamW(b, backend=backend, **kw)
    assert fb.backend == backend
    run(ta, a, STEPS), run(fb, b, STEPS)
    assert_same_state(ta, a, fb, b, **tolerance(backend, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["defaults", "amsgrad_maximize"])
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_low_precision_matches_reference(backend, config, dtype):
    """bf16/fp16 params without master weights: fp32 math, each stored value
    rounded once to nearest even, states in the param dtype (as torch's fused
    AdamW). Kernels agree with the reference to a rounding step: every param
    and state within one ulp of the reference's (torch's vectorised sqrt,
    which the reference uses, is an fp32 ulp off now and then)."""
    kw = CONFIGS[config]
    a, b = make_params(dtype=dtype), make_params(dtype=dtype)
    init = clone_params(b)
    ra, fb = FusedAdamW(a, backend="reference", **kw), FusedAdamW(b, backend=backend, **kw)
    run(ra, a, STEPS), run(fb, b, STEPS)
    states, ref_states = state_tensors(fb, b), state_tensors(ra, a)
    assert all(s.dtype == dtype for (_, k), s in states.items() if k != "step")
    assert states.keys() == ref_states.keys()
    for pa, pb, p0 in zip(a, b, init):
        assert_within_ulps(pa, pb, 1)
        assert pb.numel() < 2 or (pb != p0).any()  # the params moved: the kernel wrote them
    for key, s in states.items():
        assert_within_ulps(ref_states[key], s, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", backend_params())
def test_low_precision_error_vs_fp64(backend, dtype):
    """The project's tolerance rule: error against an fp64 run <= 2x the error
    of plain torch (torch.optim.AdamW in the same dtype) against that run, in
    the largest and in the mean error. eps=1e-4: with torch's 1e-8, which
    fp16 rounds to 0, plain fp16 AdamW divides by a zero second moment."""
    shapes = [(64, 33), (1000,)]
    init = make_params(shapes, dtype=dtype)
    p64, ptorch, pours = ([p.detach().to(dt, copy=True).requires_grad_() for p in init]
                          for dt in (torch.float64, dtype, dtype))
    kw = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-4}
    opts = [torch.optim.AdamW(p64, foreach=False, **kw), torch.optim.AdamW(ptorch, foreach=False, **kw),
            FusedAdamW(pours, backend=backend, **kw)]
    for step in range(STEPS):
        grads = grads_for(init, step)  # in `dtype`: every run sees the same grad values
        for params, opt in zip((p64, ptorch, pours), opts):
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            opt.step()
    def errors(params):  # (largest, mean) absolute error against the fp64 run
        diff = torch.cat([(a.detach().double() - r.detach()).abs().flatten() for a, r in zip(params, p64)])
        return diff.max().item(), diff.mean().item()

    (max_torch, mean_torch), (max_ours, mean_ours) = errors(ptorch), errors(pours)
    assert math.isfinite(max_torch) and max_ours <= 2 * max_torch and mean_ours <= 2 * mean_torch
    assert errors(init)[1] > 2 * mean_torch  # params that never moved would fail the test


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", backend_params())
def test_master_weights(backend, dtype):
    """With master_weights the fp32 master follows exactly the fp32 AdamW run on
    fp32 copies of the params fed the same (low-precision) grads, and the param
    is the master rounded to nearest even."""
    low = make_params(dtype=dtype)
    ours = FusedAdamW(low, backend=backend, master_weights=True, amsgrad=True)
    fp32, ref = beside_torch_adamw(ours, low, STEPS, amsgrad=True)
    tol = tolerance(backend)
    for p, q in zip(low, fp32):
        if p.numel() == 0:
            continue
        state = ours.state[p]
        assert state["master_param"].dtype == torch.float32
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(state["master_param"], q.detach(), **tol)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(state[key], ref.state[q][key], **tol)
        torch.testing.assert_close(p.detach(), state["master_param"].to(dtype), atol=0, rtol=0)
    # a low-precision param lost to rounding is still moved by the master
    assert ours.state[low[3]]["step"].item() == STEPS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", backend_params())
def test_rounding_to_low_precision_is_nearest_even(backend, dtype):
    """The param written from the master is round-to-nearest-even of it, on
    ties, subnormals, overflow and non-finite values too (lr=0 keeps p = master)."""
    finfo = torch.finfo(dtype)
    tiny, big = finfo.smallest_normal, finfo.max
    specials = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-8), tiny / 3,
                -tiny / 7, tiny * 0.5, big, big * 1.0001, -big * 1.01, 1e-30, 0.0, -0.0,
                float("inf"), float("-inf"), float("nan")]
    master = torch.tensor(specials + torch.randn(300, dtype=torch.float64).mul(100).tolist(), dtype=torch.float32)
    p = torch.zeros(master.shape, dtype=dtype, requires_grad=True)
    opt = FusedAdamW([p], lr=0.0, weight_decay=0.0, backend=backend, master_weights=True)
    p.grad = torch.zeros_like(p)
    opt.step()  # creates the master from p; now overwrite it and step again
    opt.state[p]["master_param"].copy_(master)
    opt.step()
    expected = master.to(dtype)
    torch.testing.assert_close(p.detach(), expected, atol=0, rtol=0, equal_nan=True)
    finite = ~expected.isnan()  # a NaN's sign bit carries no meaning (torch's varies by CPU path)
    assert torch.equal(torch.signbit(p.detach())[finite], torch.signbit(expected)[finite])


# --- shapes, layouts, many tensors -----------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_params(backend):
    """Transposed (dense) and sliced (gappy) params, and grads with other strides."""
    base = make_params([(6, 9), (10, 16), (5, 7)])
    views = [base[0].detach().t(), base[1].detach()[:, ::2], base[2].detach()]
    a = [v.clone().requires_grad_() for v in views]  # contiguous copies
    b = [torch.empty_like(v).copy_(v) if i == 0 else v.clone() for i, v in enumerate(views)]  # keeps the transpose
    holder = torch.zeros(10, 16)
    b[1] = holder[:, ::2].copy_(views[1]).requires_grad_()  # a strided view into a bigger tensor
    assert not b[1].is_contiguous() and b[0].stride() == (1, 9)
    b = [t.requires_grad_() if not t.requires_grad else t for t in b]
    ta = torch.optim.AdamW(a, foreach=False)
    fb = FusedAdamW(b, backend=backend)
    for step in range(STEPS):
        for i, (pa, pb, g) in enumerate(zip(a, b, grads_for(a, step))):
            pa.grad = g
            pb.grad = g.t().contiguous().t() if i == 2 else g  # grad with strides unlike its param's
        ta.step()
        fb.step()
    assert_same_state(ta, a, fb, b, **tolerance(backend))
    assert holder[:, 1::2].abs().sum() == 0  # the gaps between the sliced elements are untouched
    torch.testing.assert_close(holder[:, ::2], a[1].detach(), **tolerance(backend))


@pytest.mark.parametrize("backend", backend_params())
def test_many_tensors_one_group(backend):
    shapes = [(i % 7 + 1, 3) for i in range(many(backend, 300))]
    a, b = make_params(shapes), make_params(shapes)
    ta, fb = torch.optim.AdamW(a, foreach=False), FusedAdamW(b, backend=backend)
    run(ta, a, 3), run(fb, b, 3)
    assert_same_state(ta, a, fb, b, **tolerance(backend))


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_dtypes_in_a_group_and_params_without_grads(backend):
    shapes = [(5, 3), (17,), (4,), (9,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32]
    a = [p.to(dt).detach().requires_grad_() for p, dt in zip(make_params(shapes), dtypes)]
    b, c, init = clone_params(a), clone_params(a), clone_params(a)
    ta, fb = torch.optim.AdamW(a, foreach=False, fused=False), FusedAdamW(b, backend=backend)
    fc = FusedAdamW(c, backend="reference")  # the bf16 param: fp32 math rounded once, unlike torch's foreach=False
    for step in range(4):
        for i, (pa, pb, pc, g) in enumerate(zip(a, b, c, grads_for(a, step))):
            if i == 3:
                continue  # never has a grad
            pa.grad, pb.grad, pc.grad = g, g.clone(), g.clone()
        ta.step(), fb.step(), fc.step()
    assert b[3] not in fb.state or not fb.state[b[3]]
    torch.testing.assert_close(b[3], a[3], atol=0, rtol=0)
    for i in range(3):
        if dtypes[i] == torch.bfloat16:
            assert_within_ulps(c[i], b[i], 1)
            assert (b[i] != init[i]).any()
        else:
            torch.testing.assert_close(b[i], a[i], **tolerance(backend, dtypes[i]))


# --- torch.optim features ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_param_groups_scheduler_and_tensor_lr(backend):
    def build(cls, params, **extra):
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": torch.tensor(0.01), "weight_decay": 0.0}]
        return cls(groups, lr=3e-3, **extra)

    a, b = make_params(), make_params()
    ta = build(torch.optim.AdamW, a, foreach=False)
    fb = build(FusedAdamW, b, backend=backend)
    sa = torch.optim.lr_scheduler.StepLR(ta, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(fb, step_size=2, gamma=0.5)
    for step in range(6):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.clone()
        ta.step()
        fb.step()
        sa.step()
        sb.step()
    assert [g["lr"] for g in fb.param_groups] == [g["lr"] for g in ta.param_groups]
    # with a tensor lr torch forms lr / bias_correction in fp32 tensor math, we
    # in double (as for a float lr): an ulp apart, for the reference too
    assert_same_state(ta, a, fb, b, **tolerance("cpu"))


def test_closure_hooks_zero_grad_and_named_parameters():
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW(model.named_parameters(), lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(8, 4)
    before = model.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"]
    assert torch.is_tensor(loss) and loss.requires_grad
    assert not torch.equal(before, model.weight)
    opt.zero_grad()
    assert model.weight.grad is None


def test_step_wrapper_is_torchs():
    """FusedOptimizer's own step wrapper (it records the profiler range only
    while a profiler runs) keeps what torch's gives: global hooks around the
    optimizer's own, in torch's order; a pre-hook's new arguments; the
    "Optimizer.step#<class>.step" range under torch.profiler; grad mode as it
    was, also when the step raises; torch does not wrap it a second time."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = make_params([(5,)])[0]
    opt = FusedAdamW([p], lr=0.1)
    assert FusedAdamW.step.hooked and FusedAdamW.step.__wrapped__.__name__ == "step"
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.register_step_pre_hook(lambda o, a, k: (a, {"closure": lambda: calls.append("closure")}))
        p.grad = torch.ones_like(p)
        opt.step()
        assert calls == ["global pre", "pre", "closure", "post", "global post"]
    finally:
        for h in handles:
            h.remove()
    plain = FusedAdamW([p], lr=0.1)
    with torch.profiler.profile() as prof:
        plain.step()
    assert "Optimizer.step#FusedAdamW.step" in {e.name for e in prof.events()}
    assert torch.is_grad_enabled()
    plain.param_groups[0]["lr"] = -1.0  # the step raises: grad mode comes back
    with pytest.raises(ValueError, match="lr"):
        plain.step()
    assert torch.is_grad_enabled()


def test_state_dict_layout_matches_torch():
    a, b = make_params(), make_params()
    ta, fb = torch.optim.AdamW(a, amsgrad=True), FusedAdamW(b, amsgrad=True)
    run(ta, a, 2), run(fb, b, 2)
    sa, sb = ta.state_dict(), fb.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        step = sb["state"][i]["step"]
        assert step.dim() == 0 and step.dtype == torch.float32


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_round_trip(backend, direction):
    """Train with one, save (weights_only load), continue with the other: the
    same as continuing with the first."""
    kw = {"amsgrad": True, "weight_decay": 0.05}

    def make(kind, params):
        return torch.optim.AdamW(params, foreach=False, **kw) if kind == "torch" else \
            FusedAdamW(params, backend=backend, **kw)

    first, second = ("torch", "fused") if direction == "torch_to_fused" else ("fused", "torch")
    params = make_params()
    opt = make(first, params)
    run(opt, params, 5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    cont_params = clone_params(params)
    cont = make(second, cont_params)
    cont.load_state_dict(saved)
    run(cont, cont_params, 5, start=5)
    run(opt, params, 5, start=5)  # uninterrupted
    assert_same_state(opt, params, cont, cont_params, **tolerance(backend))


def test_loading_a_live_state_dict_shares_nothing():
    """Loading another optimizer's state_dict (no save in between) copies
    every state, the step counters included: both then step on their own."""
    params = make_params()
    opt = FusedAdamW(params, backend="cpu")
    run(opt, params, 2)
    cont_params = clone_params(params)
    cont = FusedAdamW(cont_params, backend="cpu")
    cont.load_state_dict(opt.state_dict())
    run(opt, params, 1, start=2)
    run(cont, cont_params, 1, start=2)
    for p, q in zip(params, cont_params):
        if p in opt.state:
            assert opt.state[p]["step"].item() == cont.state[q]["step"].item() == 3
            assert opt.state[p]["step"] is not cont.state[q]["step"]
    assert_same_state(opt, params, cont, cont_params, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_master_weights_state_dict(backend):
    """The master is saved; a state_dict without one (from torch.optim.AdamW)
    creates it from the param and converts the moments to fp32."""
    params = make_params([(5, 7), (9,)], dtype=torch.bfloat16)
    opt = FusedAdamW(params, backend=backend, master_weights=True)
    run(opt, params, 3)
    sd = opt.state_dict()
    assert sd["state"][0]["master_param"].dtype == torch.float32
    again = clone_params(params)
    opt2 = FusedAdamW(again, backend=backend, master_weights=True)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.state[again[0]]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(opt2.state[again[0]]["master_param"], opt.state[params[0]]["master_param"],
                               atol=0, rtol=0)
    run(opt, params, 2, start=3), run(opt2, again, 2, start=3)
    assert_same_state(opt, params, opt2, again)

    torch_params = clone_params(params)
    t = torch.optim.AdamW(torch_params)
    run(t, torch_params, 2)
    from_torch = clone_params(torch_params)
    opt3 = FusedAdamW(from_torch, backend=backend, master_weights=True)
    opt3.load_state_dict(t.state_dict())
    state = opt3.state[from_torch[0]]
    assert state["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(state["master_param"], from_torch[0].detach().float(), atol=0, rtol=0)
    run(opt3, from_torch, 1, start=2)


@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler_skips_inf_steps_and_unscales(backend):
    """GradScaler hands grad_scale/found_inf to the kernel: equal to torch's
    AdamW under the same scaler, including a step with an injected inf that
    must leave params, states and step untouched. Grads are never rewritten."""
    def step_keeping_grads(scaler, opt, model):
        grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g, atol=0, rtol=0, equal_nan=True)

    tm, to, tsnaps = train_with_grad_scaler(lambda ps: torch.optim.AdamW(ps, foreach=False, lr=0.01))
    fm, fo, fsnaps = train_with_grad_scaler(lambda ps: FusedAdamW(ps, lr=0.01, backend=backend),
                                            step=step_keeping_grads)
    assert all(torch.equal(a, b) for a, b in zip(fsnaps[2], fsnaps[3]))  # the inf step changed nothing
    assert_same_state(to, list(tm.parameters()), fo, list(fm.parameters()), **tolerance(backend))
    assert fo.state[next(fm.parameters())]["step"].item() == 5


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("backend", backend_params())
def test_nan_and_inf_grads_propagate_like_torch(backend, amsgrad):
    """Also into max_exp_avg_sq: torch.maximum propagates NaN, and so must
    each backend's max (Triton's tl.maximum drops NaN unless told)."""
    a, b = make_params([(4, 5)]), make_params([(4, 5)])
    ta, fb = torch.optim.AdamW(a, foreach=False, amsgrad=amsgrad), FusedAdamW(b, backend=backend, amsgrad=amsgrad)
    g = grads_for(a, 0)[0]
    g[0, 0], g[1, 1], g[2, 2] = float("nan"), float("inf"), float("-inf")
    a[0].grad, b[0].grad = g, g.clone()
    ta.step()
    fb.step()
    assert_same_state(ta, a, fb, b, **tolerance(backend))
    assert b[0].isnan().sum() == 3


# --- errors before anything changes ------------------------------------------------------------

BAD_ARGS = [
    {"lr": -1e-3}, {"eps": -1.0}, {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}, {"weight_decay": -0.1},
    {"betas": (0.9, torch.tensor(0.99))}, {"lr": torch.tensor([1e-3, 2e-3])},
    {"lr": torch.tensor(1e-3), "foreach": True}, {"fused": True, "foreach": True},
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=lambda kw: ",".join(kw))
def test_bad_hyperparameters_raise_like_torch(kwargs):
    params = make_params([(3,)])
    with pytest.raises(Exception) as expected:
        torch.optim.AdamW(params, **kwargs)
    with pytest.raises(type(expected.value)) as ours:
        FusedAdamW(params, **kwargs)
    assert str(ours.value) == str(expected.value)


def test_differentiable_is_not_supported():
    with pytest.raises(NotImplementedError, match="differentiable"):
        FusedAdamW(make_params([(3,)]), differentiable=True)


@pytest.mark.parametrize("backend", backend_params())
def test_sparse_grad_raises_before_any_change(backend):
    params = make_params([(4, 3), (5,)])
    opt = FusedAdamW([{"params": [params[0]]}, {"params": [params[1]]}], backend=backend)
    assert_step_refused(opt, params, RuntimeError, "sparse", grads=[torch.ones(4, 3), torch.ones(5).to_sparse()])
    assert all(not opt.state[p] for p in params)


def test_mismatched_grad_raises_before_any_change():
    params = make_params([(4,), (3,)])
    opt = FusedAdamW(params)
    params[0].grad = torch.ones(4)
    params[1].grad_dtype = None  # torch refuses a grad of another dtype unless told to allow it
    params[1].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    assert not opt.state[params[0]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn, torch.complex32])
def test_unsupported_param_dtype(dtype):
    """complex64/complex128 are stepped as pairs of reals (tests/test_complex.py);
    integer, fp8 and complex32 params have no kernel and are named in the error."""
    p = torch.zeros(3, dtype=dtype)
    p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        FusedAdamW([p]).step()


def test_deepcopy_keeps_backend_and_state():
    params = make_params([(3, 4)])
    opt = FusedAdamW(params, master_weights=True)
    run(opt, params, 2)
    clone = copy.deepcopy(opt)
    assert clone.backend == opt.backend and clone.master_weights
    assert clone.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("chunk", [1000, 1 << 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_master_path_with_real_chunk_sizes(monkeypatch, chunk, dtype):
    """The production chunk size and one that is not a multiple of the store
    block: streamed param stores, from an aligned start and from a view 2 bytes
    off alignment (its first elements are copied up to the first aligned
    address), partial blocks at chunk ends; nothing outside the view is written."""
    from fusedopt.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "CHUNK_SIZE", chunk)
    base = torch.randn(3 * 4099 + 1, dtype=torch.float64).to(dtype)
    shapes_a = [base[:4099], base[4099:2 * 4099], base[2 * 4099 + 1:]]  # the last starts 2 bytes off alignment
    low = [t.clone().requires_grad_() if i < 2 else t.requires_grad_() for i, t in enumerate(shapes_a)]
    outer = base.clone()
    low[2] = outer[2 * 4099 + 1:].requires_grad_()
    assert low[2].data_ptr() % 16 != 0
    before_view = outer[:2 * 4099 + 1].clone()
    fp32 = [p.detach().float().requires_grad_() for p in low]
    ours = FusedAdamW(low, backend="cpu", master_weights=True)
    ref = torch.optim.AdamW(fp32, foreach=False)
    for step in range(4):
        for p, q, g in zip(low, fp32, grads_for(low, step)):
            p.grad, q.grad = g, g.float()
        ours.step()
        ref.step()
    for p, q in zip(low, fp32):
        torch.testing.assert_close(ours.state[p]["master_param"], q.detach(), **tolerance("cpu"))
        torch.testing.assert_close(p.detach(), ours.state[p]["master_param"].to(dtype), atol=0, rtol=0)
    assert torch.equal(outer[:2 * 4099 + 1], before_view)


@pytest.mark.parametrize("backend", backend_params())
def test_launch_plan_follows_changes(backend):
    """The cached per-group plan is rebuilt when grads come and go, when a
    state tensor is replaced, when amsgrad is switched on, after
    load_state_dict and when a param stops being contiguous."""
    a, b = make_params([(5, 4), (7,), (3, 3)]), make_params([(5, 4), (7,), (3, 3)])
    ta, fb = torch.optim.AdamW(a, foreach=False), FusedAdamW(b, backend=backend)

    def both(step, skip=()):
        for i, (p, q, g) in enumerate(zip(a, b, grads_for(a, step))):
            p.grad, q.grad = (None, None) if i in skip else (g, g.clone())
        ta.step()
        fb.step()

    both(0)
    both(1)  # reused plan
    both(2, skip={1})  # one param without grad
    both(3)
    for opt, params in ((ta, a), (fb, b)):  # replace a state tensor by hand
        opt.state[params[0]]["exp_avg"] = torch.full_like(params[0], 0.5)
    both(4)
    for opt in (ta, fb):
        opt.param_groups[0]["amsgrad"] = True
        for params in (a, b):
            for p in params:
                if opt.state.get(p):
                    opt.state[p].setdefault("max_exp_avg_sq", torch.zeros_like(p))
    both(5)
    fb.load_state_dict(copy.deepcopy(fb.state_dict()))
    both(6)
    with torch.no_grad():  # the param's storage becomes a transposed view
        b[2].data = b[2].detach().t().contiguous().t()
    assert not b[2].is_contiguous()
    both(7)
    assert_same_state(ta, a, fb, b, **tolerance(backend))


def _interpreter_fma_rounds_once() -> bool:
    """Whether the Triton interpreter's tl.fma is a fused multiply-add, as a
    GPU's is (triton 3.6's interpreter rounds the product first; 3.9's does not)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(out):
        x = tl.full((1,), 1.0 + 2.0**-12, tl.float32)  # x * x = 1 + 2^-11 + 2^-24: the 2^-24 is a tie
        tl.store(out + tl.arange(0, 1), tl.fma(x, x, tl.full((1,), -(1.0 + 2.0**-11), tl.float32)))

    out = torch.zeros(1)
    fma_kernel[(1,)](out)
    return out.item() == 2.0**-24


@pytest.mark.skipif(not {"cpu", "triton"} <= set(CPU_BACKENDS), reason="needs the cpu and triton backends")
@pytest.mark.parametrize("config", ["defaults", "amsgrad_maximize"])
def test_triton_gives_the_cpu_backends_bits(config):
    """Both spell adamw.h's operations with IEEE division and sqrt and form the
    per-step scalars in fp64 from the same hyperparameters (triton takes them
    as fp64 bits, kernels/_numeric.py: f64_bits), so fp32 runs agree bit for
    bit (a float argument would reach the kernel rounded to fp32 and differ)."""
    if not _interpreter_fma_rounds_once():
        pytest.skip("this triton's interpreter rounds tl.fma twice (a GPU does not): bits would differ")
    kw = dict(CONFIGS[config], lr=3e-3, weight_decay=0.05)
    a, b = make_params(), make_params()
    run(FusedAdamW(a, backend="cpu", **kw), a, STEPS), run(FusedAdamW(b, backend="triton", **kw), b, STEPS)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
