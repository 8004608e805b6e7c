"""The bf16 param + int16 remainder encoding of fp32 masters
(fusedopt/reference/remainder.py), over every upper half and every class of
lower half: split and join are exact for every fp32 value but NaN, NaN stays
NaN, and the param is torch's round-to-nearest-even but at exact ties."""
from __future__ import annotations

import os

import pytest
import torch

from fusedopt.reference import remainder


def patterns() -> torch.Tensor:
    """Every 16-bit upper half (sign, exponent, mantissa: every carry) with
    lower halves of every class the encoding tells apart (0, below the
    rounding point, the tie, above it, the extremes) and random ones: 2M fp32
    bit patterns, as int32."""
    upper = torch.arange(0x10000, dtype=torch.int64)
    lows = torch.tensor([0x0000, 0x0001, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=torch.int64)
    lows = torch.cat([lows, torch.randint(0, 0x10000, (24,), generator=torch.Generator().manual_seed(0))])
    bits = (upper[:, None] << 16 | lows[None, :]).flatten()
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


def test_split_join_exact_for_every_class_of_fp32():
    bits = patterns()
    master = bits.view(torch.float32)
    param, rem = remainder.split(master)
    assert param.dtype == torch.bfloat16 and rem.dtype == torch.int16
    back = remainder.join(param, rem)
    nan = master.isnan()
    assert torch.equal(back.view(torch.int32)[~nan], bits[~nan]), "a non-NaN master did not come back bit for bit"
    assert back[nan].isnan().all() and param[nan].isnan().all()
    # the param: torch's round-to-nearest-even but at exact ties with an even upper half, where it is one
    # ulp larger in magnitude; NaN: 0x7FC0, as fusedopt's kernels round (torch keeps the payload's top bits)
    rne = master.to(torch.bfloat16).view(torch.int16)
    got = param.view(torch.int16)
    tie = ((bits & 0xFFFF) == 0x8000) & ~nan
    assert torch.equal(got[~tie & ~nan], rne[~tie & ~nan])
    assert (got[nan] == 0x7FC0).all()
    assert torch.equal(got[tie].to(torch.int32) & 0xFFFF, ((bits[tie] >> 16) + 1) & 0xFFFF)
    even = tie & (((bits >> 16) & 1) == 0)
    assert torch.equal(got[even].to(torch.int32) & 0xFFFF, ((rne[even].to(torch.int32) & 0xFFFF) + 1) & 0xFFFF)
    assert torch.equal((rem < 0), ((bits & 0xFFFF) >= 0x8000))  # the remainder's sign says "rounded up"


@pytest.mark.parametrize("value,param_bits", [
    (0.0, 0x0000), (-0.0, 0x8000), (float("inf"), 0x7F80), (float("-inf"), 0xFF80),
    (3.4028234663852886e38, 0x7F80),  # the largest fp32 rounds to inf, as round-to-nearest does
    (1.401298464324817e-45, 0x0000),  # the smallest subnormal
    (-1.1754942106924411e-38, 0x8080),  # the largest subnormal, negative: carries into the exponent
    (1.0, 0x3F80), (1.00390625, 0x3F80 + 1),  # 1 + 2^-8 is 1's bf16 successor
])
def test_edges(value, param_bits):
    master = torch.tensor([value], dtype=torch.float32)
    param, rem = remainder.split(master)
    assert int(param.view(torch.int16)) & 0xFFFF == param_bits
    assert torch.equal(remainder.join(param, rem).view(torch.int32), master.view(torch.int32))


def test_ties_and_nan():
    """An exact tie rounds the magnitude up (0x3F80_8000 -> 0x3F81, where RNE
    keeps 0x3F80) and still comes back; NaN masters of any payload give 0x7FC0."""
    tie = torch.tensor([0x3F808000, 0xBF808000 - 2**32], dtype=torch.int32)
    param, rem = remainder.split(tie.view(torch.float32))
    assert (param.view(torch.int16).to(torch.int32) & 0xFFFF).tolist() == [0x3F81, 0xBF81]
    assert torch.equal(remainder.join(param, rem).view(torch.int32), tie)
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -1, 0x7FFF8000], dtype=torch.int64)
    nans = torch.where(nans >= 2**31, nans - 2**32, nans).to(torch.int32)
    param, rem = remainder.split(nans.view(torch.float32))
    assert (param.view(torch.int16) == 0x7FC0).all()
    assert remainder.join(param, rem).isnan().all()
    with pytest.raises(TypeError):
        remainder.split(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        remainder.join(param, rem.to(torch.int32))


# --- master_weights="remainder" in the optimizers -------------------------------------------------------

import fusedopt  # noqa: E402
from conftest import CPU_BACKENDS as TESTED  # noqa: E402
from conftest import backend_params  # noqa: E402
from helpers import SHAPES, bits, clone_params, cross_on_triton, make_params, many, run  # noqa: E402
from optim_db import optimizers  # noqa: E402

FUSED = optimizers(lr=1e-2, fused=True)


def _zoo():
    """bf16 params of every shape the tests use, and a non-contiguous one (staged, written back)."""
    params = make_params(SHAPES, torch.bfloat16)
    wide = torch.randn(9, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).t()
    return params + [wide.requires_grad_()]


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("backend", backend_params())
def test_same_masters_as_master_weights(name, backend, state_dtype):
    """Many steps with remainders and with fp32 masters: the masters bit for
    bit; each param is its master's remainder rounding, which is the fp32
    masters' round-to-nearest-even param but at exact ties."""
    cross_on_triton(backend, state_dtype is None, "the default states")
    cls, kwargs = FUSED[name]
    kwargs = {**kwargs, "state_dtype": state_dtype}
    params = _zoo()
    ref = clone_params(params)
    opt = cls(params, backend=backend, master_weights="remainder", **kwargs)
    opt_ref = cls(ref, backend=backend, master_weights=True, **kwargs)
    run(opt, params, 6)
    run(opt_ref, ref, 6)
    ties = 0
    for p, q in zip(params, ref):
        master = opt.master_param(p)
        assert torch.equal(bits(master), bits(opt_ref.state[q]["master_param"]))
        assert torch.equal(bits(p), bits(remainder.split(master)[0]))
        tie = (master.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(bits(p)[~tie], bits(q)[~tie])
        ties += int(tie.sum())
        assert "master_param" not in opt.state[p] and opt.state[p]["master_remainder"].dtype == torch.int16
        for key, value in opt_ref.state[q].items():
            if key != "master_param":
                assert torch.equal(opt.state[p][key], value), key
    assert ties <= sum(p.numel() for p in params) // 100  # rare (1 in 65,536 random values; more with bf16 updates)


OPTIONS = {
    "amsgrad": dict(amsgrad=True),
    "bf16 states": dict(state_dtype=torch.bfloat16),
    "fp8 states": dict(state_dtype=torch.float8_e4m3fn),
    "max_grad_norm": dict(max_grad_norm=0.5),
    "fp8 copies": dict(fp8=fusedopt.Float8Recipe()),
    "tensor lr": dict(lr=torch.tensor(0.02)),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("backend", backend_params())
def test_adamw_options(option, backend):
    """AdamW's storage options with remainders: the same masters, states and
    FP8 copies as with fp32 masters."""
    params = make_params([(300,), (7, 40), (1,)], torch.bfloat16)
    ref = clone_params(params)
    kwargs = {"lr": 1e-2, **OPTIONS[option]}
    opt = fusedopt.FusedAdamW(params, backend=backend, master_weights="remainder", **kwargs)
    opt_ref = fusedopt.FusedAdamW(ref, backend=backend, master_weights=True, **kwargs)
    run(opt, params, 4, scale=10.0)
    run(opt_ref, ref, 4, scale=10.0)
    for p, q in zip(params, ref):
        assert torch.equal(bits(opt.master_param(p)), bits(opt_ref.state[q]["master_param"]))
        if "fp8" in kwargs:
            assert torch.equal(opt.fp8_weight(p)[0].view(torch.uint8), opt_ref.fp8_weight(q)[0].view(torch.uint8))
            assert torch.equal(opt.fp8_weight(p)[1], opt_ref.fp8_weight(q)[1])


@pytest.mark.parametrize("backend", backend_params())
def test_every_class_of_fp32_through_the_kernel(backend):
    """Masters of every upper half with lower halves of every class (the
    tie, the extremes) and random ones go through a step that leaves them as
    they are (lr 0, zero grads): each comes back bit for bit (NaN as NaN), and
    the param is the encoding's. (Through AdamW, whose step with lr 0 is the
    identity on every value; every kernel of a backend joins and splits with
    the same helpers: weights.h, WeightPack, load_weight / store_weight.)"""
    upper = torch.arange(0x10000, dtype=torch.int64)
    if backend == "triton":  # the interpreter: every sign and exponent with edge mantissas
        upper = upper[((upper & 0x7F) < 2) | ((upper & 0x7F) > 0x7D)]
    lows = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    lows = torch.cat([lows, torch.randint(0, 0x10000, (4,), generator=torch.Generator().manual_seed(1))])
    pattern = (upper[:, None] << 16 | lows[None, :]).flatten()
    master = torch.where(pattern >= 2**31, pattern - 2**32, pattern).to(torch.int32).view(torch.float32)
    p = torch.zeros(master.shape, dtype=torch.bfloat16, requires_grad=True)
    opt = fusedopt.FusedAdamW([p], lr=0.0, backend=backend, master_weights="remainder")
    p.grad = torch.zeros_like(p)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["master_param"] = master.clone()
    state["state"][0].pop("master_remainder")
    opt.load_state_dict(state)  # splits the masters into the params and remainders
    opt.step()
    back = opt.master_param(p)
    nan = master.isnan()
    assert torch.equal(back.view(torch.int32)[~nan], master.view(torch.int32)[~nan])
    assert back[nan].isnan().all()
    assert torch.equal(bits(p), bits(remainder.split(master)[0]))


def test_memory_two_bytes_of_master():
    params = make_params([(1000,), (10, 100)], torch.bfloat16)
    opt = fusedopt.FusedAdamW(params, backend="reference", master_weights="remainder", state_dtype=torch.bfloat16)
    run(opt, params, 1)
    n = sum(p.numel() for p in params)
    masters = [opt.state[p]["master_remainder"] for p in params]
    assert sum(t.numel() * t.element_size() for t in masters) == 2 * n
    states = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    assert sum(t.numel() * t.element_size() for t in states) == 4 * n  # 8 B a param in all, with the param


def test_state_dicts_convert_both_ways():
    """A remainder checkpoint loads into master_weights=True as the same
    fp32 masters and back; a checkpoint with fp32 masters loads into
    "remainder" (the params become the masters' remainder rounding); a
    torch.optim.AdamW checkpoint (no master) takes the params as masters."""
    params = make_params([(300,), (7, 40)], torch.bfloat16)
    opt = fusedopt.FusedAdamW(params, lr=1e-2, master_weights="remainder")
    run(opt, params, 3)
    masters = [opt.master_param(p).clone() for p in params]
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master_remainder"}

    plain = fusedopt.FusedAdamW(params, lr=1e-2, master_weights=True)
    plain.load_state_dict(sd)
    for p, m in zip(params, masters):
        assert torch.equal(bits(plain.state[p]["master_param"]), bits(m))
    run(plain, params, 2, start=3)
    run(opt, params, 0)
    again = fusedopt.FusedAdamW(params, lr=1e-2, master_weights="remainder")
    again.load_state_dict(plain.state_dict())
    for p in params:
        assert torch.equal(bits(again.master_param(p)), bits(plain.state[p]["master_param"]))
        assert torch.equal(bits(p), bits(remainder.split(plain.state[p]["master_param"])[0]))

    # into an optimizer without masters: the remainder is dropped
    none = fusedopt.FusedAdamW(params, lr=1e-2)
    none.load_state_dict(sd)
    assert all("master_remainder" not in none.state[p] for p in params)

    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    run(torch_opt, params, 1)
    fresh = fusedopt.FusedAdamW(params, lr=1e-2, master_weights="remainder")
    fresh.load_state_dict(torch_opt.state_dict())
    for p in params:
        assert not fresh.state[p]["master_remainder"].any()
        assert torch.equal(bits(fresh.master_param(p)), bits(p.detach().float()))

    # torch.optim.AdamW on the fp32 masters takes this optimizer's state_dict (it ignores the remainder)
    fp32 = [opt.master_param(p).clone().requires_grad_() for p in params]
    torch_master = torch.optim.AdamW(fp32, lr=1e-2)
    torch_master.load_state_dict(opt.state_dict())
    assert torch.equal(torch_master.state[fp32[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])


def test_load_checks_before_writing_params():
    params = make_params([(30,)], torch.bfloat16)
    opt = fusedopt.FusedAdamW(params, master_weights="remainder")
    run(opt, params, 1)
    sd = opt.state_dict()
    sd["state"][0]["master_param"] = torch.ones(31)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="master_param of shape"):
        opt.load_state_dict(sd)
    assert torch.equal(params[0].detach(), before)


def test_param_changed_outside():
    """A write torch counts (p.copy_ under no_grad, a model's
    load_state_dict) makes the new value the master at the next step; a
    write through .data is not counted, and resync_master() says so."""
    p = make_params([(200,)], torch.bfloat16)[0]
    opt = fusedopt.FusedAdamW([p], lr=1e-2, master_weights="remainder")
    run(opt, [p], 2)
    assert opt.state[p]["master_remainder"].any()
    new = torch.randn(200).to(torch.bfloat16)
    with torch.no_grad():
        p.copy_(new)
    check = fusedopt.FusedAdamW([p.detach().clone().requires_grad_()], lr=1e-2, master_weights=True)
    check.load_state_dict(opt.state_dict())  # (its master is joined from the new param: wrong, as documented)
    check.state[check.param_groups[0]["params"][0]]["master_param"].copy_(new.float())
    q = check.param_groups[0]["params"][0]
    run(opt, [p], 1, start=2)
    run(check, [q], 1, start=2)
    assert torch.equal(bits(opt.master_param(p)), bits(check.state[q]["master_param"]))

    module = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = fusedopt.FusedAdamW(module.parameters(), lr=1e-2, master_weights="remainder")
    run(opt, list(module.parameters()), 2)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    run(opt, list(module.parameters()), 1, start=2)
    module.load_state_dict(saved)
    run(opt, list(module.parameters()), 0)
    opt._outside.resync(opt.state)
    for p in module.parameters():
        assert not opt.state[p]["master_remainder"].any()

    p = make_params([(50,)], torch.bfloat16)[0]
    opt = fusedopt.FusedAdamW([p], lr=1e-2, master_weights="remainder")
    run(opt, [p], 2)
    p.data.copy_(torch.zeros(50))  # not counted: the remainder still completes the old bits
    opt._outside.resync(opt.state)
    assert opt.state[p]["master_remainder"].any()
    opt.resync_master()
    assert not opt.state[p]["master_remainder"].any()
    assert torch.equal(opt.master_param(p), torch.zeros(50))


def test_refusals():
    half = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="float16: master_weights='remainder'"):
        fusedopt.FusedAdamW([half], master_weights="remainder", backend="reference")
    # fp32 params ignore it, as they ignore master_weights=True
    p = make_params([(10,)])[0]
    opt = fusedopt.FusedAdamW([p], master_weights="remainder")
    run(opt, [p], 1)
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and opt.master_param(p) is p


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FUSEDOPT_EXHAUSTIVE"),
                    reason="every fp32 bit pattern: ~14 min (830 s here); set FUSEDOPT_EXHAUSTIVE=1 to run it")
def test_split_join_every_fp32():
    """All 2^32 fp32 patterns in chunks through the reference encoding:
    every non-NaN comes back bit for bit, NaN as NaN, and the param is RNE
    but at exact ties (test_split_join_exact_for_every_class_of_fp32's
    classes, for every lower half)."""
    chunk = 1 << 26
    for start in range(0, 1 << 32, chunk):
        bits = torch.arange(start, start + chunk, dtype=torch.int64)
        bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
        master = bits.view(torch.float32)
        param, rem = remainder.split(master)
        back = remainder.join(param, rem).view(torch.int32)
        nan = master.isnan()
        assert torch.equal(back[~nan], bits[~nan]), hex(start)
        assert back.view(torch.float32)[nan].isnan().all() and (param.view(torch.int16)[nan] == 0x7FC0).all()
        tie = ((bits & 0xFFFF) == 0x8000) & ~nan
        rne = master.to(torch.bfloat16).view(torch.int16)
        assert torch.equal(param.view(torch.int16)[~tie & ~nan], rne[~tie & ~nan]), hex(start)


@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler(backend):
    """GradScaler with remainders: unscaled in the kernels as with fp32 masters
    (the same masters), and a step with an inf leaves every param, remainder
    and state as it was."""
    import warnings

    warnings.filterwarnings("ignore", "GradScaler is going to stop", FutureWarning)
    params = make_params([(300,), (7, 40)], torch.bfloat16)
    ref = clone_params(params)
    opt = fusedopt.FusedAdamW(params, lr=1e-2, backend=backend, master_weights="remainder")
    opt_ref = fusedopt.FusedAdamW(ref, lr=1e-2, backend=backend, master_weights=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(4):
        for o, ps, scaler in ((opt, params, scalers[0]), (opt_ref, ref, scalers[1])):
            loss = sum((p.float() * (step + 1 + i)).sin().sum() for i, p in enumerate(ps))
            if step == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            if step == 2:
                before = {k: v.clone() for k, v in o.state[ps[0]].items()}, ps[0].detach().clone()
            scaler.step(o)
            scaler.update()
            o.zero_grad()
            if step == 2:
                assert all(torch.equal(v, before[0][k]) for k, v in o.state[ps[0]].items())
                assert torch.equal(ps[0].detach(), before[1])
    for p, q in zip(params, ref):
        assert torch.equal(bits(opt.master_param(p)), bits(opt_ref.state[q]["master_param"]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_muon(backend):
    """FusedMuon with remainders: matrices (2-d and 3-d) and AdamW params (a
    bias, a use_muon=False embedding) rebuild master_weights=True's masters
    bit for bit; state_dicts convert both ways; outside writes resync."""
    if backend not in TESTED:
        pytest.skip(f"{backend} does not run here")

    def model():
        torch.manual_seed(0)
        return [torch.randn(s).to(torch.bfloat16).requires_grad_() for s in ((16, 8), (2, 8, 12), (8,), (30, 4))]

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "use_muon": False}]

    params, ref = model(), model()
    opt = fusedopt.FusedMuon(groups(params), lr=0.02, backend=backend, master_weights="remainder")
    opt_ref = fusedopt.FusedMuon(groups(ref), lr=0.02, backend=backend, master_weights=True)
    run(opt, params, 4)
    run(opt_ref, ref, 4)
    for p, q in zip(params, ref):
        assert opt.state[p]["master_remainder"].dtype == torch.int16 and "master_param" not in opt.state[p]
        assert torch.equal(bits(opt.master_param(p)), bits(opt_ref.state[q]["master_param"]))
        assert torch.equal(bits(p), bits(remainder.split(opt.master_param(p))[0]))
    plain = fusedopt.FusedMuon(groups(ref), lr=0.02, backend=backend, master_weights=True)
    with torch.no_grad():  # the model's params first (a remainder completes its own param's bits), then the state
        for p, q in zip(params, ref):
            q.copy_(p)
    plain.load_state_dict(opt.state_dict())
    for p, q in zip(params, ref):
        assert torch.equal(bits(plain.state[q]["master_param"]), bits(opt.master_param(p)))
    again = fusedopt.FusedMuon(groups(params), lr=0.02, backend=backend, master_weights="remainder")
    again.load_state_dict(opt_ref.state_dict())
    for p, q in zip(params, ref):
        assert torch.equal(bits(again.master_param(p)), bits(opt_ref.state[q]["master_param"]))
    with torch.no_grad():
        params[0].mul_(2)  # an outside write torch counts: the new value is the master at the next step
    again._outside.resync(again.state)
    assert not again.state[params[0]]["master_remainder"].any()
    with pytest.raises(ValueError, match="float16"):
        fusedopt.FusedMuon([torch.zeros(4, 4, dtype=torch.float16, requires_grad=True)], master_weights="remainder")


@pytest.mark.parametrize("name", ["adamw", "lamb"])
@pytest.mark.parametrize("backend", backend_params())
def test_many_tensors(name, backend):
    """More tensors than a launch table's first rows and chunks of every size:
    the remainders' rows follow the params' in every slot."""
    cls, kwargs = FUSED[name]
    shapes = [(1 + (7 * i) % 130,) for i in range(many(backend, 300))]
    params = make_params(shapes, torch.bfloat16)
    ref = clone_params(params)
    opt = cls(params, backend=backend, master_weights="remainder", **kwargs)
    opt_ref = cls(ref, backend=backend, master_weights=True, **kwargs)
    run(opt, params, 3)
    run(opt_ref, ref, 3)
    for p, q in zip(params, ref):
        assert torch.equal(bits(opt.master_param(p)), bits(opt_ref.state[q]["master_param"]))
