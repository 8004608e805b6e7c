"""SophiaG, one tensor at a time, in plain torch: the specification.

The authors' reference implementation (Liu et al. 2023, "Sophia: A Scalable
Stochastic Second-order Optimizer for Language Model Pre-training",
github.com/Liuhong99/Sophia, SophiaG), operation for operation::

    step():           g = grad * grad_mult, negated when maximize;  step += 1
                      p *= 1 - lr * weight_decay
                      m = m * beta1 + (1 - beta1) * g                  (torch's add_(alpha=): one FMA)
                      ratio = clamp(|m| / (rho * bs * h + 1e-15), max=1)
                      p += (-lr) * sign(m) * ratio                     (torch's addcmul_: one FMA)
    update_hessian(): h = h * beta2 + (1 - beta2) * grad * grad        (raw grads: unscale them first)

The kernels (csrc/include/fusedopt/sophia.h, kernels/sophia.py) spell the same
operations in the same order.
"""
from __future__ import annotations

from torch import Tensor

from ..backends._moment_ops import MomentOp, declare


def sophia_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, hessian: Tensor, *, lr: float, beta1: float,
                   rho: float, bs: float, weight_decay: float, maximize: bool, grad_mult: float | None = None) -> None:
    """One step of one tensor on working tensors (one dtype), in place."""
    if grad_mult is not None:
        grad = grad * grad_mult
    if maximize:
        grad = -grad
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    ratio = (exp_avg.abs() / (rho * bs * hessian + 1e-15)).clamp(None, 1)
    param.addcmul_(exp_avg.sign(), ratio, value=-lr)


def hessian_update_(hessian: Tensor, grad: Tensor, *, beta2: float) -> None:
    """The Gauss-Newton-Bartlett (or Hutchinson) estimate's moving average."""
    hessian.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _update(work: Tensor, grad: Tensor, states, *, step: float, rho_bs: float, **hyper) -> None:
    exp_avg, hessian = states
    sophia_update_(work, grad, exp_avg, hessian, rho=rho_bs, bs=1.0, **hyper)  # (rho * bs: the same double)


#: FusedSophia's step (the Hessian's update is its own op, sophia_hessian)
OP = declare(MomentOp("sophia", states=("exp_avg", "hessian"), hyper=("beta1", "rho_bs", "weight_decay"),
                      reference=_update, read_only=("hessian",)))
