"""LAMB, one tensor at a time, in plain torch: the specification.

apex's FusedLAMB (You et al. 2019, "Large Batch Optimization for Deep
Learning"), with the step count kept per parameter as torch keeps it:

    G      = L2 norm of all grads of all groups (fp32; GradScaler's scale divided out)
    c      = G / max_grad_norm if max_grad_norm and G > max_grad_norm else 1
    per param with a grad (state: step, exp_avg, exp_avg_sq):
    step  += 1
    g      = grad * grad_mult, negated when maximize     (grad_mult = 1/c, times 1/scale)
    g      = g + weight_decay * p                         (unless adam_w_mode)
    m      = beta1 * m + beta3 * g                        (beta3 = 1 - beta1 if grad_averaging else 1)
    v      = beta2 * v + (1 - beta2) * g * g
    u      = (m / bc1) / (sqrt(v / bc2) + eps)           (bc = 1 - beta^step if bias_correction else 1)
    u      = u + weight_decay * p                         (adam_w_mode)
    ratio  = lr * ||p|| / ||u||  if (use_nvlamb or weight_decay != 0) and ||p|| != 0 and ||u|| != 0
             else lr
    p      = p - ratio * u

The kernels (csrc/include/fusedopt/lamb.h, kernels/lamb.py) run it in two
passes: one updates m and v and reduces ||p||^2 and ||u||^2 per tensor, the
next recomputes u and applies the trust ratio (recomputing u reads m and v, 8
bytes per param, exactly what storing u and reading it back would move, and
needs no buffer).
"""
from __future__ import annotations

import torch
from torch import Tensor


def clip_multiplier(total_norm: Tensor, max_norm: float) -> Tensor:
    """1/c: max_norm / G when G > max_norm, else 1 (on G's device)."""
    return torch.where(total_norm > max_norm, max_norm / total_norm, torch.ones_like(total_norm))


def moments_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float, beta2: float,
             weight_decay: float, adam_w_mode: bool, grad_averaging: bool, maximize: bool,
             grad_mult: float | None = None) -> None:
    """First pass, moments part: m and v in place (working tensors, one dtype)."""
    g = grad * grad_mult if grad_mult is not None else grad
    if maximize:
        g = -g
    if not adam_w_mode:
        g = g + weight_decay * param
    exp_avg.mul_(beta1).add_(g * (1.0 - beta1 if grad_averaging else 1.0))
    exp_avg_sq.mul_(beta2).add_(g * (1.0 - beta2) * g)


def direction(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, bias_correction: bool, adam_w_mode: bool) -> Tensor:
    """u, the update direction before the trust ratio."""
    bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if bias_correction else (1.0, 1.0)
    u = (exp_avg / bc1) / ((exp_avg_sq / bc2).sqrt() + eps)
    if adam_w_mode:
        u = u + weight_decay * param
    return u


def trust_ratio(param_sq_sum: Tensor, update_sq_sum: Tensor, lr, weight_decay: float, use_nvlamb: bool) -> Tensor:
    """Per-tensor ratio (fp32) from the sums of p^2 and u^2 (fp64, any shape):
    the one place every backend forms it."""
    lr = lr.double() if isinstance(lr, Tensor) else lr
    param_norm, update_norm = param_sq_sum.sqrt(), update_sq_sum.sqrt()
    ratio = lr * param_norm / update_norm
    # != 0 as apex tests it, not > 0: a NaN norm (a NaN grad without GradScaler)
    # makes the ratio, and so the whole tensor, NaN there too
    apply = (param_norm != 0) & (update_norm != 0)
    if not (use_nvlamb or weight_decay != 0):
        apply = torch.zeros_like(apply)
    fallback = lr if isinstance(lr, Tensor) else float(lr)  # a Python number: no host-to-device copy
    return torch.where(apply, ratio, fallback).float()
