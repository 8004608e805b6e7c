"""What the kernels are handed, checked before a pointer is followed: never
a crash. Tensor subclasses they cannot take (a wrapper such as DTensor or
FakeTensor, whose data pointer is not its data) raise a clear error, from the
optimizers and norms first and from every binding too (DTensor params
themselves are stepped on their local shards: tests/test_dtensor.py); a list
an op cannot do without, given empty, is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, backend_params
from torch.testing._internal.two_tensor import TwoTensor

import fusedopt
from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB, FusedSophia
from fusedopt.backends import _tables

OPTIMIZERS = [FusedAdamW, FusedLAMB, FusedAdafactor, FusedSophia]
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
@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKENDS))
def test_backends_refuse_subclasses_in_a_launch(cls, backend, monkeypatch):
    """A bucket holding a subclass (the optimizer's checks bypassed): the
    binding (cpu) or the launch table (triton, cuda) refuses it."""
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


def test_cpu_ops_refuse_subclasses_in_every_tensor_argument():
    if "cpu" not in fusedopt.available_backends("cpu"):
        pytest.skip("the cpu backend does not build here")
    ops = torch.ops.fusedopt_cpu
    x = torch.randn(8)
    f64 = torch.ones(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=SUBCLASS):
        ops.power_sums([wrapped(x)], 2.0, 100)
    with pytest.raises(RuntimeError, match=SUBCLASS):
        ops.scale_([x.clone()], wrapped(f64), 100)
    fp8 = torch.empty(8, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match=SUBCLASS):
        ops.cast_fp8([x], [fp8], wrapped(torch.ones(1)), 100)
    history, scales, scale_inv = torch.zeros(1, 4), torch.ones(1), torch.ones(1)
    for i in range(4):
        args = [torch.ones(1, dtype=torch.float64), history, scales, scale_inv]
        args[i] = wrapped(args[i])
        with pytest.raises(RuntimeError, match=SUBCLASS):
            ops.fp8_update_(*args, None, 448.0, 0)
    step = torch.zeros(())
    lists = ([x.clone()], [x.clone()], [torch.zeros(8)], [torch.zeros(8)], [], [], [], [step])
    with pytest.raises(RuntimeError, match=SUBCLASS):
        ops.lamb_apply(*lists, wrapped(torch.ones(1)), 0.9, 0.99, 1e-6, 0.0, True, True, True, False, None, None, 100)
    with pytest.raises(RuntimeError, match=SUBCLASS):  # a scalar argument
        ops.lamb_moments(*lists, 0.9, 0.99, 1e-6, 0.0, True, True, True, False, wrapped(f64), None, 100)
    m = torch.randn(3, 4)
    rows, cols = torch.tensor([3]), torch.tensor([4])
    for i in range(2):
        shape_args = [rows, cols]
        shape_args[i] = wrapped(shape_args[i])
        with pytest.raises(RuntimeError, match=SUBCLASS):
            ops.adafactor([m.clone()], [m.clone()], [], [], [torch.zeros(3, 1)], [torch.zeros(1, 4)], [], [], [step],
                          *shape_args, 0.01, None, -0.8, 1e-30, 1e-3, 1.0, 0.0, False, None, None, None, None, 100)


def test_cuda_binding_refuses_subclasses(emulated_cuda_ops):
    """The cuda binding (its kernels emulated on the CPU here) checks the
    tables it is handed; launch_tables refuses a subclass before that."""
    x = torch.randn(8)
    with pytest.raises(TypeError, match=SUBCLASS):
        _tables.launch_tables([[wrapped(x)]], x.device, 256)
    tables = _tables.launch_tables([[x]], x.device, 256)
    partials, out = torch.empty(tables.n_chunks, dtype=torch.float64), torch.empty(1, dtype=torch.float64)
    args = [tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.chunk_first]
    for i in range(len(args)):
        bad = list(args)
        bad[i] = wrapped(bad[i])
        with pytest.raises(RuntimeError, match=SUBCLASS):
            emulated_cuda_ops.power_sums(*bad, tables.chunk_size, 0, 2.0, partials, out, 0)


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
