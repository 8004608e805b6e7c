"""GPU tests: the cuda and triton backends for real, CUDA-graph capture, and
tensors past 2^31 elements. Skipped (with the reason) where there is no GPU;
run them with `pytest -m gpu tests` or bench/gpu.sh on a GPU machine.

Where a test asks for the reference's bits (FP8 codes, bf16 states), the
reference runs on CPU copies of the params: there its bits are the oracle the
CPU suite holds every backend to, while on CUDA tensors torch's own kernels
contract multiply-adds and reduce in other orders, so an ulp moves (the first
H200 run: the cuda and triton backends agreed with each other bit for bit and
both differed from the reference run on the GPU by an ulp in FP8 scales).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_same_state, assert_within_ulps, grads_for, make_params, run
from test_fp8_states import AF_SHAPES, assert_same_fp8_states, moment_grads

import fusedopt
from fusedopt import FusedAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.adamw,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["cuda", "triton"]
CONFIGS = [{}, {"amsgrad": True, "maximize": True, "weight_decay": 0.1}, {"betas": (0.3, 0.95), "lr": 1e-2}]
SHAPES = [(0,), (), (1,), (7,), (3, 5), (70001,), (300, 513), (2, 0, 3)]


def tolerance(dtype):
    if dtype == torch.float64:
        return {"atol": 1e-7, "rtol": 1e-7}
    if dtype == torch.float32:
        return {"atol": 1e-6, "rtol": 1e-5}
    eps = torch.finfo(dtype).eps
    return {"atol": 4 * eps, "rtol": 2 * eps}


def on_gpu(params):
    """GPU copies of CPU params (the reference keeps the CPU ones)."""
    return [p.detach().cuda().requires_grad_() for p in params]


def on_cpu(opt, params):
    """(opt's states of `params`, the params), copied to the CPU, as the
    comparisons of tests/helpers.py take them: (an object with .state, params)."""
    cpu = [q.detach().cpu() for q in params]
    state = {c: {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state.get(q, {}).items()}
             for c, q in zip(cpu, params)}
    return SimpleNamespace(state=state), cpu


def test_gpu_backends_are_available():
    assert fusedopt.available_backends("cuda") == ["reference", "triton", "cuda"]
    assert FusedAdamW(make_params([(3,)], device="cuda")).backend == "cuda"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.bfloat16, True), (torch.float16, True)])
def test_matches_reference_on_gpu(backend, config, dtype, master):
    kw = CONFIGS[config]
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref = FusedAdamW(a, backend="reference", master_weights=master, **kw)
    opt = FusedAdamW(b, backend=backend, master_weights=master, **kw)
    run(ref, a, 10), run(opt, b, 10)
    assert_same_state(ref, a, opt, b, **tolerance(dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_matches_torch_fused_on_gpu(backend):
    a = make_params(SHAPES, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ta = torch.optim.AdamW(a, fused=True, amsgrad=True)
    fb = FusedAdamW(b, backend=backend, amsgrad=True)
    run(ta, a, 10), run(fb, b, 10)
    assert_same_state(ta, a, fb, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_tensors_and_non_contiguous_on_gpu(backend):
    a = make_params([(i % 13 + 1, 5) for i in range(1000)], device="cuda")
    a.append(torch.randn(64, 48, device="cuda").t().requires_grad_())
    b = [p.detach().clone().requires_grad_() if p.is_contiguous() else
         p.detach().t().clone().t().requires_grad_() for p in a]
    ta, fb = torch.optim.AdamW(a, foreach=False), FusedAdamW(b, backend=backend)
    run(ta, a, 3), run(fb, b, 3)
    assert_same_state(ta, a, fb, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_scaler_on_gpu(backend):
    """An autocast fp16 model trained with GradScaler (an inf injected at
    step 2: that step is skipped, the scale halves), torch's fused AdamW
    against ours. Both take the same scaled grads, those of torch's model:
    fed back through fp16 forwards, an ulp between the two optimizers' params
    flips fp16 roundings and grows to ~1e-5 in six steps (the first H200 run)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    theirs = list(model.parameters())
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    to, fo = torch.optim.AdamW(theirs, lr=1e-2, fused=True), FusedAdamW(ours, lr=1e-2, backend=backend)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    x = torch.randn(16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for step in range(6):
        to.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scalers[0].scale(loss).backward()
        scalers[1].scale(loss.detach())  # initialises its scale: the same as scalers[0]'s
        if step == 2:
            theirs[0].grad[0, 0] = float("inf")
        for p, q in zip(theirs, ours):
            q.grad = p.grad.clone()
        for scaler, opt in zip(scalers, (to, fo)):
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_same_state(to, theirs, fo, ours, atol=1e-6, rtol=1e-5)
    assert fo.state[ours[0]]["step"].item() == 5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("master", [False, True])
def test_capturable_step_in_a_cuda_graph(backend, master):
    """capturable=True with a tensor lr: the step is captured once and
    replayed; the result equals running the step eagerly."""
    dtype = torch.bfloat16 if master else torch.float32
    eager = make_params([(1000,), (37, 3)], dtype=dtype, device="cuda")
    static = [p.detach().clone().requires_grad_() for p in eager]
    kw = dict(lr=torch.tensor(1e-2, device="cuda"), capturable=True, backend=backend, master_weights=master)
    opt_e, opt_s = FusedAdamW(eager, **kw), FusedAdamW(static, **dict(kw, lr=torch.tensor(1e-2, device="cuda")))
    grads = [grads_for(eager, step) for step in range(8)]
    for p, g in zip(static, grads[0]):
        p.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (also builds and caches the launch tables)
            opt_s.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, g in zip(eager, grads[0]):
        p.grad = g.clone()
    for _ in range(3):
        opt_e.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_s.step()
    for step in range(1, 8):
        for p, q, g in zip(eager, static, grads[step]):
            p.grad = g.clone()
            q.grad.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    assert_same_state(opt_e, eager, opt_s, static, atol=0, rtol=0)
    assert opt_s.state[static[0]]["step"].item() == 10


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_larger_than_2_31_elements(backend):
    """64-bit offsets: a bf16 param of 2^31 + 4099 elements (16 GiB with its
    grad and states) is updated up to its last element."""
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 2 * n + (1 << 30):
        pytest.skip(f"needs {4 * 2 * n / 2**30:.0f} GiB of free GPU memory")
    p = torch.full((n,), 1.0, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    opt = FusedAdamW([p], lr=0.25, weight_decay=0.0, backend=backend)
    opt.step()
    torch.cuda.synchronize()
    expected = torch.tensor(1.0 - 0.25, dtype=torch.bfloat16)  # the first Adam step moves by lr
    for index in (0, 2**31 - 1, 2**31, n - 1):
        assert p[index].item() == expected.item(), index
    assert torch.all(p == expected)
    assert torch.all(opt.state[p]["exp_avg"][-4099:] == opt.state[p]["exp_avg"][0])


# --- norms, clipping, max_grad_norm, LAMB (issue 3) ---------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_on_gpu(backend, norm_type, dtype):
    def params():
        g = torch.Generator().manual_seed(0)
        out = []
        for s in SHAPES + [(1000, 77)] * 3:
            p = torch.zeros(s, dtype=dtype, device="cuda", requires_grad=True)
            p.grad = (torch.randn(s, generator=g) * 3).to(dtype).cuda()
            out.append(p)
        return out

    a, b = params(), params()
    a = [p for p in a if p.numel()]  # torch's inf-norm fails on empty tensors
    b_nonempty = [p for p in b if p.numel()]
    expected = torch.nn.utils.clip_grad_norm_(a, 1.0, norm_type)
    got = fusedopt.clip_grad_norm_(b, 1.0, norm_type, backend=backend)
    tol = tolerance(dtype) if dtype != torch.float32 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got, expected, **tol)
    for p, q in zip(a, b_nonempty):
        torch.testing.assert_close(q.grad, p.grad, **tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_max_grad_norm_on_gpu(backend):
    a = make_params(SHAPES, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ta = torch.optim.AdamW(a, fused=True)
    fb = FusedAdamW(b, backend=backend, max_grad_norm=0.5)
    for step in range(5):
        grads = grads_for(a, step, scale=3.0)
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(a, 0.5)
        ta.step()
        fb.step()
        torch.testing.assert_close(fb.last_grad_norm, norm, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(q.grad, g) for q, g in zip(b, grads))
    assert_same_state(ta, a, fb, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("adam_w_mode,use_nvlamb", [(True, False), (False, True)])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float64, False)])
def test_lamb_on_gpu(backend, adam_w_mode, use_nvlamb, dtype, master):
    kw = dict(lr=1e-2, weight_decay=0.02, adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb, master_weights=master)
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref, opt = fusedopt.FusedLAMB(a, backend="reference", **kw), fusedopt.FusedLAMB(b, backend=backend, **kw)
    run(ref, a, 6, scale=2.0), run(opt, b, 6, scale=2.0)
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


# --- Adafactor, Sophia, and no host synchronisation (issue 4) -----------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float64, False)])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_on_gpu(backend, dtype, master, beta1):
    """Factored tensors (tasks of 32 rows and column programs of 64 columns
    on cuda: row counts and widths that cross them, batched slices, a vocab
    embedding) and 0-d/1-d ones, against the reference."""
    shapes = [(), (7,), (3000,), (300, 200), (2, 50, 3), (33, 1), (1, 70), (3, 65, 130), (50257, 64)]
    a = make_params(shapes, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref = fusedopt.FusedAdafactor(a, backend="reference", master_weights=master, beta1=beta1, weight_decay=0.01)
    opt = fusedopt.FusedAdafactor(b, backend=backend, master_weights=master, beta1=beta1, weight_decay=0.01)
    run(ref, a, 5), run(opt, b, 5)
    # the kernels reduce in another order: masters an ulp apart, and a bf16 param rounded from them one bf16 ulp
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5, param_ulps=1 if master else None)


def test_adafactor_defaults_to_cuda_on_gpu():
    params = make_params([(30, 20)], device="cuda")
    assert fusedopt.FusedAdafactor(params).backend == "cuda"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_adafactor_edge_grads_on_gpu(backend):
    """Unused rows and columns, clamped updates (tiny grads) and a NaN, as
    tests/test_adafactor.py checks on the CPU backends."""
    shapes = [(40, 30), (2, 20, 25), (30, 20)]
    a = make_params(shapes, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref = fusedopt.FusedAdafactor(a, backend="reference", beta1=0.9)
    opt = fusedopt.FusedAdafactor(b, backend=backend, beta1=0.9)
    for step in range(5):
        grads = grads_for(a, step)
        grads[0][:10] = 0.0
        grads[0][:, :4] = 0.0
        if step < 2:
            grads[1] = grads[1] * 1e-9
        if step == 3:
            grads[2][5, 7] = float("nan")
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g, g.clone()
        ref.step(), opt.step()
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_sophia_on_gpu(backend, dtype, master):
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref = fusedopt.FusedSophia(a, backend="reference", lr=1e-2, master_weights=master)
    opt = fusedopt.FusedSophia(b, backend=backend, lr=1e-2, master_weights=master)
    for step in range(6):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.clone()
        if step % 2:
            ref.update_hessian()
            opt.update_hessian()
        ref.step()
        opt.step()
    assert_same_state(ref, a, opt, b, **tolerance(dtype if not master else torch.float32))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lamb", "sophia", "adafactor"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_bf16_states_on_gpu(backend, name, dtype, master):
    """state_dtype=torch.bfloat16 (issue 5): bf16 states equal to the
    reference's (run on the CPU), bit for bit, but Adafactor's: its update
    is scaled by RMS(u), which the kernels sum in another order, so a stored
    state can round one bf16 ulp away, and that ulp stays as the moment
    shrinks: within one bf16 ulp of the tensor's largest value. Masters
    within fp32's tolerance (LAMB's norms), Adafactor's masters and fp32
    params within what such an ulp moves them (6 steps of lr x 2^-7), bf16
    params within one bf16 ulp (a master an ulp from a rounding boundary)."""
    cls = {"adamw": FusedAdamW, "lamb": fusedopt.FusedLAMB, "sophia": fusedopt.FusedSophia,
           "adafactor": fusedopt.FusedAdafactor}[name]
    kw = dict(lr=1e-2, master_weights=master, state_dtype=torch.bfloat16)
    kw.update({"lamb": {"max_grad_norm": None}, "adafactor": {"beta1": 0.9}}.get(name, {}))
    a = make_params(SHAPES, dtype=dtype)
    b = on_gpu(a)
    ref, opt = cls(a, backend="reference", **kw), cls(b, backend=backend, **kw)
    for step in range(6):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.cuda()
        if name == "sophia" and step % 2:
            ref.update_hessian()
            opt.update_hessian()
        ref.step()
        opt.step()
    got, b = on_cpu(opt, b)
    fp32, drift = {"atol": 1e-6, "rtol": 1e-5}, {"atol": 6 * 1e-2 * 2.0**-7, "rtol": 1e-5}  # 6 steps of lr x ulp
    for p, q in zip(a, b):
        if p.numel() == 0:
            continue
        for key, value in ref.state[p].items():
            if key == "master_param":
                torch.testing.assert_close(got.state[q][key], value, **(drift if name == "adafactor" else fp32))
            elif key != "step":
                assert got.state[q][key].dtype == torch.bfloat16
                tol = ({"atol": 2.0**-8 * float(value.abs().max()), "rtol": 2.0**-7} if name == "adafactor"
                       else {"atol": 0, "rtol": 0})
                torch.testing.assert_close(got.state[q][key], value, **tol)
        if master:
            assert_within_ulps(q, p.detach(), 1)
        else:
            torch.testing.assert_close(q, p.detach(), **drift)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_fp8_states_on_gpu(backend, amsgrad, dtype, master):
    """state_dtype=torch.float8_e4m3fn (issue 5): the same FP8 bits and block
    scales as the reference's, on the GPU (the state update is elementwise
    and each block's absmax an exact max, so nothing depends on an order),
    over tensors of many blocks and chunks, with partial last blocks."""
    kw = dict(lr=1e-2, amsgrad=amsgrad, master_weights=master, state_dtype=torch.float8_e4m3fn)
    a = make_params(SHAPES, dtype=dtype)  # the reference on the CPU: see the module's docstring
    b = on_gpu(a)
    ref, opt = FusedAdamW(a, backend="reference", **kw), FusedAdamW(b, backend=backend, **kw)
    run(ref, a, 6), run(opt, b, 6)
    assert_same_fp8_states(ref, a, *on_cpu(opt, b))
    for p, q in zip(a, b):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), **tolerance(dtype))
    # FusedLAMB's moments (its moments and apply kernels)
    a = make_params(SHAPES, dtype=dtype)
    b = on_gpu(a)
    kw = dict(lr=1e-2, master_weights=master, state_dtype=torch.float8_e4m3fn, max_grad_norm=None)
    ref, opt = fusedopt.FusedLAMB(a, backend="reference", **kw), fusedopt.FusedLAMB(b, backend=backend, **kw)
    run(ref, a, 4), run(opt, b, 4)
    assert_same_fp8_states(ref, a, *on_cpu(opt, b))
    # FusedSophia's exp_avg and hessian (its own step and update_hessian kernels)
    a = make_params(SHAPES, dtype=dtype)
    b = on_gpu(a)
    kw = dict(lr=1e-2, master_weights=master, state_dtype=torch.float8_e4m3fn)
    ref, opt = fusedopt.FusedSophia(a, backend="reference", **kw), fusedopt.FusedSophia(b, backend=backend, **kw)
    for step in range(4):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.cuda()
        ref.update_hessian(), opt.update_hessian()
        ref.step(), opt.step()
    assert_same_fp8_states(ref, a, *on_cpu(opt, b))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_adafactor_fp8_exp_avg_on_gpu(backend, dtype, master):
    """FusedAdafactor's block-scaled FP8 first moment, as
    tests/test_fp8_states.py checks it on the CPU (its shapes: blocks across
    rows and slices; its grads: ten decades within a tensor): FP8 codes
    within one step of the CPU reference's in at most 1 in 1000 (the kernels'
    u differs by ulps), scales within 1e-6, params close. (Grads of one
    magnitude over 4 steps amplify a code one step off where the next step
    nearly cancels a moment: on 300x200 one code ends ~100 steps off, on the
    cpu backend too.)"""
    a = make_params(AF_SHAPES, dtype=dtype)
    b = on_gpu(a)
    kw = dict(lr=1e-2, beta1=0.9, weight_decay=0.1, master_weights=master, state_dtype=torch.float8_e4m3fn)
    ref = fusedopt.FusedAdafactor(a, backend="reference", **kw)
    opt = fusedopt.FusedAdafactor(b, backend=backend, **kw)
    for step in range(4):
        for p, q, g in zip(a, b, moment_grads(a, step)):
            p.grad, q.grad = g, g.cuda()
        ref.step(), opt.step()
    assert assert_same_fp8_states(ref, a, *on_cpu(opt, b), exact=False) == len(AF_SHAPES)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 2.0**-7}
    for p, q in zip(a, b):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), **tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lamb", "sophia", "adafactor"])
def test_stochastic_rounding_bits_on_gpu(backend, name):
    """stochastic_rounding=True (issue 5): the kernels draw the reference's
    random bits. On CPU the params agree bit for bit; on a GPU the fp32 value
    being rounded may differ from torch's by an ulp, which moves the rounding
    with probability ~2^-16 per element: allow rare one-ulp differences."""
    cls = {"adamw": FusedAdamW, "lamb": fusedopt.FusedLAMB, "sophia": fusedopt.FusedSophia,
           "adafactor": fusedopt.FusedAdafactor}[name]
    kw = {"lamb": {"max_grad_norm": None}}.get(name, {})
    results = []
    for be in ("reference", backend):
        params = make_params(SHAPES, dtype=torch.bfloat16, device="cuda")
        torch.manual_seed(5)
        opt = cls(params, lr=1e-3, backend=be, stochastic_rounding=True, **kw)
        run(opt, params, 3)
        results.append(params)
    differ = total = 0
    for a, b in zip(*results):
        a, b = a.detach().float(), b.detach().float()
        torch.testing.assert_close(b, a, atol=0, rtol=2.0**-7)  # one bf16 ulp at most
        differ, total = differ + int((a != b).sum()), total + a.numel()
    assert differ <= max(3, total * 1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cast_to_fp8_on_gpu(backend, dtype):
    """cast_to_fp8 (issue 5) equals torch's (x * s).clamp(-max, max).to(dtype) on the GPU, bit for bit."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(70001, generator=g) * 300, torch.randn(300, 513, generator=g).bfloat16(),
          torch.randn(1000, generator=g).half() * 1e-3, torch.empty(0),
          torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)]
    xs = [x.cuda() for x in xs]
    scales = torch.tensor([1.0, 3.0, 1000.0, 1.0, 0.5], device="cuda")
    outs, amax = fusedopt.cast_to_fp8(xs, scales, dtype, backend=backend)
    fmax = torch.finfo(dtype).max
    for x, s, out in zip(xs, scales, outs):
        ref = (x.float() * s).clamp(-fmax, fmax).to(dtype)
        nan = ref.float().isnan()
        assert torch.equal(nan, out.float().isnan())
        assert torch.equal(out.view(torch.uint8)[~nan], ref.view(torch.uint8)[~nan])
    expected = torch.stack([x.float().abs().amax() if x.numel() else torch.zeros((), device="cuda") for x in xs])
    torch.testing.assert_close(amax, expected, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_copies_on_gpu(backend, dtype):
    """FusedAdamW(fp8=...) on the GPU (issue 5): each step's copy is the new
    master cast with the scale from before the step, bit for bit; the history
    and the next scale follow the delayed-scaling rule."""
    recipe = fusedopt.Float8Recipe(dtype, margin=1, amax_history_len=3)
    params = [p.to(torch.bfloat16).detach().requires_grad_() for p in make_params(SHAPES, device="cuda")]
    opt = FusedAdamW(params, lr=1e-2, backend=backend, master_weights=True, fp8=recipe)
    fmax = torch.finfo(dtype).max
    for step in range(4):
        before = [(opt.state[p]["fp8_scale"].clone(), opt.state[p]["fp8_amax_history"].clone())
                  if p in opt.state else None for p in params]
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        for p, old in zip(params, before):
            if old is None or p.numel() == 0:
                continue
            scale, history = old
            w = opt.state[p]["master_param"]
            copy, inv = opt.fp8_weight(p)
            expected = (w * scale).clamp(-fmax, fmax).to(dtype)
            assert torch.equal(copy.view(torch.uint8), expected.view(torch.uint8))
            assert torch.equal(inv, scale.reciprocal())
            new_history = torch.cat([w.abs().amax().reshape(1), history[:-1]])
            assert torch.equal(opt.state[p]["fp8_amax_history"], new_history)
            top = new_history.max()
            assert torch.equal(opt.state[p]["fp8_scale"], torch.full_like(top, fmax) / top / 2)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 matmul needs compute capability 8.9+")
def test_fp8_copies_in_scaled_mm():
    """The example's forward: torch._scaled_mm on FP8 activations and the
    optimizer's FP8 weight copies equals the same product from the dequantized
    FP8 values (fp32 accumulation both), and the example trains with it."""
    from fusedopt._resources import shipped_module

    example = shipped_module("bench", "examples.fp8_linear")
    w = torch.nn.Parameter(torch.randn(128, 64, device="cuda").bfloat16())
    opt = FusedAdamW([w], lr=1e-3, master_weights=True, fp8=fusedopt.Float8Recipe())
    w.grad = torch.randn_like(w)
    opt.step()
    x = torch.randn(256, 64, device="cuda").bfloat16()
    fast = example.fp8_matmul(x, *opt.fp8_weight(w), use_scaled_mm=True)
    slow = example.fp8_matmul(x, *opt.fp8_weight(w), use_scaled_mm=False)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2**-7, atol=1e-2)
    losses = example.train(steps=150, device="cuda", log=None)
    assert losses[-1] < 0.3 * losses[0]


OPTIMIZERS = {
    "adamw": lambda ps, be: FusedAdamW(ps, backend=be, max_grad_norm=1.0, lr=torch.tensor(1e-3, device="cuda"),
                                       capturable=True),
    "lamb": lambda ps, be: fusedopt.FusedLAMB(ps, backend=be),
    "adafactor": lambda ps, be: fusedopt.FusedAdafactor(ps, backend=be),
    "sophia": lambda ps, be: fusedopt.FusedSophia(ps, backend=be),
}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_never_waits_on_the_host(backend, name):
    """After a warm-up step (tables built and cached), a step makes no
    synchronising CUDA call: torch's sync debug mode turns one into an error."""
    params = make_params([(300, 200), (77,), (5, 4, 3)], device="cuda")
    opt = OPTIMIZERS[name](params, backend)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_remainders_on_gpu(backend):
    """master_weights="remainder" on the GPU kernels of every FusedOptimizer:
    the masters of master_weights=True bit for bit (tests/test_remainder.py
    holds the CPU, interpreted and emulated runs to the same)."""
    from optim_db import optimizers

    for name, (cls, kwargs) in optimizers(lr=1e-2, fused=True).items():
        params = on_gpu(make_params([(70001,), (300, 513), (7,)], torch.bfloat16))
        ref = [p.detach().clone().requires_grad_() for p in params]
        opt = cls(params, backend=backend, master_weights="remainder", **kwargs)
        opt_ref = cls(ref, backend=backend, master_weights=True, **kwargs)
        run(opt, params, 4)
        run(opt_ref, ref, 4)
        for p, q in zip(params, ref):
            assert torch.equal(opt.master_param(p).view(torch.int32),
                               opt_ref.state[q]["master_param"].view(torch.int32)), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_step_on_gpu(backend, mode):
    """A whole training step under torch.compile (inductor; reduce-overhead:
    CUDA graphs) with a tensor lr a scheduler moves: every optimizer's
    launches are traced as fusedopt_traced ops (the step is in the graph),
    the eager result, no recompilation after the second step."""
    from optim_db import optimizers
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor(gm, example_inputs):  # mode="reduce-overhead" is inductor with triton.cudagraphs
        graphs.append(gm)
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": mode == "reduce-overhead"})

    for name, (cls, kwargs) in optimizers(lr=1e-2, fused=True).items():
        torch._dynamo.reset()
        graphs.clear()
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).cuda()
            opt = cls(model.parameters(), backend=backend, **dict(kwargs, lr=torch.tensor(1e-2, device="cuda")))
            runs.append((model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)))

        def train_step(model, opt, x):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss

        x = torch.randn(32, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        for model, opt, _ in runs:  # states created eagerly (the first step is never traced)
            train_step(model, opt, x)
        compiled = torch.compile(train_step, backend=inductor)
        frames = []
        for _ in range(5):
            for (model, opt, sched), step in zip(runs, (compiled, train_step)):
                step(model, opt, x)
                sched.step()
            frames.append(len(graphs))
        torch.cuda.synchronize()
        assert frames[1] == frames[-1], (name, frames)
        ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
        assert any(op.startswith(f"fusedopt_traced.{backend}_") for op in ops), (name, ops)
        (model, opt, _), (ref_model, ref_opt, _) = runs
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
