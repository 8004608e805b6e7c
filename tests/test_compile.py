"""torch.compile around fusedopt: a compiled training step (forward,
backward, opt.step(), an LR scheduler) and torch.compile(opt.step) give the
eager result, and nothing recompiles after the second step. The step runs
eagerly inside (a graph break at the call: see fusedopt/optim/base.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import fusedopt
from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB, FusedSophia

OPTIMIZERS = [(FusedAdamW, dict(lr=0.05, max_grad_norm=0.5)), (FusedLAMB, dict(lr=0.05, max_grad_norm=0.5)),
              (FusedSophia, dict(lr=0.05)), (FusedAdafactor, dict(lr=0.05))]


def setup(opt_class, kwargs, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = opt_class(model.parameters(), backend=backend, **kwargs)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)


def train_step(model, opt, x):
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("opt_class,kwargs", OPTIMIZERS, ids=[o.__name__ for o, _ in OPTIMIZERS])
def test_compiled_training_step_equals_eager(opt_class, kwargs, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, opt, sched = setup(opt_class, kwargs, backend)
    ref_model, ref_opt, ref_sched = setup(opt_class, kwargs, backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(train_step, backend=counter)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    frames = []
    for _ in range(5):
        compiled(model, opt, x)
        train_step(ref_model, ref_opt, x)
        sched.step()
        ref_sched.step()
        frames.append(counter.frame_count)
    assert frames[1] == frames[-1], f"recompiled after the second step: frames compiled per step {frames}"
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < kwargs["lr"]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for name, value in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("opt_class,kwargs", OPTIMIZERS, ids=[o.__name__ for o, _ in OPTIMIZERS])
def test_compiled_step_is_the_eager_step(opt_class, kwargs):
    """torch.compile(opt.step), as torch's docs advise for torch.optim: bit
    for bit the eager step, no recompilation as the lr changes."""
    from torch._dynamo.testing import CompileCounter

    model, opt, sched = setup(opt_class, kwargs, "cpu")
    ref_model, ref_opt, ref_sched = setup(opt_class, kwargs, "cpu")
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for m in (model, ref_model):
            m(x).square().mean().backward()
        step()
        ref_opt.step()
        for o, s in ((opt, sched), (ref_opt, ref_sched)):
            o.zero_grad()
            s.step()
    assert counter.frame_count <= 1
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_inductor_training_step_with_clipping():
    """The default backend (inductor) on a whole step with fusedopt's
    clip_grad_norm_ and FusedAdamW: the eager result (fp32 tolerance)."""
    model, opt, _ = setup(FusedAdamW, dict(lr=0.05), "cpu")
    ref_model = copy.deepcopy(model)
    ref_opt = FusedAdamW(ref_model.parameters(), lr=0.05, backend="cpu")

    def step(m, o, x):
        loss = m(x).square().mean()
        loss.backward()
        fusedopt.clip_grad_norm_(m.parameters(), 0.5)
        o.step()
        o.zero_grad()
        return loss

    compiled = torch.compile(step)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        torch.testing.assert_close(compiled(model, opt, x), step(ref_model, ref_opt, x), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
