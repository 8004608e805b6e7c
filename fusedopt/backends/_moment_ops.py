"""Element-wise optimizer ops over the moment-row table (_tables.MOMENT_ROWS),
each declared once.

A ``MomentOp`` names an op and its contract: its name in every backend (the
schema of ``fusedopt_cpu::<name>`` and ``fusedopt_cuda::<name>``, and
``launch_<name>`` in ``kernels/<name>.py``), its states in row order, its
hyperparameters and its per-tensor update in plain torch. Every backend
launches every declared op through one function of its own
(``_moment_launch``): an op declared here needs no wrapper in any backend, the
module's ``__getattr__`` binds ``backend.<name>`` on first use (``bind``).
Ops are declared beside their reference math, in ``fusedopt/reference/``.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable

#: the arguments every moment op takes besides its own hyperparameters
COMMON = ("lr", "maximize", "grad_mult", "found_inf")


@dataclass(frozen=True)
class MomentOp:
    name: str
    #: the bucket's states in MOMENT_ROWS order from the exp_avg row on; an absent one leaves its row empty
    states: tuple[str, ...]
    #: its own hyperparameters, by the names the optimizer passes and the kernels take (after COMMON's)
    hyper: tuple[str, ...]
    #: ``reference(work, grad, states, *, step, lr, maximize, grad_mult, **hyper)``: one tensor's update in
    #: place, in plain torch, on working copies (states: one per name of `states`, None where absent)
    reference: Callable
    #: states the update reads but does not write (Sophia's hessian)
    read_only: tuple[str, ...] = ()
    #: writes FP8 copies of the new weights (AdamW's fp8=); a launch then returns each weight's absmax
    fp8_copies: bool = False


_DECLARED: dict[str, MomentOp] = {}
_scanned = False


def declare(op: MomentOp) -> MomentOp:
    if _DECLARED.setdefault(op.name, op) is not op:
        raise ValueError(f"fusedopt: the moment op {op.name!r} is declared twice")
    return op


def declared() -> list[MomentOp]:
    """Every declared op, after importing every fusedopt.reference module once
    (where ops are declared)."""
    global _scanned
    if not _scanned:
        from .. import reference

        for module in pkgutil.iter_modules(reference.__path__):
            importlib.import_module(f"{reference.__name__}.{module.name}")
        _scanned = True
    return list(_DECLARED.values())


def lookup(name: str) -> MomentOp | None:
    """The op declared as `name`, or None."""
    return next((op for op in declared() if op.name == name), None)


def bind(module, name: str, launch, decorate=None):
    """``module.<name>`` for the op declared as `name`: ``launch(op, bucket,
    **hyperparameters)`` under the op's name and keyword signature (which
    _traced.bucket_op reads), decorated, and kept on the module so this runs
    once. AttributeError for a name no op is declared as, as for any missing
    attribute (a backend module's ``__getattr__`` calls this)."""
    op = None if name.startswith("_") else lookup(name)
    if op is None:
        raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

    def function(bucket, **hyper):
        return launch(op, bucket, **hyper)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"The {name} op ({op.reference.__module__}) on one bucket."
    keyword = inspect.Parameter.KEYWORD_ONLY
    function.__signature__ = inspect.Signature(
        [inspect.Parameter("bucket", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(arg, keyword) for arg in (*COMMON, *op.hyper)])
    if decorate is not None:
        function = decorate(function)
    setattr(module, name, function)
    return function
