"""Fake (meta) implementations of the fusedopt_cpu ops, for FakeTensor mode:
torch.compile traces them as opaque ops and torch.library.opcheck checks
them, neither of which may run the C++ kernels (they read data pointers).

The schemas (csrc/bindings_cpu.cpp) declare what each op mutates; a fake
only says what an op returns: nothing for the in-place ops (every op whose
schema returns nothing gets that fake), float64 vectors for the reductions,
sized as the C++ sizes them (_RETURNING).
"""
from __future__ import annotations

import math

import torch

from ._named_ops import op_names

_registered = False


def _doubles(size) -> torch.Tensor:
    return torch.empty(size, dtype=torch.float64)


def _empty() -> torch.Tensor:
    """A phase's unused output: a new tensor each time (no two outputs may alias)."""
    return _doubles(0)


def _in_place(*args, **kwargs) -> None:
    return None


def _power_sums(tensors, p, chunk_size):
    return _doubles(len(tensors))


def _clip_scalars(root, grad_scale, max_norm, fp64):
    return torch.empty((), dtype=torch.float64 if fp64 else torch.float32), torch.empty((), dtype=torch.float64)


def _cast_fp8(inputs, outputs, scales, chunk_size):
    return _doubles(len(inputs))


def _lamb_moments(params, *args):
    return _doubles(len(params)), _doubles(len(params))


def _adafactor_sharded(phase, params, grads, exp_avgs, variances, row_vars, col_vars, *args):
    """Phases 0-3 of the sharded update (backends/cpu.py: adafactor_sharded),
    three vectors, empty where a phase has nothing to give."""
    n = len(params)
    if not row_vars:  # 0-d / 1-d tensors: phase 0 gives |p|^2 and |u|^2, phase 3 nothing
        return (_doubles(n), _doubles(n), _empty()) if phase == 0 else (_empty(), _empty(), _empty())
    if phase == 0:
        return _doubles(sum(r.numel() for r in row_vars)), _doubles(sum(c.numel() for c in col_vars)), _doubles(n)
    if phase == 1:  # one row-variance sum per matrix slice
        return _doubles(sum(math.prod(p.shape[:-2]) for p in params)), _empty(), _empty()
    return (_doubles(n) if phase == 2 else _empty()), _empty(), _empty()


#: the fakes of the ops that return tensors
_RETURNING = {"power_sums": _power_sums, "cast_fp8": _cast_fp8, "clip_scalars": _clip_scalars,
              "lamb_moments": _lamb_moments, "adafactor_sharded": _adafactor_sharded}


def register() -> None:
    """Once, after the extension is loaded (the ops must exist)."""
    global _registered
    if _registered:
        return
    for name in sorted(op_names("fusedopt_cpu")):
        if name in _RETURNING:
            fake = _RETURNING[name]
        elif not getattr(torch.ops.fusedopt_cpu, name).default._schema.returns:
            fake = _in_place
        else:
            raise RuntimeError(f"fusedopt_cpu::{name} returns tensors but fusedopt/backends/cpu_fakes.py has no fake "
                               "for it (_RETURNING): torch.compile and opcheck need one")
        torch.library.register_fake(f"fusedopt_cpu::{name}")(fake)
    _registered = True
