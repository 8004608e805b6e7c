"""FusedAdafactor: torch.optim.Adafactor's update with no host synchronisation,
all tensors of a bucket per launch, and an optional first moment."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import dtensor
from ..reference import adafactor as adafactor_spec
from ..backends._dtypes import SUPPORTED_PARAM_DTYPES
from .base import FusedOptimizer
from .checks import GroupCheck, check_tensor_lr


class _Sharded(NamedTuple):
    """The bucket kind of DTensor params sharded on some mesh dim: their
    statistics are summed over the shards between the passes."""

    factored: bool


def _factored(kind) -> bool:
    return kind.factored if isinstance(kind, _Sharded) else kind


class FusedAdafactor(FusedOptimizer):
    """Drop-in replacement for :class:`torch.optim.Adafactor` (torch 2.13).

    Same signature, defaults, validation, update and state layout (``step``;
    ``row_var`` ``[..., R, 1]`` and ``col_var`` ``[..., 1, C]`` for tensors of
    2+ dims, factored over the last two with leading dims batched;
    ``variance`` for 0-d and 1-d tensors), so state_dicts move between the
    two. The algorithm is written out in :mod:`fusedopt.reference.adafactor`.

    Beyond torch: no host synchronisation at all (torch calls ``.item()``
    several times per parameter per step: RMS(p), RMS(u) and the step count
    stay on the device here); empty tensors are skipped (torch divides by
    zero); ``beta1`` (default None) adds a first moment ``exp_avg`` of the
    steps: m = lerp(m, alpha * clipped update, 1 - beta1), p -= m, as the
    authors' tensor2tensor code and HF transformers keep it (a past step keeps
    the alpha it was taken with); ``eps=(None, ...)`` takes each tensor's own
    dtype's eps (torch: the first param's, for the whole group); and
    ``backend``, ``master_weights``, ``max_grad_norm`` and ``state_dtype`` as
    on the other fusedopt optimizers. ``state_dtype=torch.bfloat16`` stores
    every state in bf16: ``exp_avg`` and ``variance``, and also the factored
    ``row_var``/``col_var``, whose size, rows + columns, makes the saving nil
    but keeps one storage type per launch. ``state_dtype=torch.float8_e4m3fn``
    stores ``exp_avg`` block-scaled (:mod:`fusedopt.reference.fp8_states`: one
    fp32 scale per 256 elements, ``exp_avg_scale`` in the state); the
    second-moment statistics (``row_var``, ``col_var``, ``variance``) keep
    their default storage (the param's dtype, fp32 with master weights):
    factored they are rows + columns, and unfactored (biases, norms) small.
    Without ``beta1`` there is no ``exp_avg`` and FP8 changes nothing.
    ``foreach`` is accepted and ignored.

    Kernels: one pass reduces the row and column sums of g*g and sum(p*p),
    one reduces sum(u*u) (updating ``variance`` of unfactored tensors), one
    applies the update; each over all tensors of a bucket in one launch. The
    cpu backend forms sum(u*u) of a factored tensor from partial sums taken
    in the first pass (exact up to rounding whenever no element is clamped,
    and element by element otherwise), so it reads the grads twice, not
    three times (csrc/cpu/adafactor.cpp).
    """

    _op = "adafactor"
    _elementwise_update = False  # factored statistics and RMS clipping are per tensor
    _supports_complex = False  # as torch.optim.Adafactor: a RuntimeError at step
    _param_dtypes = SUPPORTED_PARAM_DTYPES
    _fp8_exempt_states = frozenset({"row_var", "col_var", "variance"})
    _reduced_dims = {"row_var": (-1,), "col_var": (-2,)}

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        beta1: float | None = None,
        backend: str | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        # torch.optim.Adafactor's checks, with its messages
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 should be None or in [0, 1) but is: {beta1}")
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        self.beta1 = beta1
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    def __getstate__(self):
        return dict(super().__getstate__(), beta1=self.beta1)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    def _bucket_kind(self, p):
        factored = adafactor_spec.is_factored(p)
        sharding = dtensor.sharding_of(p)
        return _Sharded(factored) if sharding is not None and sharding.groups() else factored

    def _launches_empty_shards(self, kind):
        # the sharded path takes them: the column statistics of a row-sharded matrix are replicated, and
        # every rank updates its copy, also one holding no rows
        return isinstance(kind, _Sharded)

    def _needs_contiguous(self, kind):
        return _factored(kind)  # factored kernels walk rows and columns

    def _elementwise_states(self, group, kind):
        first = ("exp_avg",) if self.beta1 is not None else ()
        return first if _factored(kind) else ("variance", *first)

    def _check_group(self, group, where):
        check = GroupCheck(type(self).__name__, group, where).at_least(0.0, "lr", "weight_decay").at_least(1.0, "d")
        check.number("beta2_decay", group.get("beta2_decay"), float("-inf"), 0.0)
        eps = group.get("eps")
        if isinstance(eps, (Tensor, str)) or not hasattr(eps, "__len__") or len(eps) != 2:
            check.fail("eps", "must be (eps1 or None, eps2)")
        if eps[0] is not None:
            check.number("eps", eps[0], 0.0)
        check.number("eps", eps[1], 0.0)

    def _shaped_states(self, group, p):
        return {k: v for k, v in adafactor_spec.state_shapes(p).items() if k != "variance"}

    def _update(self, backend, group, bucket, lr, grad_mult, found_inf):
        eps1, eps2 = group["eps"]
        # Sharded tensors go in phases with the collectives between them: the fused
        # launch updates row_var and col_var in the pass that sums the rows and
        # columns, where no collective fits.
        update = backend.adafactor_sharded if isinstance(bucket.kind, _Sharded) else backend.adafactor
        update(bucket, lr=lr, beta2_decay=float(group["beta2_decay"]), eps1=eps1, eps2=float(eps2),
               d=float(group["d"]), weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
               beta1=self.beta1, grad_mult=grad_mult, found_inf=found_inf)
