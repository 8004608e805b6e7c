"""Held tables: a bucket's tensor lists kept inside the cpu extension between
steps (csrc/bindings_cpu.cpp, ``fusedopt_held``), so that a steady-state
step costs the host about the same for 1000 tensors as for one.

A step of many small tensors is host work: passing a list of tensors to an op
costs ~0.25 us a tensor, and the per-tensor checks in Python that the cached
launch plan still holds cost as much again. With a held table the launch
passes a handle and the step's scalars; the extension reads the grads from
the params' ``.grad`` and checks them (``ready``: present, plain, contiguous,
of the param's dtype, device and shape; the params' storage unchanged;
params that had no grad still without), and a step whose check fails takes
the full path, which says what is wrong. Eager steps only: the ops behind a
handle are invisible to torch.compile, which traces the plain launches.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)
_overloads: dict = {}


def _op(name: str):
    """torch.ops.fusedopt_held.<name>'s overload, looked up once (a step calls two)."""
    op = _overloads.get(name)
    if op is None:
        op = _overloads[name] = getattr(torch.ops.fusedopt_held, name).default
    return op


def loaded() -> bool:
    """Whether the held ops are registered (the cpu extension is loaded)."""
    try:
        _op("create")
    except (AttributeError, RuntimeError):
        return False
    return True


def usable() -> bool:
    """Whether held tables may launch now: an eager step under no
    TorchDispatchMode (a mode, such as FakeTensorMode or a recorder, sees the
    ops that a held launch calls inside the extension only when there is a
    tensor argument to dispatch on: it gets the plain launches instead)."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def holdable(params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether a launch over (params, grads) can be held: plain params whose
    own .grad are the grads (not staged copies, real views of complex params
    or DTensor shards)."""
    return all(type(p) in _PLAIN and p.grad is g for p, g in zip(params, grads))


class Table:
    """A held table: `lists` (by the op's argument names), `params` (whose
    grads are the op's "grads") and `gradless`; released in the extension
    when this object is collected."""

    __slots__ = ("handle", "__weakref__")

    def __init__(self, lists: dict[str, list[Tensor]], params: list[Tensor], gradless: list[Tensor] = ()):
        names = list(lists)
        self.handle = _op("create")(names, [t for name in names for t in lists[name]],
                                    [len(lists[n]) for n in names], list(params), list(gradless))
        weakref.finalize(self, _release, self.handle)


def _release(handle: int) -> None:
    try:
        _op("release")(handle)
    except (AttributeError, RuntimeError):  # interpreter shutdown: the extension may be gone first
        pass


def ready(tables: list[Table]) -> bool:
    """Whether every held table's params and grads still fit it."""
    return _op("ready")([table.handle for table in tables])


def call(table: Table, op: str, scalars: dict, tensors: dict) -> list[Tensor]:
    """fusedopt_cpu::<op> on the held lists and grads, and the other
    arguments by name: `scalars` (numbers, bools, None) and `tensors`
    (tensors or None)."""
    return _op("call")(table.handle, op, list(scalars), list(scalars.values()), list(tensors),
                       list(tensors.values()))
