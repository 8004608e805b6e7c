"""stochastic_rounding=True: bf16 params without master weights rounded
stochastically. The rounding rule against its definition, the kernels against
the reference bit for bit, and what it is for: updates below half a bf16 ulp
still move the weights, on average by the right amount."""
from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from helpers import cross_on_triton, grads_for, make_params
from optim_db import optimizers

from fusedopt import FusedAdamW, FusedSophia
from fusedopt.reference import stochastic

OPTIMIZERS = optimizers(lr=1e-3, fused=True)
SHAPES = [(0,), (), (7,), (257,), (13, 70), (3, 4, 5)]


def steps(opt, params, n):
    for s in range(n):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        if isinstance(opt, FusedSophia) and s % 2:
            opt.update_hessian()
        opt.step()


def test_rounding_rule_is_exactly_unbiased():
    """Over all 2^16 values of the random bits, the mean of the rounded value
    is the fp32 value itself, exactly: P(up) = distance to the bf16 below / ulp."""
    x = torch.tensor([1.0 + 2.0**-10, -3.0 - 5 * 2.0**-12, 1e-30, 2.0**-130, 7.0, -0.0], dtype=torch.float32)
    noise = torch.arange(1 << 16, dtype=torch.int64)
    rounded = stochastic.round_bf16_stochastic(x[:, None].expand(-1, 1 << 16), noise[None, :].expand(len(x), -1))
    torch.testing.assert_close(rounded.double().mean(dim=1), x.double(), atol=0, rtol=1e-12)
    lo, hi = rounded.double().min(dim=1).values, rounded.double().max(dim=1).values
    assert torch.all(hi - lo <= x.double().abs() * 2.0**-7 + 2.0**-133)  # only the two neighbours occur


def test_rounding_rule_special_values():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0, -2.5, 0.0, 3.3895313892515355e38])
    for bits in (0, 0xFFFF, 0x8000):
        out = stochastic.round_bf16_stochastic(x, torch.full(x.shape, bits, dtype=torch.int64))
        assert out[0] == float("inf") and out[1] == float("-inf")
        assert out[2:3].view(torch.int16).item() == 0x7FC0
        assert out[3] == 1.0 and out[4] == -2.5 and out[5] == 0.0  # representable values never move
        assert out[6] == 3.3895313892515355e38  # the largest bf16 is representable


def test_hash_bits_are_uniform_enough():
    """The low 16 bits the kernels add: each of 16 buckets of [0, 2^16) within
    5 sigma of 1/16 over 2^16 consecutive offsets, and other tensors' keys
    give other bits."""
    bits = stochastic.random_bits(stochastic.tensor_key(12345, 0), torch.arange(1 << 16)) & 0xFFFF
    counts = torch.bincount(bits >> 12, minlength=16).double()
    expected = (1 << 16) / 16
    assert torch.all((counts - expected).abs() < 5 * expected**0.5)
    other = stochastic.random_bits(stochastic.tensor_key(12345, 1), torch.arange(1 << 16)) & 0xFFFF
    assert (bits == other).double().mean() < 0.01


def test_streams_of_two_keys_are_not_shifted_copies():
    """Two tensors (or two steps) draw unrelated noise: with the key XORed into
    the offset, tensor 1's bits at offset i ^ (key0 ^ key1) were tensor 0's at i."""
    k0, k1 = stochastic.tensor_key(7, 0), stochastic.tensor_key(7, 1)
    offsets = torch.arange(1 << 16)
    a, b = stochastic.random_bits(k0, offsets), stochastic.random_bits(k1, offsets ^ (k0 ^ k1))
    assert (a == b).double().mean() < 0.001


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
def test_kernels_draw_the_reference_bits(backend, name):
    """Same seed (torch.manual_seed), same bits: params identical to the
    reference, non-contiguous and multi-dimensional params included."""
    cls, kw = OPTIMIZERS[name]
    results = []
    for be in ("reference", backend):
        params = make_params(SHAPES, dtype=torch.bfloat16)
        params.append(torch.randn(12, 9, generator=torch.Generator().manual_seed(3)).bfloat16().t().requires_grad_())
        torch.manual_seed(7)
        opt = cls(params, backend=be, stochastic_rounding=True, **kw)
        steps(opt, params, 4)
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("backend", backend_params())
def test_updates_below_half_an_ulp_move_weights_on_average(backend):
    """With a constant grad AdamW moves every weight by lr per step (m/sqrt(v)
    = 1 after bias correction): at 1.0 that is a quarter of half a bf16 ulp
    (2^-8), so round-to-nearest freezes the weights, while stochastic
    rounding moves their mean by lr per step."""
    # the interpreter takes ~30 s here; test_kernels_draw_the_reference_bits proves triton's bits are the reference's
    cross_on_triton(backend, False, "its rounding is the reference's bit for bit (test_kernels_draw_the_reference_bits)")
    n, lr, n_steps = 4000, 2.0**-10, 8  # 5 sigma of the mean: 4.4e-4, against the 7.8e-3 it moves
    means = {}
    for sr in (False, True):
        w = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        torch.manual_seed(0)
        opt = FusedAdamW([w], lr=lr, weight_decay=0.0, backend=backend, stochastic_rounding=sr)
        for _ in range(n_steps):
            w.grad = torch.ones_like(w)
            opt.step()
        means[sr] = w.detach().double().mean().item()
    assert means[False] == 1.0
    expected = 1.0 - n_steps * lr
    # each step rounds to 1 - k*2^-8 for a k near the exact value: variance <= ulp^2 / 4 per element per step
    sigma = (n_steps * (2.0**-8) ** 2 / 4 / n) ** 0.5
    assert abs(means[True] - expected) < 5 * sigma


def test_repeatable_under_manual_seed_and_fresh_each_step():
    def run(seed):
        params = make_params([(5000,)], dtype=torch.bfloat16)
        torch.manual_seed(seed)
        opt = FusedAdamW(params, lr=1e-3, backend="reference", stochastic_rounding=True)
        seeds = []
        for s in range(3):
            params[0].grad = grads_for(params, s)[0]
            opt.step()
            seeds.append(opt._plans[0].buckets[0].sr_seed)
        return params[0].detach().clone(), seeds

    (a, seeds_a), (b, _), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(seeds_a)) == 3  # a fresh stream every step


@pytest.mark.parametrize("backend", backend_params())
def test_only_bf16_params_without_masters_are_rounded_stochastically(backend):
    """With master weights the param stays the master rounded to nearest; fp32
    and fp16 params are untouched by the flag."""
    for dtype, master in ((torch.bfloat16, True), (torch.float32, False), (torch.float16, False)):
        runs = []
        for sr in (False, True):
            params = make_params(SHAPES, dtype=dtype)
            opt = FusedAdamW(params, backend=backend, master_weights=master, stochastic_rounding=sr)
            steps(opt, params, 3)
            runs.append(params)
        for a, b in zip(*runs):
            assert torch.equal(a.detach(), b.detach()), (dtype, master)
