"""What the kernels are handed, checked before a pointer is followed: never
a crash. Tensor subclasses they cannot take (a wrapper such as DTensor or
FakeTensor, whose data pointer is not its data) raise a clear error, from the
optimizers and norms first, then from the launch tables (triton, cuda); the
cpu ops, dispatcher ops, hand a subclass to its own dispatch (DTensor params
themselves are stepped on their local shards: tests/test_dtensor.py); a list
an op cannot do without, given empty, is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from optim_db import optimizers
from torch.testing._internal.two_tensor import TwoTensor

import fusedopt
from fusedopt.backends import _tables

OPTIMIZERS = [cls for cls, _ in optimizers(fused=True).values()]
SUBCLASS = "tensor subclass"


def wrapped(t):
    return TwoTensor(t.clone(), t.clone())


def test_optimizers_refuse_subclass_params_and_grads():
    p = torch.randn(4, 3, requires_grad=True)
    for cls in OPTIMIZERS:
        with pytest.raises(TypeError, match="intercepts torch's dispatch"):
            cls([wrapped(torch.randn(3))])
        opt = cls([p])
        p.grad = wrapped(torch.randn(4, 3))
        before = p.detach().clone()
        with pytest.raises((TypeError, RuntimeError), match="subclass"):
            opt.step()
        assert torch.equal(p.detach(), before) and not opt.state
    with pytest.raises(TypeError, match="intercepts torch's dispatch"):
        fusedopt.clip_grad_norm_([p], 1.0)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("backend", backend_params([b for b in KERNEL_BACKENDS if b != "cpu"]))
def test_backends_refuse_subclasses_in_a_launch(cls, backend, monkeypatch):
    """A bucket holding a subclass (the optimizer's checks bypassed): the
    launch table (triton, cuda) refuses it. (The cpu ops are dispatcher ops:
    a subclass gets them through its own __torch_dispatch__, below.)"""
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = cls(params, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    update = opt._update

    def sneaky(backend_module, group, bucket, *args):
        bucket.grads[0] = wrapped(bucket.grads[0])
        return update(backend_module, group, bucket, *args)

    monkeypatch.setattr(opt, "_update", sneaky)
    with pytest.raises((RuntimeError, TypeError), match=SUBCLASS):
        opt.step()


def test_cpu_ops_hand_subclasses_to_their_dispatch():
    """The cpu ops are torch.library ops with a CPU kernel and a fake one: a
    wrapper subclass (FakeTensor, DTensor, TwoTensor) is dispatched to its
    __torch_dispatch__, which decides (TwoTensor runs the op on each half),
    so the C++ kernels only ever see plain CPU tensors."""
    if "cpu" not in fusedopt.available_backends("cpu"):
        pytest.skip("the cpu backend does not build here")
    ops = torch.ops.fusedopt_cpu
    a, b = torch.randn(8), torch.randn(8)
    sums = ops.power_sums([TwoTensor(a, b)], 2.0, 100)
    assert isinstance(sums, TwoTensor)
    assert torch.equal(sums.a, ops.power_sums([a], 2.0, 100)) and torch.equal(sums.b, ops.power_sums([b], 2.0, 100))
    pair = TwoTensor(a.clone(), b.clone())
    ops.scale_([pair], torch.full((1,), 0.5, dtype=torch.float64), 100)
    assert torch.equal(pair.a, a * 0.5) and torch.equal(pair.b, b * 0.5)


def test_cuda_binding_refuses_subclasses(emulated_cuda_ops):
    """The cuda binding (its kernels emulated on the CPU here) checks the
    tables it is handed; launch_tables refuses a subclass before that."""
    x = torch.randn(8)
    with pytest.raises(TypeError, match=SUBCLASS):
        _tables.launch_tables([[wrapped(x)]], x.device, 256)
    tables = _tables.launch_tables([[x]], x.device, 256)
    partials, out = torch.empty(tables.n_chunks, dtype=torch.float64), torch.empty(1, dtype=torch.float64)
    args = tables.walk(first=True)
    for name in ("table", "numel", "chunk_tensor", "chunk_start", "chunk_first"):
        with pytest.raises(RuntimeError, match=SUBCLASS):
            emulated_cuda_ops.power_sums(**{**args, name: wrapped(args[name])}, dtype=0, p=2.0, partials=partials,
                                         out=out, stream=0)


def test_cpu_ops_refuse_missing_lists():
    """An empty list is an absent table row for the bindings: one an op needs is an error, not null pointers."""
    if "cpu" not in fusedopt.available_backends("cpu"):
        pytest.skip("the cpu backend does not build here")
    ops = torch.ops.fusedopt_cpu
    x, m, step = torch.randn(4, 4), torch.zeros(4, 4), torch.zeros(())
    hyper = (0.01, None, -0.8, 1e-30, 1e-3, 1.0, 0.0, False, None, None, None, None, 100)
    factors = ([torch.zeros(4, 1)], [torch.zeros(1, 4)], [])
    shape = torch.tensor([1, 4, 4, 4, 4])
    calls = {
        "adamw": lambda grads, steps: ops.adamw([x.clone()], grads, [m.clone()], [m.clone()], [], [], [], [], [], steps,
                                               [], [], None, 0.1, None, 0.9, 0.99, 1e-8, 0.0, False, False, None,
                                               None, None, 100),
        "lamb_moments": lambda grads, steps: ops.lamb_moments([x.clone()], grads, [m.clone()], [m.clone()], [], [],
                                                             [], steps, 0.9, 0.99, 1e-6, 0.0, True, True, True, False,
                                                             None, None, 100),
        "adafactor": lambda grads, steps: ops.adafactor([x.clone()], grads, [], [], *factors, [], steps,
                                                       torch.tensor([4]), torch.tensor([4]), *hyper),
        "adafactor_sharded": lambda grads, steps: ops.adafactor_sharded(0, [x.clone()], grads, [], [], *factors[:2], [],
                                                                       steps, shape, torch.tensor([16]), [], *hyper),
        "sophia": lambda grads, steps: ops.sophia([x.clone()], grads, [m.clone()], [m.clone()], [], [], [], steps, 0.1,
                                                 None, 0.9, 1.0, 0.0, False, None, None, None, 100),
    }
    for name, call in calls.items():
        for grads, steps, missing in (([], [step.clone()], "grads"), ([x.clone()], [], "steps")):
            with pytest.raises(RuntimeError, match=f"{missing} needs one tensor per param"):
                call(grads, steps)
    # adafactor_sharded's dims must be the tensor's: a batch count that overflows B * R * C is refused
    with pytest.raises(RuntimeError, match="does not match its dims"):
        ops.adafactor_sharded(0, [x.clone()], [x.clone()], [], [], *factors[:2], [], [step.clone()],
                              torch.tensor([2**62 + 1, 4, 4, 4, 4]), torch.tensor([16]), [], *hyper)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the cpu backend")
def test_cpu_ops_are_called_by_every_name_of_their_schema():
    """backends/cpu.py calls each op by argument name: a name missing, unknown
    or misspelt is a TypeError naming the op's arguments, before the op runs."""
    from fusedopt.backends import cpu

    xs = [torch.ones(3)]
    assert float(cpu._ops.power_sums(tensors=xs, p=2.0, chunk_size=100)[0]) == 3.0
    for kwargs in (dict(tensors=xs, p=2.0), dict(tensors=xs, p=2.0, chunk_size=100, extra=1),
                   dict(tensor=xs, p=2.0, chunk_size=100)):
        with pytest.raises(TypeError, match=r"fusedopt_cpu.power_sums takes \('tensors', 'p', 'chunk_size'\)"):
            cpu._ops.power_sums(**kwargs)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the cpu backend")
def test_held_ops_refuse_what_they_cannot_take():
    """The held tables' ops (fusedopt_held, backends/_held.py): a released or
    unknown handle, counts that do not cover the tensors, an argument the op
    does not take or one it needs are RuntimeErrors naming it; a held param
    without a grad fails `ready`, and `call` refuses it instead of reading it."""
    from fusedopt.backends import _held, cpu

    cpu.load()
    ops = torch.ops.fusedopt_held
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.ones(5)
    m, v, step = torch.zeros(5), torch.zeros(5), torch.zeros(())
    with pytest.raises(RuntimeError, match="counts exceed the tensors"):
        ops.create(["params"], [p], [2], [p], [])
    with pytest.raises(RuntimeError, match="1 tensors beyond the counts"):
        ops.create(["params"], [p, m], [1], [p], [])
    with pytest.raises(RuntimeError, match="2 names for 1 counts"):
        ops.create(["params", "steps"], [p], [1], [p], [])
    lists = dict(params=[p], exp_avgs=[m], exp_avg_sqs=[v], max_exp_avg_sqs=[], exp_avg_scales=[],
                 exp_avg_sq_scales=[], max_exp_avg_sq_scales=[], masters=[], steps=[step], fp8_weights=[],
                 fp8_scales=[])
    table = _held.Table(lists, [p])
    handle = table.handle
    args = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                sr_seed=None, chunk_size=100)
    tensors = dict(lr_tensor=None, grad_mult=None, found_inf=None, fp8_amax=None)
    with pytest.raises(RuntimeError, match="adamw takes no argument betas"):
        _held.call(table, "adamw", {**args, "betas": 0.5}, tensors)
    with pytest.raises(RuntimeError, match="adamw takes no argument scale"):
        _held.call(table, "adamw", args, {**tensors, "scale": torch.ones(1)})
    with pytest.raises(RuntimeError, match="adamw needs the argument eps"):
        _held.call(table, "adamw", {k: a for k, a in args.items() if k != "eps"}, tensors)
    assert torch.equal(m, torch.zeros(5)) and float(step) == 0.0  # refused before the op ran
    assert ops.ready([handle])
    _held.call(table, "adamw", args, tensors)
    assert float(step) == 1.0 and m.abs().sum() > 0
    p.grad = None
    assert not ops.ready([handle])
    with pytest.raises(RuntimeError, match="a held param has no grad"):
        _held.call(table, "adamw", args, tensors)
    ops.release(handle)
    with pytest.raises(RuntimeError, match=f"no held table {handle}"):
        ops.ready([handle])


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="needs the cpu backend")
def test_clip_scalars_refuses_bad_scalars():
    """fusedopt_cpu.clip_scalars takes a 1-element fp64 root and an fp32/fp64
    scale, else a RuntimeError saying which."""
    from fusedopt.backends import cpu

    cpu.load()
    op = torch.ops.fusedopt_cpu.clip_scalars
    for root, scale, what in ((torch.ones(2, dtype=torch.float64), None, "root"), (torch.tensor(1.0), None, "root"),
                              (torch.tensor(1.0, dtype=torch.float64), torch.tensor(2), "grad_scale"),
                              (torch.tensor(1.0, dtype=torch.float64), torch.ones(2), "grad_scale")):
        with pytest.raises(RuntimeError, match=what):
            op(root, scale, 1.0, False)


@pytest.mark.parametrize("backend", backend_params([b for b in ("triton", "cuda") if b in KERNEL_BACKENDS]))
def test_traced_ops_refuse_inconsistent_lists(backend):
    """The fusedopt_traced bucket ops (what a compiled step calls) refuse an
    empty launch and state lists that do not fit the params."""
    from fusedopt import backends

    module = backends.get(backend)
    assert module.TRACEABLE and callable(module.adamw)  # (binding adamw registers its op)
    op = getattr(torch.ops.fusedopt_traced, f"{backend}_adamw")
    none = [None] * 9
    with pytest.raises(ValueError, match="at least one param"):
        op([], [], [], [], [], False, [], [], [], torch.float32, None, None, none, none)
    with pytest.raises(RuntimeError, match="0 state tensors for 1 states of 1 params"):
        op([torch.zeros(3)], [torch.zeros(3)], ["exp_avg"], [], [], False, [torch.zeros(())], [], [], torch.float32,
           None, None, none, none)
