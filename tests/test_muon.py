"""FusedMuon against torch.optim.Muon (matrices) and torch.optim.AdamW (the
rest): the reference backend bit for bit, the batched path (bf16 emulated with
fp32 GEMMs on the CPU) within bf16 rounding of it; state_dicts both ways."""
from __future__ import annotations

import copy

import pytest
import torch

from fusedopt import FusedAdamW, FusedMuon
from fusedopt.reference.muon import newton_schulz, newton_schulz_batched


SHAPES = [(6, 10), (10, 6), (8, 8), (1, 9), (9, 1), (33, 17)]
BACKENDS = ["reference", "cpu"]
OPTIONS = {
    "defaults": {},
    "no_nesterov": {"nesterov": False},
    "match_rms": {"adjust_lr_fn": "match_rms_adamw", "ns_steps": 3},
    "no_decay": {"weight_decay": 0.0, "momentum": 0.9, "lr": 0.05},
}


def draw(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def set_grads(*param_lists, step):
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g) for p in param_lists[0]]
    for params in param_lists:
        for p, grad in zip(params, grads):
            p.grad = grad.to(p.dtype, copy=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
def test_matrices_equal_torch_muon(backend, option):
    ours, theirs = draw(SHAPES), draw(SHAPES)
    a = FusedMuon(ours, backend=backend, **OPTIONS[option])
    b = torch.optim.Muon(theirs, **OPTIONS[option])
    for step in range(4):
        set_grads(ours, theirs, step=step)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        if backend == "reference":  # torch's algorithm, op for op
            assert torch.equal(p, q)
            assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
        else:  # batched GEMMs: another accumulation order can flip a bf16 rounding (one ulp of an update element)
            lr = OPTIONS[option].get("lr", 1e-3) * 5
            torch.testing.assert_close(p, q, rtol=0, atol=lr * 2e-2)


def test_batched_newton_schulz_equals_the_matrix_one():
    """The CPU emulation rounds where torch's bf16 ops round: small shapes
    come out bit for bit; larger GEMMs accumulate in another order, so a few
    bf16 roundings flip and the five iterations carry them (to 2-3 ulps)."""
    g = torch.Generator().manual_seed(0)
    for rows, cols, exact in [(4, 9, True), (16, 64, True), (1, 5, True), (32, 32, False), (64, 256, False)]:
        x = torch.randn(3, rows, cols, generator=g)
        got = newton_schulz_batched(x, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        expected = torch.stack([newton_schulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7) for m in x])
        assert got.dtype == torch.bfloat16
        if exact:
            assert torch.equal(got, expected), (rows, cols)
        diff = (got.float() - expected.float()).abs()
        assert diff.max() <= 8e-3 and diff.mean() <= 5e-4, (rows, cols, diff.max(), diff.mean())
    fp32 = newton_schulz_batched(x, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, got.float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_model_equals_muon_plus_adamw(backend):
    """Matrices get Muon; vectors, and a use_muon=False group (embedding, head), get AdamW with adamw_*."""
    matrices, vectors, embed = draw([(12, 8), (8, 12)]), draw([(8,), (12,)], seed=1), draw([(20, 8)], seed=2)
    t_matrices, t_vectors, t_embed = draw([(12, 8), (8, 12)]), draw([(8,), (12,)], seed=1), draw([(20, 8)], seed=2)
    opt = FusedMuon([{"params": matrices + vectors}, {"params": embed, "use_muon": False, "lr": 3e-3}], lr=0.02,
                    adamw_betas=(0.8, 0.9), adamw_eps=1e-6, backend=backend)
    muon = torch.optim.Muon(t_matrices, lr=0.02)
    adamw = torch.optim.AdamW([{"params": t_vectors, "lr": 0.02}, {"params": t_embed, "lr": 3e-3}],
                              betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # the AdamW params follow our groups' lr
    t_scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (muon, adamw)]
    for step in range(3):
        set_grads(matrices + vectors + embed, t_matrices + t_vectors + t_embed, step=step)
        opt.step()
        muon.step()
        adamw.step()
        sched.step()
        for s in t_scheds:
            s.step()
    for p, q in zip(matrices, t_matrices):
        torch.testing.assert_close(p, q, rtol=0, atol=0 if backend == "reference" else 1e-3)
    for p, q in zip(vectors + embed, t_vectors + t_embed):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_state_dict_moves_to_torch_and_back():
    ours, theirs = draw(SHAPES), draw(SHAPES)
    a, b = FusedMuon(ours, backend="reference"), torch.optim.Muon(theirs)
    set_grads(ours, theirs, step=0)
    a.step()
    b.load_state_dict(a.state_dict())  # ours into torch's
    c = FusedMuon(draw(SHAPES), backend="reference")
    c.load_state_dict(torch.optim.Muon(theirs).state_dict() | {"state": b.state_dict()["state"]})  # and back
    for p, q, r in zip(ours, theirs, c.param_groups[0]["params"]):
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
        assert torch.equal(c.state[r]["momentum_buffer"], a.state[p]["momentum_buffer"])
    assert c.param_groups[0]["adamw_betas"] == (0.9, 0.95)  # filled from the defaults


def test_adamw_states_load_as_fused_adamw_loads_them():
    params = draw([(6, 4), (4,)])
    opt = FusedMuon(params)
    set_grads(params, step=0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file would hold it
    again = [p.detach().clone().requires_grad_() for p in params]
    fresh = FusedMuon(again)
    fresh.load_state_dict(saved)
    assert fresh._adamw.state is fresh.state
    set_grads(params, again, step=1)
    opt.step()
    fresh.step()
    for p, q in zip(params, again):
        assert torch.equal(p, q)


def test_stacked_matrices_are_orthogonalised_one_by_one():
    """[E, m, n]: each trailing matrix as its own 2-D param (lr adjusted for m x n)."""
    stacked = draw([(3, 10, 6)])
    singles = [p.detach().clone().requires_grad_() for p in stacked[0]]
    for backend in BACKENDS:
        s = [stacked[0].detach().clone().requires_grad_()]
        a, b = FusedMuon(s, lr=0.02, backend=backend), torch.optim.Muon([q.detach().clone().requires_grad_()
                                                                            for q in singles], lr=0.02)
        for step in range(2):
            g = torch.randn((3, 10, 6), generator=torch.Generator().manual_seed(step))
            s[0].grad = g.clone()
            for i, q in enumerate(b.param_groups[0]["params"]):
                q.grad = g[i].clone()
            a.step()
            b.step()
        torch.testing.assert_close(s[0], torch.stack(b.param_groups[0]["params"]), rtol=0,
                                   atol=0 if backend == "reference" else 1e-3)


def test_refusals_match_torch():
    p = torch.zeros(4, 4, requires_grad=True)
    for kwargs, message in [({"lr": -1.0}, "Learning rate should be >= 0"), ({"momentum": -0.1}, "momentum should"),
                            ({"weight_decay": -1.0}, "weight decay should"), ({"adjust_lr_fn": "x"}, "not supported"),
                            ({"ns_steps": 100}, "less than 100"), ({"ns_coefficients": (1.0, 2.0)}, "exactly 3"),
                            ({"ns_dtype": torch.float16}, "ns_dtype")]:
        with pytest.raises(ValueError, match=message):
            FusedMuon([p], **kwargs)
    c = torch.zeros(4, 4, dtype=torch.complex64, requires_grad=True)
    c.grad = torch.zeros_like(c)
    opt = FusedMuon([c])
    with pytest.raises(RuntimeError, match="does not support complex"):
        opt.step()


def test_bf16_params_and_fp32_iteration():
    """bf16 params step through bf16 momentum as torch's; ns_dtype=float32 stays close to the bf16 iteration."""
    ours, theirs = draw([(16, 24)], dtype=torch.bfloat16), draw([(16, 24)], dtype=torch.bfloat16)
    a, b = FusedMuon(ours, backend="reference"), torch.optim.Muon(theirs)
    fp32 = draw([(16, 24)], dtype=torch.bfloat16)
    c = FusedMuon(fp32, ns_dtype=torch.float32)
    for step in range(2):
        set_grads(ours, theirs, fp32, step=step)
        a.step()
        b.step()
        c.step()
    assert torch.equal(ours[0], theirs[0]) and a.state[ours[0]]["momentum_buffer"].dtype == torch.bfloat16
    torch.testing.assert_close(fp32[0].float(), ours[0].float(), rtol=0, atol=2e-2)


def test_adamw_only_optimizer_is_fused_adamw():
    """No matrix at all: every param is AdamW's (FusedAdamW's result)."""
    a, b = draw([(5,), (3,)]), draw([(5,), (3,)])
    opt = FusedMuon(a, lr=0.01)
    ref = FusedAdamW(b, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(2):
        set_grads(a, b, step=step)
        opt.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_clips_by_every_grad(backend):
    """As clip_grad_norm_ over the whole model, then Muon + AdamW; the grads themselves are left as they were."""
    ours, theirs = draw([(12, 8), (8,), (5, 7)]), draw([(12, 8), (8,), (5, 7)])
    opt = FusedMuon(ours, lr=0.02, max_grad_norm=0.5, backend=backend)
    muon, adamw = torch.optim.Muon([theirs[0], theirs[2]], lr=0.02), torch.optim.AdamW([theirs[1]], lr=0.02,
                                                                                     betas=(0.9, 0.95),
                                                                                     weight_decay=0.1)
    for step in range(3):
        set_grads(ours, theirs, step=step)
        before = [p.grad.clone() for p in ours]
        opt.step()
        expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        muon.step()
        adamw.step()
        torch.testing.assert_close(opt.last_grad_norm, expected)
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, before))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_grad_scaler_unscales_and_skips_an_inf_step():
    """torch.amp.GradScaler unscales FusedMuon's grads itself (Muon's update is
    not unscaled in-kernel) and skips the step on an inf, both kinds of param."""
    params = draw([(6, 4), (4,)])
    before = [p.detach().clone() for p in params]
    opt = FusedMuon(params, lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # (a training step scales its loss)
    set_grads(params, step=0)
    params[1].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and scaler.get_scale() == 2.0
    ref_params = [b.clone().requires_grad_() for b in before]
    ref = FusedMuon(ref_params, lr=0.02)
    set_grads(params, ref_params, step=1)
    for p in params:
        p.grad *= 2.0
    scaler.step(opt)
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_tiny_gpt_learns_at_least_as_fast_as_adamw_at_its_best_lr():
    """bench/examples/muon_gpt.py, short: FusedMuon (default-ish lr, no
    tuning) ends at a lower loss than AdamW's best of three learning rates."""
    from fusedopt._resources import shipped_module

    result = shipped_module("bench", "examples.muon_gpt").compare(150)
    tail = 15
    muon, adamw = sum(result["muon"][-tail:]) / tail, sum(result["adamw"][-tail:]) / tail
    assert result["floor"] < muon <= adamw, (muon, adamw, result["adamw_lr"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_follow_the_fp32_trajectory(backend):
    """bf16 params with fp32 masters: the masters step exactly as fp32 params
    fed the same (bf16) grads, the params are their round-to-nearest; a
    state_dict keeps the master and the buffer at fp32."""
    low = draw([(12, 8), (8,)], dtype=torch.bfloat16)
    high = [p.detach().float().requires_grad_() for p in low]
    a = FusedMuon(low, lr=0.02, master_weights=True, backend=backend)
    b = FusedMuon(high, lr=0.02, backend=backend)
    for step in range(3):
        set_grads(low, step=step)
        for p, q in zip(high, low):
            p.grad = q.grad.float()
        a.step()
        b.step()
    for p, q in zip(low, high):
        assert torch.equal(a.state[p]["master_param"], q) and torch.equal(p, q.bfloat16())
    assert a.state[low[0]]["momentum_buffer"].dtype == torch.float32
    again = [p.detach().clone().requires_grad_() for p in low]
    c = FusedMuon(again, lr=0.02, master_weights=True, backend=backend)
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    for p, q in zip(low, again):
        assert c.state[q]["master_param"].dtype == torch.float32
        assert torch.equal(c.state[q]["master_param"], a.state[p]["master_param"])
    assert torch.equal(c.state[again[0]]["momentum_buffer"], a.state[low[0]]["momentum_buffer"])


def test_bf16_state_dtype_stores_the_momentum_in_bf16():
    ours, wide = draw([(12, 8), (8,)]), draw([(12, 8), (8,)])
    a = FusedMuon(ours, lr=0.02, state_dtype=torch.bfloat16)
    b = FusedMuon(wide, lr=0.02)
    for step in range(3):
        set_grads(ours, wide, step=step)
        a.step()
        b.step()
    assert a.state[ours[0]]["momentum_buffer"].dtype == torch.bfloat16
    assert a.state[ours[1]]["exp_avg"].dtype == torch.bfloat16
    for p, q in zip(ours, wide):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="state_dtype must be None, torch.bfloat16 or torch.float8_e4m3fn"):
        FusedMuon(ours, state_dtype=torch.float32)  # as the other optimizers: fp32 states come with master_weights
    with pytest.raises(ValueError, match="master_weights"):
        FusedMuon(ours, master_weights="yes")


def test_drop_in_mechanics():
    """deepcopy steps like the original; a group added later gets Muon and
    AdamW as its params need; step hooks run; a compiled training step
    (graph break at step) equals eager."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))

    model, ref_model = make(), make()
    opt, ref = FusedMuon(model.parameters(), lr=0.02), FusedMuon(ref_model.parameters(), lr=0.02)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    clone = copy.deepcopy(opt)
    assert clone._adamw.state is clone.state and clone.backend_name == opt.backend_name
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))

    def train(m, o):
        m(x).square().mean().backward()
        o.step()
        o.zero_grad()

    compiled = torch.compile(train, backend="aot_eager")
    for _ in range(3):
        compiled(model, opt)
        train(ref_model, ref)
    assert len(calls) == 3
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    extra, vector = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra, vector], "lr": 0.01})
    extra.grad, vector.grad = torch.randn(3, 3), torch.randn(3)
    opt.step()
    assert set(opt.state[extra]) == {"momentum_buffer"} and set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}


def test_fp8_momentum():
    """state_dtype=torch.float8_e4m3fn: the momentum buffer block-scaled in
    FP8 as every fusedopt FP8 state (fusedopt/reference/fp8_states.py), one
    byte per element plus a scale per 256; each step's stored bits are the
    spec's encoding of the fp32 momentum; the run stays close to the fp32
    one; state_dicts convert both ways; DTensor params are refused."""
    from fusedopt.reference import fp8_states

    torch.manual_seed(0)
    shapes = [(33, 17), (8, 300), (5,)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedMuon(params, lr=0.02, state_dtype=torch.float8_e4m3fn, backend="cpu")
    ref = FusedMuon(ref_params, lr=0.02, backend="cpu")
    momentum = [torch.zeros(s) for s in shapes[:2]]
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for i, (p, g) in enumerate(zip(params[:2], grads)):  # the spec: decode, lerp in fp32, encode
            momentum[i] = torch.lerp(momentum[i], g, 1 - 0.95)
            q, scales = fp8_states.encode("momentum_buffer", momentum[i])
            state = opt.state[p]
            assert state["momentum_buffer"].dtype == torch.float8_e4m3fn
            assert torch.equal(state["momentum_buffer"].view(torch.uint8), q.view(torch.uint8)), (step, i)
            assert torch.equal(state["momentum_buffer_scale"], scales)
            momentum[i] = fp8_states.decode("momentum_buffer", q, scales)
    for p, q in zip(params, ref_params):  # FP8 momentum: a few % of the update, a small drift in 4 steps
        torch.testing.assert_close(p, q, rtol=0, atol=0.02)
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float8_e4m3fn  # the AdamW part's FP8 states
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[params[1]].values())
    assert nbytes == 8 * 300 + 4 * fp8_states.n_blocks(8 * 300)

    # into an fp32 FusedMuon (decoded), and back (encoded: the same bits)
    fp32 = FusedMuon([p.detach().clone().requires_grad_() for p in params], lr=0.02, backend="cpu")
    fp32.load_state_dict(opt.state_dict())
    buf = fp32.state[fp32.param_groups[0]["params"][0]]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, momentum[0])
    again = FusedMuon([p.detach().clone().requires_grad_() for p in params], lr=0.02, backend="cpu",
                      state_dtype=torch.float8_e4m3fn)
    again.load_state_dict(fp32.state_dict())
    first = again.state[again.param_groups[0]["params"][0]]
    assert torch.equal(first["momentum_buffer"].view(torch.uint8),
                       opt.state[params[0]]["momentum_buffer"].view(torch.uint8))
    again.load_state_dict(opt.state_dict())  # FP8 into FP8: as stored
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["momentum_buffer_scale"],
                       opt.state[params[0]]["momentum_buffer_scale"])
    with pytest.raises(ValueError, match="state_dtype"):
        FusedMuon(params, state_dtype=torch.float16)
