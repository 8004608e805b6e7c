"""Every fusedopt_cpu op, and every triton and cuda launch as the
fusedopt_traced op a compiled step calls, is a proper torch.library custom op:
torch.library.opcheck (schema and declared mutations, fake implementation,
AOT dispatch with dynamic shapes) on the arguments the optimizers really
pass, recorded from their steps; and torch.compile traces the ops as opaque
nodes (fullgraph) with the eager result."""
from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, TESTED_BACKENDS, backend_params
from helpers import grads_for
from optim_db import optimizers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import fusedopt
from fusedopt import Float8Recipe, FusedAdafactor, FusedAdamW, backends
from fusedopt.backends import _moment_ops, _traced
from fusedopt.backends._named_ops import op_names

pytestmark = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="needs the cpu backend")

FP8 = torch.float8_e4m3fn


def registered(namespace: str, prefix: str = "") -> set[str]:
    """The ops registered under `namespace` (whose names start with `prefix`): what the steps must exercise."""
    return {n for n in op_names(namespace) if n.startswith(prefix)}


class Recorder(TorchDispatchMode):
    """Each call of an op of `namespace` and a copy of its arguments as they were before it ran."""

    def __init__(self, namespace="fusedopt_cpu"):
        super().__init__()
        self.namespace = namespace
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == self.namespace:
            copy = tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, (args, kwargs or {}))
            self.calls.append((func, *copy))
        return func(*args, **(kwargs or {}))


def params(dtype=torch.float32, shapes=((5, 3), (7,), (2, 4, 3))):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def steps(opt, ps, n=2):
    for step in range(n):
        for p, g in zip(ps, grads_for(ps, step)):
            p.grad = g
        opt.step()
        if hasattr(opt, "update_hessian"):  # Sophia's second op
            opt.update_hessian()


def phased_adafactor():
    """The sharded Adafactor phases, in one process (tests/test_adafactor_sharded.py)."""
    from test_adafactor_sharded import PHASED, make, phased_step

    ps = make(torch.float32)
    opt = FusedAdafactor(ps, backend="cpu", beta1=0.9)
    for step in range(2):
        for p, g in zip(ps, grads_for(ps, step)):
            p.grad = g
        phased_step(opt, PHASED["cpu"])


def record(backend="cpu", namespace="fusedopt_cpu") -> list:
    """One call of each op per distinct configuration the steps below make."""
    with Recorder(namespace) as recorder:
        for cls, kwargs in optimizers(fused=True).values():  # each with every state, FP8 states, clipping
            ps = params()
            steps(cls(ps, backend=backend, **{**kwargs, "state_dtype": FP8, "max_grad_norm": 0.5}), ps)
            ps = params(torch.bfloat16)
            steps(cls(ps, backend=backend, **kwargs, master_weights=True), ps)
        ps = params(torch.bfloat16)
        steps(FusedAdamW(ps, backend=backend, master_weights=True, fp8=Float8Recipe()), ps)
        if backend == "cpu":
            phased_adafactor()
        ps = params()
        for p, g in zip(ps, grads_for(ps, 0, scale=8.0)):
            p.grad = g
        fusedopt.clip_grad_norm_(ps, 0.1, backend=backend)
        fusedopt.cast_to_fp8(ps, [2.0] * len(ps), backend=backend)
    return recorder.calls


CALLS = record() if "cpu" in CPU_BACKENDS else []


def test_every_op_is_exercised():
    """Every registered fusedopt_cpu op (a new one too) is among the recorded calls that the tests below check."""
    assert {func._schema.name.split("::")[1] for func, _, _ in CALLS} == registered("fusedopt_cpu")


IDS = [f"{func._schema.name.split('::')[1]}-{i}" for i, (func, _, _) in enumerate(CALLS)]


def has_fp8(args) -> bool:
    found = []
    tree_map(lambda a: found.append(a.dtype in (FP8, torch.float8_e5m2)) if isinstance(a, torch.Tensor) else a, args)
    return any(found)


@pytest.mark.parametrize("index", range(len(CALLS)), ids=IDS)
def test_opcheck(index):
    """torch's schema check compares tensors with ops FP8 lacks: calls that
    hold FP8 tensors get test_declared_mutations' byte comparison instead."""
    opcheck(*CALLS[index])


def opcheck(func, args, kwargs):
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(func, args, kwargs, test_utils=utils if has_fp8(args) else utils + ("test_schema",))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("index", range(len(CALLS)), ids=IDS)
def test_declared_mutations(index):
    """Every argument the kernel writes is declared mutable (Tensor(a!)) in
    its schema, and the call writes something (an in-place op that changes
    nothing would hide a dead kernel)."""
    check_declared_mutations(*CALLS[index])


def check_declared_mutations(func, args, kwargs):
    args = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)
    before = tree_map(lambda a: as_bytes(a) if isinstance(a, torch.Tensor) else a, args)
    func(*args, **kwargs)
    schema, written = func._schema, []
    for argument, now, then in zip(schema.arguments, args, before):
        tensors = now if isinstance(now, (list, tuple)) else [now]
        olds = then if isinstance(then, (list, tuple)) else [then]
        for t, old in zip(tensors, olds):
            if isinstance(t, torch.Tensor) and not torch.equal(as_bytes(t), old):
                declared = argument.alias_info is not None and argument.alias_info.is_write
                assert declared, f"{schema.name} writes {argument.name}, which its schema does not declare mutable"
                written.append(argument.name)
    assert written or schema.returns, f"{schema.name} returned nothing and wrote nothing"


def test_fake_outputs_match_the_kernels():
    """The fakes' shapes and dtypes are the real outputs' (opcheck compares
    them too; this names the op when one drifts)."""
    check_fake_outputs(CALLS)


def check_fake_outputs(calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for func, args, kwargs in calls:
        real = func(*tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args), **kwargs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = func(*tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, args),
                        **kwargs)
        shape = lambda out: out if out is None else tree_map(lambda t: (tuple(t.shape), t.dtype), out)  # noqa: E731
        assert shape(fake) == shape(real), func


def test_compiled_function_calls_the_ops_as_graph_nodes():
    """Dynamo traces a function calling the ops (fullgraph: no break, no
    data pointer read on fake tensors) and the result is eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def norm_then_scale(ts):
        sums = torch.ops.fusedopt_cpu.power_sums(ts, 2.0, 1 << 16)
        factor = (1.0 / sums.sum().sqrt()).reshape(1)
        torch.ops.fusedopt_cpu.scale_(ts, factor, 1 << 16)
        return sums

    ours, theirs = params(), params()
    ours, theirs = [p.detach() for p in ours], [p.detach() for p in theirs]
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(norm_then_scale, backend=counter, fullgraph=True)(ours)
    expected = norm_then_scale(theirs)
    assert counter.frame_count == 1 and counter.op_count >= 2
    torch.testing.assert_close(got, expected)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", backend_params([b for b in ("triton", "cuda") if b in TESTED_BACKENDS]))
def test_traced_ops(backend, monkeypatch):
    """The triton and cuda launches as the custom ops a compiled step calls
    (fusedopt_traced::<backend>_<op>), recorded from real steps with every
    launch routed through its op: each passes opcheck, writes only what its
    schema declares, and its fake gives the real output's shape."""
    monkeypatch.setattr(_traced, "_through_op", lambda: True)
    for op in _moment_ops.declared():  # (a declared op registers its traced op when the backend binds it)
        getattr(backends.get(backend), op.name)
    calls = record(backend, _traced.NAMESPACE)
    # every launch the backend declares traceable (a new one too) is recorded
    assert {func._schema.name.split("::")[1] for func, _, _ in calls} == registered(_traced.NAMESPACE, backend + "_")
    for call in calls:
        opcheck(*call)
        check_declared_mutations(*call)
    check_fake_outputs(calls)
