"""torch.compile around fusedopt: a compiled training step (forward,
backward, opt.step(), an LR scheduler) and torch.compile(opt.step) give the
eager result, and nothing recompiles after the second step. With a tensor lr
Dynamo traces the step into the graph as custom ops (fusedopt_cpu, and
fusedopt_traced for the triton and cuda launches; no graph break once the
states exist); with a float lr, whose every value a scheduler sets
would recompile a traced step, it runs eagerly behind a graph break
(FusedOptimizer._traced_plans)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from optim_db import optimizers

import fusedopt
from fusedopt import FusedAdamW, FusedLAMB

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: the step's code object is shared by
    every test, and Dynamo's per-code recompile limit would otherwise end in
    eager frames that no test asked for."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


#: every FusedOptimizer of optim_db, its states all switched on, clipping at 0.5
OPTIMIZERS = [(cls, {**kwargs, "max_grad_norm": 0.5}) for cls, kwargs in optimizers(lr=0.05, fused=True).values()]


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


@pytest.mark.parametrize("backend", backend_params())
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


def steps_side_by_side(x, step, run, ref_run, steps=4):
    """`steps` training steps of two (model, optimizer, scheduler) runs, the
    first stepping through `step` (a compiled opt.step), the other eagerly."""
    for _ in range(steps):
        for m in (run[0], ref_run[0]):
            m(x).square().mean().backward()
        step()
        ref_run[1].step()
        for _, o, s in (run, ref_run):
            o.zero_grad()
            s.step()


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
    steps_side_by_side(x, step, (model, opt, sched), (ref_model, ref_opt, ref_sched))
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


def tensor_lr_setup(opt_class, kwargs, backend="cpu"):
    """A model and an optimizer with a tensor lr (what a traced step reads at
    run time), one eager step made, so every state exists."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = opt_class(model.parameters(), backend=backend, **{**kwargs, "lr": torch.tensor(kwargs["lr"])})
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt, x


def scheduler(opt):
    return torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)


def assert_same_training(model, opt, ref_model, ref_opt):
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        for name, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][name], value), name


def graph_ops(backend: str) -> str:
    """The prefix of the graph nodes of `backend`'s launches: the cpu
    extension's ops, or the triton and cuda launches as custom ops
    (fusedopt/backends/_traced.py)."""
    return "fusedopt_cpu." if backend == "cpu" else f"fusedopt_traced.{backend}_"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # its wrapper is not what runs
@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("opt_class,kwargs", OPTIMIZERS, ids=[o.__name__ for o, _ in OPTIMIZERS])
def test_traced_step_has_no_graph_break(opt_class, kwargs, backend):
    """torch.compile(opt.step, fullgraph=True) with a tensor lr: the whole
    step (clip norm, update, step counts) is one graph of fusedopt ops,
    bit for bit the eager step, compiled once while a scheduler moves lr.
    (The scheduler is made after the compile: it wraps opt.step in a function
    Dynamo skips, a graph break of its own: test_scheduler_wrapper_...)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, opt, x = tensor_lr_setup(opt_class, kwargs, backend)
    ref_model, ref_opt, _ = tensor_lr_setup(opt_class, kwargs, backend)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    sched, ref_sched = scheduler(opt), scheduler(ref_opt)
    steps_side_by_side(x, step, (model, opt, sched), (ref_model, ref_opt, ref_sched))
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(op.startswith(graph_ops(backend)) for op in ops), ops  # the update is in the graph
    assert float(opt.param_groups[0]["lr"]) == float(ref_opt.param_groups[0]["lr"]) < kwargs["lr"]
    assert_same_training(model, opt, ref_model, ref_opt)
    if opt.max_grad_norm:
        assert torch.equal(opt.last_grad_norm, ref_opt.last_grad_norm)


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("opt_class,kwargs", OPTIMIZERS, ids=[o.__name__ for o, _ in OPTIMIZERS])
def test_traced_training_step(opt_class, kwargs, backend):
    """forward + backward + step + zero_grad compiled with a tensor lr (under
    inductor for FusedAdamW, aot_eager for the others: inductor compiles
    the same graph of fusedopt ops around another update op): the eager
    result, no recompilation as the scheduler moves lr."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, opt, x = tensor_lr_setup(opt_class, kwargs, backend)
    ref_model, ref_opt, _ = tensor_lr_setup(opt_class, kwargs, backend)
    sched, ref_sched = scheduler(opt), scheduler(ref_opt)
    counter = CompileCounterWithBackend("inductor" if opt_class is FusedAdamW else "aot_eager")
    compiled = torch.compile(train_step, backend=counter)
    frames = []
    for _ in range(4):
        torch.testing.assert_close(compiled(model, opt, x), train_step(ref_model, ref_opt, x), rtol=1e-5, atol=1e-6)
        sched.step()
        ref_sched.step()
        frames.append(counter.frame_count)
    assert frames[1] == frames[-1], f"recompiled after the second step: frames compiled per step {frames}"
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(op.startswith(graph_ops(backend)) for op in ops), ops  # the step is traced, not run eagerly
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_traced_step_follows_changes():
    """A traced step reads what the eager one would: a state replaced by
    load_state_dict, an edited hyperparameter, a param left without a grad,
    GradScaler's attributes; each is the eager result (Dynamo's guards and
    sources stand in for the plan cache's identity checks)."""
    kwargs = dict(lr=0.05, max_grad_norm=0.5)
    model, opt, x = tensor_lr_setup(FusedAdamW, kwargs)
    ref_model, ref_opt, _ = tensor_lr_setup(FusedAdamW, kwargs)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)

    def both(edit=lambda o, m: None, skip_grad=None):
        for o, m in ((opt, model), (ref_opt, ref_model)):
            m(x).square().mean().backward()
            if skip_grad is not None:
                list(m.parameters())[skip_grad].grad = None
            edit(o, m)
        step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert_same_training(model, opt, ref_model, ref_opt)

    both()
    saved = copy.deepcopy(ref_opt.state_dict())
    saved["state"][0]["exp_avg"].mul_(3.0)
    both(lambda o, m: o.load_state_dict(copy.deepcopy(saved)))  # new state tensors
    both(lambda o, m: o.param_groups[0].update(weight_decay=0.3))
    both(skip_grad=1)

    def scaler(o, m):
        o.grad_scale, o.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        for p in m.parameters():
            p.grad.mul_(4.0)

    both(scaler)
    both(lambda o, m: setattr(o, "found_inf", torch.tensor(1.0)))  # GradScaler's skipped step: nothing moves
    for o in (opt, ref_opt):
        del o.grad_scale, o.found_inf
    both()


def test_scheduler_wrapper_is_the_only_graph_break():
    """With a scheduler attached first (the usual order), torch's wrapper of
    opt.step is skipped by Dynamo (as for torch.optim's optimizers); the step
    inside is still one graph of fusedopt ops, compiled once."""
    from torch._dynamo.utils import counters

    model, opt, x = tensor_lr_setup(FusedLAMB, dict(lr=0.05, max_grad_norm=0.5))
    sched = scheduler(opt)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        model(x).square().mean().backward()
        step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all("lr_scheduler.py" in reason for reason in counters["graph_break"]), dict(counters["graph_break"])


@pytest.mark.parametrize("case", ["float_lr", "stochastic_rounding", "reference"])
def test_untraceable_steps_run_eagerly(case):
    """Where the step cannot be traced (a float lr a scheduler would bake in,
    a host-drawn rounding seed, a backend reading scalars on the host) it runs
    eagerly behind one graph break: the eager result, nothing traced."""
    from torch._dynamo.testing import CompileCounterWithBackend

    lr = torch.tensor(0.05) if case != "float_lr" else 0.05
    dtype = torch.bfloat16 if case == "stochastic_rounding" else torch.float32
    backend = "reference" if case == "reference" else "cpu"

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).to(dtype)
        return model, FusedAdamW(model.parameters(), lr=lr, backend=backend,
                                 stochastic_rounding=case == "stochastic_rounding")

    (model, opt), (ref_model, ref_opt) = make(), make()
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(opt.step, backend=counter)
    x = torch.randn(4, 8, dtype=dtype)
    for _ in range(3):
        for m in (model, ref_model):
            m(x).float().square().mean().backward()
        torch.manual_seed(7)
        step()
        torch.manual_seed(7)
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert counter.op_count == 0  # every launch ran eagerly
    assert_same_training(model, opt, ref_model, ref_opt)


@pytest.mark.parametrize("norm_type,backend", [(2.0, "cpu"), (1.0, "cpu"), (float("inf"), "cpu")] + [
    pytest.param(2.0, b.values[0], marks=b.marks) for b in backend_params(KERNEL_BACKENDS) if b.values[0] != "cpu"])
def test_traced_clip_grad_norm(norm_type, backend):
    """fusedopt.clip_grad_norm_ and grad_norm in a compiled function with
    fullgraph=True (after one eager call has chosen the backend): one graph of
    fusedopt ops, the eager norms and clipped grads bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(4, 8)

    def clip_and_norm():
        return (fusedopt.clip_grad_norm_(model.parameters(), 0.1, norm_type, backend=backend),
                fusedopt.grad_norm(model.parameters(), 3.0, per_tensor=True, backend=backend))

    model(x).square().sum().backward()
    clip_and_norm()  # eager: the backend is chosen (and built) once, outside any graph
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(clip_and_norm, backend=counter, fullgraph=True)
    for scale in (1.0, 3.0):
        model.zero_grad()
        (scale * model(x).square().sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm, (total, per_tensor) = compiled()
        clipped = [p.grad.clone() for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad.copy_(g)
        ref_norm, (ref_total, ref_per_tensor) = clip_and_norm()
        assert torch.equal(norm, ref_norm) and torch.equal(total, ref_total)
        assert torch.equal(per_tensor, ref_per_tensor)
        for p, c in zip(model.parameters(), clipped):
            assert torch.equal(p.grad, c)
    assert counter.frame_count == 1
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {graph_ops(backend) + "power_sums", graph_ops(backend) + "scale_"} <= {op.rsplit(".default", 1)[0]
                                                                                  for op in ops}, ops


def test_untraceable_clip_runs_eagerly():
    """The reference backend (and error_if_nonfinite, which reads the norm on
    the host) keep clip_grad_norm_ eager under torch.compile: its result."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 8)
    counter = CompileCounterWithBackend("eager")
    for kwargs in (dict(backend="reference"), dict(backend="cpu", error_if_nonfinite=True)):
        for m in (model, ref):
            m.zero_grad()
            m(x).square().sum().backward()
        clip = torch.compile(lambda: fusedopt.clip_grad_norm_(model.parameters(), 0.1, **kwargs), backend=counter)
        assert torch.equal(clip(), fusedopt.clip_grad_norm_(ref.parameters(), 0.1, **kwargs))
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
    assert counter.op_count == 0
