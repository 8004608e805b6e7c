"""FusedAdamW(fp8=Float8Recipe(...)): the FP8 weight copies written in the step.

Every step on every backend is checked against the delayed-scaling rule, written
out here independently of fusedopt.fp8: the copy is the new fp32 weight cast
with the scale from before the step (bit for bit, torch's cast), scale_inv is
its inverse, the new weight's absmax joins the history and the next scale is
fp8_max / max(history) / 2**margin. The weights themselves are unchanged by the
recipe (the same bits as without it), and the reference's equal torch's AdamW.
"""
from __future__ import annotations

import io

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from helpers import SHAPES, bits, grads_for, make_params, many

from fusedopt import Float8Recipe, FusedAdamW
from fusedopt._resources import shipped_module

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def spec_cast(w: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """saturate(w * scale) in `dtype`, as torch computes it."""
    return (w.float() * scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)


def spec_scale(history: torch.Tensor, old: torch.Tensor, dtype, margin: int) -> torch.Tensor:
    amax = history.max()
    if not (amax > 0 and torch.isfinite(amax)):
        return old.clone()
    scale = (torch.tensor(FP8_MAX[dtype], dtype=torch.float32) / amax) / (2.0**margin)
    return scale.clamp(max=torch.finfo(torch.float32).max)  # a tiny amax overflows: FLT_MAX, as Transformer Engine


@pytest.mark.parametrize("backend", backend_params())
def test_tiny_weights_get_a_finite_scale(backend):
    """max|w| below fp8_max / FLT_MAX would make fp8_max / amax inf, the copies of
    zeros 0 * inf = NaN and scale_inv 0: the scale stops at FLT_MAX."""
    p = torch.tensor([1e-37, 0.0, -1e-37, 5e-38], requires_grad=True)
    opt = FusedAdamW([p], lr=0.0, backend=backend, fp8=Float8Recipe())
    for _ in range(2):
        p.grad = torch.zeros(4)
        opt.step()
    copy, scale_inv = opt.fp8_weight(p)
    assert opt.state[p]["fp8_scale"].item() == torch.finfo(torch.float32).max
    assert not copy.float().isnan().any() and scale_inv.item() > 0
    assert copy.float()[1] == 0 and copy.float()[0] > 0 > copy.float()[2]


def weight(opt, p):
    """The fp32 weight the copy is cast from."""
    return opt.state[p]["master_param"] if "master_param" in opt.state[p] else p.detach()


def fp8_state(opt, p):
    s = opt.state[p]
    return {k: s[k].clone() for k in ("fp8_weight", "fp8_scale", "fp8_scale_inv", "fp8_amax_history")}


def make(dtype, shapes=SHAPES, seed=0):
    params = make_params(shapes, torch.float32, seed)
    return [p.detach().to(dtype).requires_grad_() for p in params]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_copies_follow_delayed_scaling(backend, fmt, param_dtype):
    recipe = Float8Recipe(fmt, margin=1, amax_history_len=3)
    params = make(param_dtype)
    opt = FusedAdamW(params, lr=0.05, weight_decay=0.1, backend=backend,
                     master_weights=param_dtype != torch.float32, fp8=recipe)
    before = None
    for step in range(5):  # more steps than the history is long: values roll out
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        for i, p in enumerate(params):
            s = fp8_state(opt, p)
            w = weight(opt, p)
            assert s["fp8_weight"].dtype == fmt and s["fp8_weight"].shape == p.shape
            if before is None:  # created from w_0 inside the first step: check the invariants only
                assert s["fp8_amax_history"].shape == (3,)
                continue
            old = before[i]
            amax = w.abs().max() if w.numel() else torch.zeros(())
            history = torch.cat([amax.reshape(1), old["fp8_amax_history"][:-1]])
            assert torch.equal(bits(s["fp8_weight"]), bits(spec_cast(w, old["fp8_scale"], fmt))), (step, i)
            assert torch.equal(s["fp8_scale_inv"], old["fp8_scale"].reciprocal())
            assert torch.equal(s["fp8_amax_history"], history)
            assert torch.equal(s["fp8_scale"], spec_scale(history, old["fp8_scale"], fmt, 1))
        before = [fp8_state(opt, p) for p in params]


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_and_many_tensors(backend):
    """Transposed (non-contiguous) fp32 params and more tensors than one
    launch table holds: each copy is its weight cast with the old scale, in
    the param's own layout."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(9, 5, generator=g).t().requires_grad_() for _ in range(3)]
    params += [torch.randn(n % 7 + 1, generator=g).requires_grad_() for n in range(many(backend, 300))]
    opt = FusedAdamW(params, lr=0.05, backend=backend, fp8=Float8Recipe())
    for step in range(2):
        scales = [opt.state[p]["fp8_scale"].clone() if p in opt.state else None for p in params]
        for p, grad in zip(params, grads_for(params, step)):
            p.grad = grad
        opt.step()
    for p, scale in zip(params, scales):
        copy, inv = opt.fp8_weight(p)
        assert copy.stride() == p.stride()
        assert torch.equal(bits(copy), bits(spec_cast(p.detach(), scale, torch.float8_e4m3fn)))
        assert torch.equal(inv, scale.reciprocal())


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("state_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_copies_of_chunks_of_several_blocks(backend, state_dtype, param_dtype, monkeypatch):
    """The cpu backend casts each chunk's copies block by block (512 weights)
    after updating the block; the suite's 100-element chunks never hold two
    blocks, so here chunks of 1500 elements (two full blocks and a partial
    one; 1536 with FP8 states) over tensors of several chunks: every copy, and
    each tensor's absmax across blocks and chunks, with the largest weight in
    the partial last block of one tensor and in the second block of the other."""
    from fusedopt.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "CHUNK_SIZE", 1500)
    g = torch.Generator().manual_seed(11)
    params = []
    for n, where in ((3 * 1500 + 77, -3), (1501, 600)):
        w = torch.randn(n, generator=g)
        w[where] = -40.0  # the absmax
        params.append(w.to(param_dtype).requires_grad_())
    opt = FusedAdamW(params, lr=0.01, backend=backend, master_weights=param_dtype != torch.float32,
                     state_dtype=state_dtype, fp8=Float8Recipe(amax_history_len=2))
    for step in range(2):
        before = [fp8_state(opt, p) if p in opt.state else None for p in params]
        for p, grad in zip(params, grads_for(params, step)):
            p.grad = grad
        opt.step()
    for p, old in zip(params, before):
        s, w = fp8_state(opt, p), weight(opt, p)
        assert torch.equal(bits(s["fp8_weight"]), bits(spec_cast(w, old["fp8_scale"], torch.float8_e4m3fn)))
        assert torch.equal(s["fp8_amax_history"][0], w.abs().max())
        assert torch.equal(p.detach(), w.to(param_dtype))  # the param: its master rounded once (staged blocks)


@pytest.mark.parametrize("backend", backend_params())
def test_initial_state_and_weights_unchanged(backend):
    """The state made at the first step: history [amax(w_0), 0, ...], the scale
    from it, the copy of w_0; the weights get the same bits as without fp8."""
    recipe = Float8Recipe(amax_history_len=4)
    params, plain = make(torch.bfloat16), make(torch.bfloat16)
    w0 = [p.detach().float().clone() for p in params]
    opt = FusedAdamW(params, lr=0.01, backend=backend, master_weights=True, fp8=recipe)
    ref = FusedAdamW(plain, lr=0.01, backend=backend, master_weights=True)
    initial = recipe.initial_state(w0[5])
    amax = w0[5].abs().max()
    assert torch.equal(initial["fp8_amax_history"], torch.tensor([amax, 0, 0, 0]))
    assert torch.equal(initial["fp8_scale"], torch.tensor(448.0) / amax)
    assert torch.equal(bits(initial["fp8_weight"]), bits(spec_cast(w0[5], initial["fp8_scale"], recipe.dtype)))
    for step in range(3):
        for ps in (params, plain):
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
        opt.step()
        ref.step()
        if step == 0:  # the first step's copy is cast with the scale made from w_0
            torch.testing.assert_close(opt.fp8_weight(params[5])[1], initial["fp8_scale_inv"], rtol=0, atol=0)
    for p, q in zip(params, plain):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["master_param"], ref.state[q]["master_param"])


def test_copy_exists_before_the_first_step():
    """fp8_weight before any step: the copy of the initial weight (for the
    first forward); the first step then casts with that same scale and keeps
    updating the same tensors in place."""
    params = make(torch.bfloat16, shapes=[(257,)])
    opt = FusedAdamW(params, lr=0.01, backend="cpu", master_weights=True, fp8=Float8Recipe())
    copy, inv = opt.fp8_weight(params[0])
    w0 = params[0].detach().float()
    assert torch.equal(inv, (torch.tensor(448.0) / w0.abs().max()).reciprocal())
    assert torch.equal(bits(copy), bits(spec_cast(w0, inv.reciprocal(), torch.float8_e4m3fn)))
    scale = opt.state[params[0]]["fp8_scale"].clone()
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    copy_after, inv_after = opt.fp8_weight(params[0])
    assert copy_after is copy and torch.equal(inv_after, scale.reciprocal())


def test_reference_master_is_torch_adamw_and_copies_scale_it():
    """End to end against torch: the reference's fp32 weights are
    torch.optim.AdamW's bit for bit, and each copy times scale_inv is within
    FP8's relative precision of them (scaled to at most fp8_max)."""
    recipe = Float8Recipe(torch.float8_e4m3fn)
    params = make(torch.float32, shapes=[(257,), (13, 70)])
    theirs = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedAdamW(params, lr=0.01, backend="reference", fp8=recipe)
    torch_opt = torch.optim.AdamW(theirs, lr=0.01, foreach=False)
    for step in range(4):
        for ps in (params, theirs):
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
        scales = [opt.state[p]["fp8_scale"].clone() if p in opt.state else None for p in params]
        opt.step()
        torch_opt.step()
        for p, q, scale in zip(params, theirs, scales):
            assert torch.equal(p, q)
            copy, inv = opt.fp8_weight(p)
            if scale is not None:
                assert torch.equal(inv, scale.reciprocal())
            # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative, plus the subnormal floor
            err = (copy.float() * inv - q).abs()
            assert torch.all(err <= q.abs() * 2.0**-4 + inv * 2.0**-10)


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
def test_kernels_match_reference(backend):
    """Same params, grads and recipe: the kernels' copies, scales and histories
    equal the reference's bit for bit. The grads are zero, so the weights move
    by weight decay alone (one multiply: the same bits on every backend, where
    the full update is within ~1 ulp, see test_adamw), while their absmax,
    history and scale change every step."""
    recipe = Float8Recipe(torch.float8_e5m2, margin=2, amax_history_len=2)
    results = {}
    for name in ("reference", backend):
        params = make(torch.bfloat16)
        opt = FusedAdamW(params, lr=0.05, weight_decay=0.5, backend=name, master_weights=True, fp8=recipe)
        for step in range(4):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = torch.zeros_like(g)
            opt.step()
        results[name] = [(weight(opt, p).clone(), fp8_state(opt, p)) for p in params]
    for (w_ref, s_ref), (w, s) in zip(results["reference"], results[backend]):
        assert torch.equal(w, w_ref) and (w.numel() == 0 or w.abs().max() > 0)
        for k in s:
            assert torch.equal(bits(s[k]), bits(s_ref[k])), k


def test_state_rows_share_buffers_and_the_plan_is_kept():
    """The scales, inverses and histories of a bucket are rows of one buffer
    each (one update for all params), and steps reuse the cached plan."""
    params = make(torch.float32, shapes=[(7,), (257,), (3, 5)])
    opt = FusedAdamW(params, lr=0.01, backend="cpu", fp8=Float8Recipe(amax_history_len=5))
    plans = []
    for step in range(3):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        plans.append(opt._plans[0])
    assert plans[1] is plans[2]
    for name in ("fp8_scale", "fp8_scale_inv", "fp8_amax_history"):
        rows = [opt.state[p][name] for p in params]
        assert rows[0]._base is not None and all(r._base is rows[0]._base for r in rows)
        assert rows[0]._base.shape[0] == len(params)


@pytest.mark.parametrize("backend", backend_params())
def test_found_inf_leaves_fp8_state_unchanged(backend):
    """A step GradScaler skips (found_inf=1) changes neither the weights nor
    the copy, the scale, scale_inv or the history."""
    params = make(torch.float32, shapes=[(7,), (257,)])
    opt = FusedAdamW(params, lr=0.01, backend=backend, fp8=Float8Recipe(amax_history_len=2))
    for step in range(2):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    saved = [(p.detach().clone(), fp8_state(opt, p)) for p in params]
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0)
    for p, g in zip(params, grads_for(params, 9)):
        p.grad = g
    opt.step()
    for p, (w, s) in zip(params, saved):
        assert torch.equal(p.detach(), w)
        for k, v in fp8_state(opt, p).items():
            assert torch.equal(bits(v), bits(s[k])), k
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(opt.state[params[1]]["fp8_amax_history"], saved[1][1]["fp8_amax_history"])


@pytest.mark.parametrize("backend", backend_params([b for b in KERNEL_BACKENDS if b in ("cpu", "cuda")]))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("margin", [0, 3])
def test_delayed_scaling_update_is_the_recipes(backend, fmt, margin):
    """The one-call update (fp8_update_: C++ on the cpu backend, a thread per
    copy on the cuda backend) against Float8Recipe.update_, bit for bit:
    amaxes of 0, NaN, inf, subnormal and huge, histories holding NaN or only
    zeros, a GradScaler skip, and 300 copies (more than one CUDA block)."""
    from fusedopt.backends import cpu, cuda
    from fusedopt.fp8 import bucket_copies
    module = {"cpu": cpu, "cuda": cuda}[backend]
    module.load()
    recipe = Float8Recipe(fmt, margin=margin, amax_history_len=4)
    inf, nan = float("inf"), float("nan")
    edges = (torch.tensor([0.5, 0.0, nan, inf, 1e-40, 3e38, 2.0, 0.0], dtype=torch.float64),
             torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0], [1.0, nan, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]),
             torch.tensor([1.0, 2.0, 3.0, 0.25, 5.0, 6.0, 7.0, 8.0]))
    g = torch.Generator().manual_seed(0)
    many = (torch.rand(300, generator=g, dtype=torch.float64) * 10, torch.rand(300, 4, generator=g) * 10,
            torch.rand(300, generator=g) + 0.5)

    def fresh(history, scales):
        states = [{"fp8_scale": s.clone(), "fp8_scale_inv": torch.ones(()), "fp8_amax_history": h.clone()}
                  for s, h in zip(scales, history)]
        return bucket_copies([torch.empty(0)] * len(states), states)

    for amax, history, scales in (edges, many):
        for found_inf in (None, torch.tensor([0.0]), torch.tensor([1.0])):
            want, got = fresh(history, scales), fresh(history, scales)
            recipe.update_(want, amax, found_inf)
            module.fp8_update_(got, amax, found_inf, recipe)
            for field in ("scale_buffer", "scale_inv_buffer", "history_buffer"):
                assert torch.equal(getattr(got, field).view(torch.int32), getattr(want, field).view(torch.int32)), \
                    (field, found_inf)


@pytest.mark.parametrize("backend", backend_params())
def test_scale_inv_is_16_byte_aligned(backend):
    """fp8_weight's scale_inv is what torch._scaled_mm takes as a scale
    pointer, and cuBLASLt refuses one that is not 16-byte aligned (an H200:
    CUBLAS_STATUS_NOT_SUPPORTED for the second param's, 4 bytes into a packed
    buffer). Every param's is aligned, holds 1 / the scale its copy was cast
    with, and later steps update them in place (the padded buffer is reused)."""
    params = make(torch.bfloat16, shapes=[(7,), (13, 70), (5,), (3, 3)])
    opt = FusedAdamW(params, lr=0.01, backend=backend, master_weights=True, fp8=Float8Recipe())
    for step in range(3):
        scales = [opt.state[p]["fp8_scale"].clone() if p in opt.state else None for p in params]
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        invs = [opt.fp8_weight(p)[1] for p in params]
        assert all(inv.data_ptr() % 16 == 0 for inv in invs), [inv.data_ptr() % 16 for inv in invs]
        if step:
            assert all(torch.equal(inv, s.reciprocal()) for inv, s in zip(invs, scales))
        if step == 1:
            where = [inv.data_ptr() for inv in invs]
    assert [inv.data_ptr() for inv in invs] == where


@pytest.mark.parametrize("backend", backend_params(["reference", "cpu"]))
def test_state_dict_round_trip(backend):
    """Saved and loaded (through torch.save), the FP8 state continues bit for bit; a
    recipe of another dtype or history length re-creates it from the weight."""
    recipe = Float8Recipe(amax_history_len=3)
    params = make(torch.bfloat16, shapes=[(7,), (13, 70)])
    opt = FusedAdamW(params, lr=0.01, backend=backend, master_weights=True, fp8=recipe)
    for step in range(2):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()  # torch.save: plain pickle of float8 tensors fails in torch 2.13 itself
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][1]["fp8_weight"].dtype == torch.float8_e4m3fn
    clones = [p.detach().clone().requires_grad_() for p in params]
    again = FusedAdamW(clones, lr=0.01, backend=backend, master_weights=True, fp8=recipe)
    again.load_state_dict(saved)
    for ps, o in ((params, opt), (clones, again)):
        for p, g in zip(ps, grads_for(ps, 5)):
            p.grad = g
        o.step()
    for p, q in zip(params, clones):
        for k, v in fp8_state(opt, p).items():
            assert torch.equal(bits(v), bits(fp8_state(again, q)[k])), k

    other = FusedAdamW([p.detach().clone().requires_grad_() for p in params], lr=0.01, backend=backend,
                       master_weights=True, fp8=Float8Recipe(torch.float8_e5m2, amax_history_len=3))
    other.load_state_dict(saved)
    assert all("fp8_weight" not in s for s in other.state.values())
    plain = FusedAdamW([p.detach().clone().requires_grad_() for p in params], lr=0.01, backend=backend,
                       master_weights=True)
    plain.load_state_dict(saved)
    assert all("fp8_weight" not in s for s in plain.state.values())


def test_errors():
    recipe = Float8Recipe()
    with pytest.raises(ValueError, match="need master_weights=True"):
        FusedAdamW([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], fp8=recipe)
    with pytest.raises(ValueError, match="from fp32 weights, not torch.float64"):
        FusedAdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)], fp8=recipe)
    with pytest.raises(TypeError, match="Float8Recipe"):
        FusedAdamW([torch.zeros(3, requires_grad=True)], fp8=torch.float8_e4m3fn)
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="not a param of this optimizer"):
        FusedAdamW([torch.zeros(3, requires_grad=True)], fp8=recipe).fp8_weight(p)
    with pytest.raises(RuntimeError, match="keeps no FP8 copies"):
        FusedAdamW([p]).fp8_weight(p)
    with pytest.raises(ValueError, match="fp8 dtype"):
        Float8Recipe(torch.bfloat16)
    with pytest.raises(ValueError, match="margin"):
        Float8Recipe(margin=-1)
    with pytest.raises(ValueError, match="amax_history_len"):
        Float8Recipe(amax_history_len=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_example_trains_on_fp8_copies(backend):
    """bench/examples/fp8_linear.py: an MLP whose forward runs on the FP8
    copies (dequantized here: no FP8 matmul on a CPU) learns its target."""
    example = shipped_module("bench", "examples.fp8_linear")
    losses = example.train(steps=150, backend=backend, log=None)
    assert losses[-1] < 0.3 * losses[0]
