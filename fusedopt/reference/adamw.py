"""AdamW, one tensor at a time, in plain torch: the specification.

Exactly torch.optim.AdamW's update (torch/optim/adam.py, single-tensor path,
``decoupled_weight_decay=True``), operation for operation, so the reference
equals torch in fp32 and fp64; the kernels (csrc/include/fusedopt/adamw.h,
kernels/adamw.py) spell the same operations in the same order:

    g      = grad * grad_mult, negated when maximize
    p      = p * (1 - lr * weight_decay)
    m      = lerp(m, g, 1 - beta1)
    v      = v * beta2 + (1 - beta2) * g * g
    vmax   = max(vmax, v)                          (amsgrad: max of the raw v)
    denom  = sqrt(amsgrad ? vmax : v) / sqrt(1 - beta2^step) + eps
    p      = p - (lr / (1 - beta1^step)) * m / denom
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends._moment_ops import MomentOp, declare


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                  max_exp_avg_sq: Tensor | None, *, step: float, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, maximize: bool, grad_mult: float | None = None) -> None:
    """One AdamW step on working tensors (all the same dtype), in place.

    `step` is the step count after this step (1 on the first step).
    `grad_mult` multiplies the grad: GradScaler's 1/scale times the clip
    coefficient of max_grad_norm (for GradScaler's power-of-two scales the
    same bits as torch's division by the scale).
    """
    if grad_mult is not None:
        grad = grad * grad_mult
    if maximize:
        grad = -grad
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)

    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _update(work: Tensor, grad: Tensor, states, *, step: float, amsgrad: bool, **hyper) -> None:
    exp_avg, exp_avg_sq, max_exp_avg_sq = states
    adamw_update_(work, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, step=step, **hyper)


#: FusedAdamW's op (amsgrad switches on the max_exp_avg_sq row)
OP = declare(MomentOp("adamw", states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                      hyper=("beta1", "beta2", "eps", "weight_decay", "amsgrad"), reference=_update, fp8_copies=True))
