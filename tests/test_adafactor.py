"""FusedAdafactor: the reference against torch.optim.Adafactor (bit for bit),
every backend that runs here against the reference."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from helpers import assert_same_state, assert_within_ulps, cross_on_triton, grads_for, run, state_tensors, tolerance

from fusedopt import FusedAdafactor
from fusedopt.reference import fp8_states


# 0-d, 1-d, 2-d, batched 3-d, dims of size 1, sizes that cross the test chunk and tile sizes
SHAPES = [(), (7,), (300,), (30, 20), (2, 5, 3), (33, 1), (1, 17), (3, 2, 1, 9), (0,), (0, 4)]
CONFIGS = {
    "defaults": {},
    "lr_decay": {"lr": 3e-2, "weight_decay": 0.1},
    "d_eps": {"d": 2.0, "eps": (1e-20, 1e-2), "beta2_decay": -0.5},
    "maximize": {"maximize": True, "lr": 1e-3},
}


def make(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def nonempty(params):
    return [p for p in params if p.numel()]


@pytest.mark.parametrize("config", CONFIGS)
def test_reference_equals_torch(config):
    """The spec is torch's single-tensor Adafactor: the same bits (torch
    divides by zero on empty tensors, so they are left out on its side)."""
    kw = CONFIGS[config]
    a, b = nonempty(make()), nonempty(make())
    ta, fb = torch.optim.Adafactor(a, **kw), FusedAdafactor(b, backend="reference", **kw)
    run(ta, a, 6), run(fb, b, 6)
    assert_same_state(ta, a, fb, b)


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("config", list(CONFIGS) + ["beta1"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.bfloat16, True)])
def test_backend_matches_reference(backend, config, dtype, master):
    # the configs are runtime scalars and the dtypes compile-time switches of the same kernels
    cross_on_triton(backend, dtype == torch.float32 and not master or config in ("defaults", "beta1"),
                    "every config in fp32, defaults and beta1 in every dtype")
    kw = CONFIGS.get(config, {"beta1": 0.9, "weight_decay": 0.01})
    a, b = make(dtype=dtype), make(dtype=dtype)
    ref = FusedAdafactor(a, backend="reference", master_weights=master, **kw)
    opt = FusedAdafactor(b, backend=backend, master_weights=master, **kw)
    assert opt.backend == backend
    run(ref, a, 5), run(opt, b, 5)
    if dtype == torch.bfloat16 and not master:  # each param within an ulp (the sums' order moves the scale)
        for pa, pb in zip(a, b):
            assert_within_ulps(pa, pb, 1)
    assert_same_state(ref, a, opt, b, **tolerance(dtype, master))  # fp64: an fp32-rounded scalar anywhere shows


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
def test_unused_rows_clamped_updates_and_nan(backend):
    """Grads that test the shortcuts of the kernels' sum(u*u) (the cpu
    backend forms it from row and column partials unless an element is
    clamped or a statistic is not finite): rows and columns that never get a
    grad (an embedding's unused tokens), grads so small that u is clamped
    (variance below eps1^2), and a NaN, against the reference."""
    shapes = [(40, 30), (2, 20, 25), (30, 20)]
    a, b = make(shapes), make(shapes)
    ref, opt = FusedAdafactor(a, backend="reference", beta1=0.9), FusedAdafactor(b, backend=backend, beta1=0.9)
    for step in range(5):
        grads = grads_for(a, step)
        grads[0][:10] = 0.0  # unused rows
        grads[0][:, :4] = 0.0  # and columns
        if step < 2:
            grads[1] = grads[1] * 1e-9  # var_est ~1e-18 < eps1^2: every element clamped
        grads[1][1, 3] *= 1e-12  # one slice with a row that stays tiny
        if step == 3:
            grads[2][5, 7] = float("nan")
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g, g.clone()
        ref.step(), opt.step()
    assert b[2].isnan().all() and not b[0].isnan().any() and not b[1].isnan().any()
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_interleaved_optimizers_give_the_bits_of_each_alone(backend):
    """Scratch reused from launch to launch (the cpu backend keeps its
    per-row and per-column arrays per thread; the others allocate theirs per
    launch) carries nothing over: two optimizers of different sizes stepped
    in turn, one with a clamped slice and a NaN, give the bits each gives alone."""
    big, small = [(70, 130), (3, 33, 65), (5,)], [(9, 4), (2, 3, 7)]

    def grads(params, step):
        gs = grads_for(params, step)
        if len(params) == 2:
            gs[1][1] *= 1e-12  # a slice whose u is clamped: the element-wise sum of u*u
            if step == 2:
                gs[0][3, 1] = float("nan")
        return gs

    def steps(opts_params, n=3):
        for step in range(n):
            for opt, params in opts_params:
                for p, g in zip(params, grads(params, step)):
                    p.grad = g
                opt.step()

    alone = []
    for shapes in (big, small):
        params = make(shapes)
        steps([(FusedAdafactor(params, backend=backend, beta1=0.9), params)])
        alone.append(params)
    pb, ps = make(big), make(small)
    steps([(FusedAdafactor(pb, backend=backend, beta1=0.9), pb), (FusedAdafactor(ps, backend=backend, beta1=0.9), ps)])
    for want, got in zip(alone[0] + alone[1], pb + ps):
        assert torch.equal(want.isnan(), got.isnan()) and torch.equal(want.nan_to_num(), got.nan_to_num())
    assert ps[0].isnan().all() and not pb[0].isnan().any()


@pytest.mark.parametrize("backend", backend_params([b for b in KERNEL_BACKENDS if b != "triton"]))
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_tall_and_wide_matrices(backend, beta1):
    """Rows and columns past the cuda kernels' tasks (32 rows) and column
    programs (64 columns), batched slices, one long row, and bf16 params with
    master weights, against the reference."""
    shapes = [(70, 130), (3, 33, 65), (1, 300), (65, 2)]
    for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
        a, b = make(shapes, dtype=dtype), make(shapes, dtype=dtype)
        ref = FusedAdafactor(a, backend="reference", beta1=beta1, master_weights=master)
        opt = FusedAdafactor(b, backend=backend, beta1=beta1, master_weights=master)
        run(ref, a, 3), run(opt, b, 3)
        assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_state_dict_from_torch_and_back(backend):
    """Same state keys and shapes as torch: a torch state_dict loads and the
    run continues as torch's would, and the other way round."""
    params = nonempty(make())
    torch_opt = torch.optim.Adafactor(params, lr=2e-2)
    run(torch_opt, params, 3)
    buffer = io.BytesIO()
    torch.save(torch_opt.state_dict(), buffer)
    buffer.seek(0)
    ours_params = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedAdafactor(ours_params, lr=2e-2, backend=backend)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    assert {k: tuple(v.shape) for k, v in ours.state[ours_params[3]].items()} == \
        {k: tuple(v.shape) for k, v in torch_opt.state[params[3]].items()}
    run(torch_opt, params, 3, start=3), run(ours, ours_params, 3, start=3)
    assert_same_state(torch_opt, params, ours, ours_params, atol=1e-6, rtol=1e-5)

    back = [p.detach().clone().requires_grad_() for p in ours_params]
    torch_again = torch.optim.Adafactor(back, lr=2e-2)
    torch_again.load_state_dict(copy.deepcopy(ours.state_dict()))  # load_state_dict keeps references
    run(torch_again, back, 2, start=6), run(ours, ours_params, 2, start=6)
    assert_same_state(torch_again, back, ours, ours_params, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_tensors_are_skipped(backend):
    params = make([(0,), (4, 0), (5, 3)])
    opt = FusedAdafactor(params, backend=backend)
    run(opt, params, 2)
    assert opt.state[params[0]]["step"].item() == 2 and opt.state[params[0]]["variance"].numel() == 0
    assert opt.state[params[1]]["row_var"].shape == (4, 1) and opt.state[params[1]]["col_var"].shape == (1, 0)
    assert torch.isfinite(params[2]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_params(backend):
    a = [torch.randn(12, 7).t().contiguous().requires_grad_(), torch.randn(6, 10).requires_grad_()]
    b = [a[0].detach().t().contiguous().t().requires_grad_(), torch.zeros(6, 20)[:, ::2].copy_(a[1].detach())]
    b[1].requires_grad_()
    assert not b[0].is_contiguous() and not b[1].is_contiguous()
    ref, opt = FusedAdafactor(a, backend="reference"), FusedAdafactor(b, backend=backend)
    run(ref, a, 3), run(opt, b, 3)
    assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("state_dtype", [None, torch.float8_e4m3fn])
def test_beta1_reference_against_literal_first_moment(state_dtype):
    """beta1 as the authors' tensor2tensor code and HF transformers keep it:
    the steps themselves are averaged, m = lerp(m, alpha * u / denom, 1 - beta1),
    p -= m, with u, denom and alpha as torch's Adafactor forms them. lr
    changes every step, so an m that applied today's alpha to past updates
    would differ. With state_dtype=FP8, m is stored block-scaled
    (reference/fp8_states.py) and p moves by m as stored."""
    fp8 = state_dtype is not None
    p = make([(60, 9)])[0] if fp8 else make([(6, 5)])[0]  # FP8: 540 elements, three 256-element blocks
    n = p.numel()
    opt = FusedAdafactor([p], backend="reference", beta1=0.8, lr=1e-2, state_dtype=state_dtype)
    x = p.detach().clone()
    row, col, m = torch.zeros(p.shape[0], 1), torch.zeros(1, p.shape[1]), torch.zeros(p.shape)
    eps1, eps2 = torch.finfo(torch.float32).eps, 1e-3
    for step in range(1, 6):
        lr = 1e-2 / step  # a schedule
        opt.param_groups[0]["lr"] = lr
        g = grads_for([p], step)[0]
        p.grad = g
        opt.step()
        w = step ** -0.8
        alpha = max(eps2, (x.norm() / n ** 0.5).item()) * min(lr, step ** -0.5)
        row.lerp_((g * g).mean(-1, keepdim=True), w)
        col.lerp_((g * g).mean(-2, keepdim=True), w)
        u = (row @ col / row.mean().clamp(min=eps1)).clamp(min=eps1 * eps1).rsqrt() * g
        denom = max(1.0, (u.norm() / n ** 0.5).item())
        m.lerp_(alpha * u / denom, 0.2)
        if fp8:
            m = fp8_states.decode("exp_avg", *fp8_states.encode("exp_avg", m))
        x = x - m
    state = opt.state[p]
    torch.testing.assert_close(p.detach(), x, atol=1e-6, rtol=1e-5)
    if fp8:
        assert state["exp_avg"].dtype == torch.float8_e4m3fn and state["row_var"].dtype == torch.float32
        assert (state["exp_avg"].float() != 0).float().mean() > 0.9  # not underflowed
        torch.testing.assert_close(fp8_states.decode("exp_avg", state["exp_avg"], state["exp_avg_scale"]), m,
                                   atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(state["exp_avg"], m, atol=1e-6, rtol=1e-5)


def test_bad_arguments_like_torch():
    params = make([(3, 2)])
    for kw in [{"lr": -1.0}, {"beta2_decay": 0.5}, {"eps": (-1.0, 1e-3)}, {"eps": (None, -1.0)}, {"d": 0.5},
               {"weight_decay": -0.1}]:
        with pytest.raises(ValueError) as expected:
            torch.optim.Adafactor(params, **kw)
        with pytest.raises(ValueError) as ours:
            FusedAdafactor(params, **kw)
        assert str(ours.value) == str(expected.value)
    with pytest.raises(ValueError, match="beta1"):
        FusedAdafactor(params, beta1=1.0)


def test_cuda_task_layout_covers_every_row_and_column():
    """The work lists the cuda backend's factored kernels walk
    (_adafactor_tables.factored_tasks, read by AdafactorLayout in adafactor.h): every
    row of every batch slice in exactly one task of at most TASK_ROWS rows,
    a task's column sums in their own C slots, every column of every slice in
    one column program, and the per-tensor and per-slice ranges consistent."""
    from fusedopt.backends import _adafactor_tables

    shapes = [torch.Size(s) for s in [(70, 5), (2, 3, 33), (1, 200), (65, 1), (2, 2, 40, 3)]]
    layout = _adafactor_tables.factored_tasks(shapes, torch.device("cpu"))
    n, nt, ns, nc = len(shapes), layout.n_tasks, layout.n_slices, layout.n_col_programs
    sizes = [n, n, n, n + 1, nt, nt, nt, nt, ns, ns, ns + 1, nc, nc]
    assert layout.packed.numel() == sum(sizes)
    parts = dict(zip(_adafactor_tables.FACTORED_TASK_PARTS, (x.tolist() for x in layout.packed.split(sizes))))
    slots = set()
    for t, shape in enumerate(shapes):
        R, C, B = shape[-2], shape[-1], shape[:-2].numel()
        assert (parts["rows"][t], parts["cols"][t]) == (R, C)
        slices = range(parts["slice_first"][t], parts["slice_first"][t] + B)
        assert [parts["slice_tensor"][s] for s in slices] == [t] * B
        assert [parts["slice_batch"][s] for s in slices] == list(range(B))
        assert parts["task_first"][t] == parts["slice_task_first"][slices[0]]
        assert parts["task_first"][t + 1] == parts["slice_task_first"][slices[-1] + 1]
        for s in slices:
            covered = []
            for k in range(parts["slice_task_first"][s], parts["slice_task_first"][s + 1]):
                assert parts["task_slice"][k] == s and 1 <= parts["task_rows"][k] <= _adafactor_tables.TASK_ROWS
                covered += range(parts["task_row0"][k], parts["task_row0"][k] + parts["task_rows"][k])
                slots |= set(range(parts["task_col"][k], parts["task_col"][k] + C))
            assert covered == list(range(R))
            col0 = [c for s2, c in zip(parts["colprog_slice"], parts["colprog_col0"]) if s2 == s]
            assert col0 == list(range(0, C, _adafactor_tables.COL_BLOCK))
    assert slots == set(range(layout.col_total))
    assert ns == sum(s[:-2].numel() for s in shapes)



# matrices larger than one of the cpu backend's waves (about 8 MB of g and p) between small ones
WAVE_SHAPES = [(30, 20), (1100, 1000), (40, 30), (2, 20, 25), (7,), (1024, 1100), (9, 4)]


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_launch_in_waves(backend, beta1, dtype, master):
    """The cpu backend takes a launch's matrices in waves of about 8 MB of g
    and p, every pass over one wave before the next (csrc/cpu/adafactor.cpp):
    matrices larger than a wave between small ones, a clamped slice (its
    sum(u*u) element by element) and a NaN in different waves, against the
    reference; fp32, and bf16 params with fp32 masters (6 bytes of g and
    master per element: other waves). (FP8 exp_avg, updated by chunks of a
    wave: test_fp8_states.py.)"""
    a, b = make(WAVE_SHAPES, dtype=dtype), make(WAVE_SHAPES, dtype=dtype)
    kw = {"beta1": beta1, "master_weights": master}
    ref, opt = FusedAdafactor(a, backend="reference", **kw), FusedAdafactor(b, backend=backend, **kw)
    for step in range(3):
        grads = grads_for(a, step)
        grads[3][1] *= 1e-12  # a clamped slice, in the wave after the first large matrix
        if step == 1:
            grads[6][2, 3] = float("nan")  # the last wave's only matrix
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g, g.clone()
        ref.step(), opt.step()
    assert b[6].isnan().all() and not any(q.isnan().any() for q in b[:6])
    if not master:
        assert_same_state(ref, a, opt, b, atol=1e-6, rtol=1e-5)
        return
    # The reference's fp32 sums over 1.1M elements put its scale ~1.2e-5 from the exact one
    # (test_fp8_states.py::test_adafactor_fp8_exp_avg_in_waves), and bf16's eps1 = 2^-7 leaves
    # steps of up to ~0.05 here: masters (and every state) within 4e-6 of the reference's (the
    # same before the waves), and each bf16 param its own master rounded to nearest (a param
    # near a rounding boundary or near 0 may round otherwise than the reference's).
    for pb in b:
        assert_within_ulps(pb.detach(), opt.state[pb]["master_param"].to(dtype), 0)
    sa, sb = state_tensors(ref, a), state_tensors(opt, b)
    assert sa.keys() == sb.keys() and sum(k[1] == "master_param" for k in sa) == len(a)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=4e-6, rtol=1e-5, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")
