"""Builders and comparisons shared by the tests."""
from __future__ import annotations

import torch

# Shapes that catch indexing bugs: empty, 0-d, size 1, odd, crossing the test
# chunk sizes (100 for cpu, 256/64 for triton), 2-D.
SHAPES = [(0,), (), (1,), (7,), (3, 5), (257,), (13, 70), (2, 0, 3)]


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() for s in shapes]


def many(backend, n):
    """How many tensors a many-tensor test gives `backend`: n, but a third of
    it to triton, whose interpreter runs each program in Python (~30 s for
    300 tensors). Its pointer tables have no size limit, and they are built by
    the same Python (fusedopt/backends/_tables.py) as the other backends',
    which take all n."""
    return n // 3 if backend == "triton" else n


def cross_on_triton(backend, keep: bool, why: str) -> None:
    """Skip a case of a cross product on triton unless `keep`. Its interpreter
    runs each program in Python (5-9 s a case against well under one on the
    compiled backends), so there a cross product keeps the cases that reach
    each of its code paths and leaves the rest to the compiled backends,
    which take every case. `why`: which cases it keeps."""
    if backend == "triton" and not keep:
        import pytest
        pytest.skip(f"triton interpreter: {why}; the compiled backends take this case")


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def grads_for(params, step, seed=1, scale=1.0):
    """Deterministic grads for `step`, in each param's dtype."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return [(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype).to(p.device) for p in params]


def run(opt, params, steps, seed=1, scale=1.0, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, grads_for(params, step, seed, scale)):
            p.grad = g
        opt.step()
    return params


def beside_torch_adamw(opt, params, steps, grads=grads_for, round_state=None, **kwargs):
    """Steps `opt` over `params` and torch.optim.AdamW (`kwargs`, foreach=False)
    over fp32 copies of them, both fed grads(params, step) (torch's cast to
    fp32). round_state(key, tensor) -> tensor: what torch's moments are
    replaced by after each step (the storage a state_dtype applies). Returns
    the fp32 params and torch's optimizer."""
    fp32 = [p.detach().to(torch.float32, copy=True).requires_grad_() for p in params]
    ref = torch.optim.AdamW(fp32, foreach=False, **kwargs)
    for step in range(steps):
        for p, q, g in zip(params, fp32, grads(params, step)):
            p.grad, q.grad = g, g.to(torch.float32, copy=True)
        opt.step()
        ref.step()
        for q in fp32 if round_state is not None else ():
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in ref.state[q]:
                    ref.state[q][key].copy_(round_state(key, ref.state[q][key]))
    return fp32, ref


def train_with_grad_scaler(make_opt, steps=6, spoil=(3, float("inf")), loss_scale=1.0, step=None):
    """A small MLP trained `steps` steps under torch.amp.GradScaler (CPU), one
    grad element set to spoil[1] at step spoil[0] (a step the scaler skips).
    step(scaler, opt, model) replaces scaler.step(opt) (to unscale and clip
    first, or look at the grads). Returns the model, the optimizer and the
    params after each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    snapshots = []
    for i in range(steps):
        opt.zero_grad()
        scaler.scale(model(x).square().mean() * loss_scale).backward()
        if i == spoil[0]:
            model[0].weight.grad[0, 0] = spoil[1]
        if step is None:
            scaler.step(opt)
        else:
            step(scaler, opt, model)
        scaler.update()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return model, opt, snapshots


def assert_step_refused(opt, params, error, match, grads=None):
    """opt.step() with `grads` (grads_for(params, 1) if None) raises `error`
    matching `match`, and no param or state tensor has changed, bit for bit."""
    import pytest

    before = [bits(p.detach()).clone() for p in params]
    states_before = {k: bits(v).clone() for k, v in state_tensors(opt, params).items()}
    for p, g in zip(params, grads_for(params, 1) if grads is None else grads):
        p.grad = g
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(bits(p.detach()), b) for p, b in zip(params, before))
    after = {k: bits(v) for k, v in state_tensors(opt, params).items()}
    assert after.keys() == states_before.keys()
    assert all(torch.equal(v, states_before[k]) for k, v in after.items())


def state_tensors(opt, params):
    """{(index, key): tensor} for every state tensor of every param."""
    out = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                out[(i, k)] = v
    return out


def assert_same_state(a_opt, a_params, b_opt, b_params, *, atol=0.0, rtol=0.0, keys=None, param_ulps=None):
    """Params and every state tensor equal (both ways: same keys). With
    param_ulps, params of a 16-bit dtype may be that many ulps apart instead
    (a param rounded from an fp32 master an ulp from a rounding boundary)."""
    for pa, pb in zip(a_params, b_params):
        if param_ulps is not None and pa.element_size() == 2:
            assert_within_ulps(pa.detach(), pb.detach(), param_ulps)
        else:
            torch.testing.assert_close(pa.detach(), pb.detach(), atol=atol, rtol=rtol, equal_nan=True)
    sa, sb = state_tensors(a_opt, a_params), state_tensors(b_opt, b_params)
    if keys is not None:
        sa = {k: v for k, v in sa.items() if k[1] in keys}
        sb = {k: v for k, v in sb.items() if k[1] in keys}
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].to(sb[k].device), sb[k], atol=atol, rtol=rtol, equal_nan=True,
                                   check_dtype=True, msg=lambda m, k=k: f"state {k}: {m}")


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bits as integers of its width: torch.equal on them compares
    bit for bit (NaN with its payload equals itself, -0 differs from +0;
    FP8 tensors have no comparison of their own)."""
    return t.detach().view(_INT_OF_WIDTH[t.element_size()])


_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
         torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)}


def ulps_apart(a, b):
    """Elementwise count of representable values between a and b (same dtype):
    0 where equal (+0 and -0 alike, NaN and NaN alike), 1 for neighbours."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    int_dtype, magnitude = _BITS[a.dtype]

    def ordered(x):  # sign-magnitude bits -> integers in the floats' order
        i = x.detach().contiguous().view(int_dtype).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)

    distance = (ordered(a) - ordered(b)).abs()
    return torch.where(a.isnan() & b.isnan(), 0, distance)


def assert_within_ulps(a, b, n):
    far = ulps_apart(a, b)
    worst = far.max().item() if far.numel() else 0
    assert worst <= n, f"{(far > n).sum().item()} elements more than {n} ulps apart (max {worst})"


def ulp(dtype):
    return {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.float64: 2.0**-52}[dtype]


#: a few fp32 ulps: kernels round sqrt correctly where torch's vectorised CPU sqrt may be an ulp off, and
#: form the bias corrections in double (torch: Python floats, the same up to an fp64 ulp)
FP32_TOL = {"atol": 1e-6, "rtol": 1e-5}


def tolerance(dtype, master=False):
    """The one rule for a kernel backend's steps against the reference's (or
    torch's) on the same params, after a few steps. fp64 params get fp64 math
    on every backend, hyperparameters and norms included: only the order of
    sums differs. fp32 params, and 16-bit ones with fp32 masters: FP32_TOL.
    16-bit params without masters: a few ulps of their dtype (one rounding
    may land on the other side)."""
    if dtype == torch.float64:
        return {"atol": 1e-13, "rtol": 1e-12}
    if dtype == torch.float32 or master:
        return FP32_TOL
    return {"atol": 4 * ulp(dtype), "rtol": 2 * ulp(dtype)}
