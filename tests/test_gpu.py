"""GPU tests: the cuda and triton backends for real, CUDA-graph capture, and
tensors past 2^31 elements. Skipped (with the reason) where there is no GPU;
run them with `pytest -m gpu tests` or bench/gpu.sh on a GPU machine."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, grads_for, make_params, run

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
    def train(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
        opt = make_opt(model.parameters())
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=2)
        x = torch.randn(16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        for step in range(6):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            if step == 2:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return model, opt

    tm, to = train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True))
    fm, fo = train(lambda ps: FusedAdamW(ps, lr=1e-2, backend=backend))
    assert_same_state(to, list(tm.parameters()), fo, list(fm.parameters()), atol=1e-6, rtol=1e-5)
    assert fo.state[next(fm.parameters())]["step"].item() == 5


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
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


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
    """state_dtype=torch.bfloat16 (issue 5): states in bf16 within one bf16
    rounding of the reference's (on CPU they agree bit for bit; a GPU's
    reductions may sum in another order), params within what such a
    rounding moves them."""
    cls = {"adamw": FusedAdamW, "lamb": fusedopt.FusedLAMB, "sophia": fusedopt.FusedSophia,
           "adafactor": fusedopt.FusedAdafactor}[name]
    kw = dict(lr=1e-2, master_weights=master, state_dtype=torch.bfloat16)
    kw.update({"lamb": {"max_grad_norm": None}, "adafactor": {"beta1": 0.9}}.get(name, {}))
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref, opt = cls(a, backend="reference", **kw), cls(b, backend=backend, **kw)
    for step in range(6):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.clone()
        if name == "sophia" and step % 2:
            ref.update_hessian()
            opt.update_hessian()
        ref.step()
        opt.step()
    for p, q in zip(a, b):
        if p.numel() == 0:
            continue
        for key, value in ref.state[p].items():
            if key not in ("step", "master_param"):
                assert opt.state[q][key].dtype == torch.bfloat16
                torch.testing.assert_close(opt.state[q][key], value, atol=1e-30, rtol=2.0**-7)
        torch.testing.assert_close(q.detach(), p.detach(), atol=6 * 1e-2 * 2.0**-7, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_fp8_states_on_gpu(backend, amsgrad, dtype, master):
    """state_dtype=torch.float8_e4m3fn (issue 5): the same FP8 bits and block
    scales as the reference's, on the GPU (the state update is elementwise
    and each block's absmax an exact max, so nothing depends on an order),
    over tensors of many blocks and chunks, with partial last blocks."""
    kw = dict(lr=1e-2, amsgrad=amsgrad, master_weights=master, state_dtype=torch.float8_e4m3fn)
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    ref, opt = FusedAdamW(a, backend="reference", **kw), FusedAdamW(b, backend=backend, **kw)
    run(ref, a, 6), run(opt, b, 6)
    _same_fp8_states(ref, a, opt, b)
    for p, q in zip(a, b):
        torch.testing.assert_close(q.detach(), p.detach(), **tolerance(dtype))
    # FusedLAMB's moments (its moments and apply kernels)
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, master_weights=master, state_dtype=torch.float8_e4m3fn, max_grad_norm=None)
    ref, opt = fusedopt.FusedLAMB(a, backend="reference", **kw), fusedopt.FusedLAMB(b, backend=backend, **kw)
    run(ref, a, 4), run(opt, b, 4)
    _same_fp8_states(ref, a, opt, b)
    # FusedSophia's exp_avg and hessian (its own step and update_hessian kernels)
    a = make_params(SHAPES, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, master_weights=master, state_dtype=torch.float8_e4m3fn)
    ref, opt = fusedopt.FusedSophia(a, backend="reference", **kw), fusedopt.FusedSophia(b, backend=backend, **kw)
    for step in range(4):
        for p, q, g in zip(a, b, grads_for(a, step)):
            p.grad, q.grad = g, g.clone()
        ref.update_hessian(), opt.update_hessian()
        ref.step(), opt.step()
    _same_fp8_states(ref, a, opt, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_adafactor_fp8_exp_avg_on_gpu(backend, dtype, master):
    """FusedAdafactor's block-scaled FP8 first moment: blocks across rows and
    slices, FP8 codes within one step of the reference's (the kernels' u
    differs by ulps, see tests/test_fp8_states.py) and scales within 1e-6."""
    shapes = [(), (7,), (3000,), (300, 200), (2, 50, 3), (1, 700)]
    a = make_params(shapes, dtype=dtype, device="cuda")
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, beta1=0.9, master_weights=master, state_dtype=torch.float8_e4m3fn)
    ref = fusedopt.FusedAdafactor(a, backend="reference", **kw)
    opt = fusedopt.FusedAdafactor(b, backend=backend, **kw)
    run(ref, a, 4), run(opt, b, 4)
    for p, q in zip(a, b):
        for key, value in ref.state[p].items():
            got = opt.state[q][key]
            if value.dtype == torch.float8_e4m3fn:
                step = (got.view(torch.uint8).int() - value.view(torch.uint8).int()).abs()
                assert bool((step <= 1).all()) and step.sum() <= max(1, value.numel() // 1000), key
            elif key.endswith("_scale"):
                torch.testing.assert_close(got, value, atol=0, rtol=1e-6)
        torch.testing.assert_close(q.detach(), p.detach(), **tolerance(torch.float32 if master else dtype))


def _same_fp8_states(ref, a, opt, b):
    for p, q in zip(a, b):
        for key, value in ref.state[p].items():
            got = opt.state[q][key]
            if value.dtype == torch.float8_e4m3fn:
                assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key
            elif key.endswith("_scale"):
                assert torch.equal(got, value), key


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
