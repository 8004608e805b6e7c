"""Adafactor, one tensor at a time, in plain torch: the specification.

torch.optim.Adafactor's update (torch 2.13, torch/optim/_adafactor.py,
single-tensor path), operation for operation, so the reference equals torch;
plus an optional first moment (``beta1``: an average of the steps themselves,
the clipped update times alpha, as the authors' tensor2tensor code and HF
transformers keep it, Shazeer & Stern 2018) and
``grad_mult`` (GradScaler's 1/scale times a max_grad_norm clip coefficient)::

    g       = grad * grad_mult, negated when maximize
    t      += 1
    rho     = min(lr, 1 / sqrt(t));   alpha = max(eps2, RMS(p)) * rho      (RMS(p) before the decay)
    p      *= 1 - lr * weight_decay
    beta2_t = 1 - t^beta2_decay
    tensors of 2+ dims, factored over the last two (leading dims batched):
      row_var.lerp_(mean of g*g over the last dim, 1 - beta2_t)           [..., R, 1]
      col_var.lerp_(mean of g*g over dim -2,       1 - beta2_t)           [..., 1, C]
      var_est = row_var @ col_var / clamp(mean of row_var over dim -2, min=eps1)
    0-d and 1-d tensors:
      variance.lerp_(g*g, 1 - beta2_t);   var_est = variance
    u       = g * rsqrt(clamp(var_est, min=eps1 * eps1))                 eps1 = eps[0] or finfo(p.dtype).eps
    u       = u / max(1, RMS(u) / d)                                     (the clipped update)
    p      -= alpha * u                                                  (without beta1)
    m       = lerp(m, alpha * u, 1 - beta1);  p -= m                      (with beta1)

(alpha * u is formed as u * (alpha / max(1, RMS(u) / d)): the same per-tensor
factor the update without beta1 uses. m holds past steps each with its own
alpha, so a schedule or a drifting RMS(p) changes only the new steps.)

Empty tensors are skipped (torch divides by their zero size).

The kernels (csrc/include/fusedopt/adafactor.h, kernels/adafactor.py) run it
in three passes over a bucket: row/column sums of g*g and sum(p*p); sum(u*u)
(updating `variance` for unfactored tensors); the update (the cpu backend
folds the second into the first for factored tensors). For factored
tensors they form u as g * rsqrt(row / rmean) * rsqrt(col) (with the same
clamp), which moves the square roots and divisions from every element to
every row and column: the same value up to a few ulps.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def is_factored(p: Tensor) -> bool:
    return p.dim() > 1


def state_shapes(p: Tensor) -> dict[str, tuple[int, ...]]:
    """The second-moment state of a param, as torch.optim.Adafactor lays it out."""
    if is_factored(p):
        return {"row_var": (*p.shape[:-1], 1), "col_var": (*p.shape[:-2], 1, p.shape[-1])}
    return {"variance": tuple(p.shape)}


def scales(p_sq: Tensor, u_sq: Tensor, numel: Tensor, steps: Tensor, lr, eps2: float, d: float,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-tensor scale = -alpha / denom of the final update (in `dtype`, the math dtype), from
    sum(p^2), sum(u^2), the sizes and the step counts (1-D tensors on one
    device, no host sync): p += scale * u, or with beta1
    m = lerp(m, u * -scale, 1 - beta1), p -= m. The one place the Triton
    backend forms it (csrc/include/fusedopt/adafactor.h: adafactor_scale)."""
    steps, numel = steps.double(), numel.double()
    rho = steps.rsqrt()  # min(lr, 1/sqrt(step)), without turning a float lr into a device tensor
    rho = torch.minimum(rho, lr.double()) if isinstance(lr, Tensor) else rho.clamp(max=float(lr))
    alpha = torch.clamp(p_sq.sqrt() / numel.sqrt(), min=eps2) * rho
    denom = torch.clamp(u_sq.sqrt() / (numel.sqrt() * d), min=1.0)
    return (-alpha / denom).to(dtype)


def adafactor_update_(param: Tensor, grad: Tensor, row_var: Tensor | None, col_var: Tensor | None,
                      variance: Tensor | None, exp_avg: Tensor | None, *, step: float, lr: float,
                      beta2_decay: float, eps1: float, eps2: float, d: float, weight_decay: float, maximize: bool,
                      beta1: float | None = None, grad_mult: float | None = None,
                      stored: Callable[[str, Tensor], Tensor] | None = None) -> None:
    """One step of one tensor on working tensors (one dtype), in place.
    `step` is the step count after this step; `eps1` already resolved.

    `stored(name, t)` rounds working state tensor `name` in place to what its
    storage holds (bf16, or block-scaled FP8 for exp_avg) and returns it
    (None: stored as computed). It is applied where each state is updated,
    before the update reads it: the kernels store each state and read back
    what they stored.
    """
    stored = stored or (lambda name, t: t)
    if grad_mult is not None:
        grad = grad * grad_mult
    if maximize:
        grad = -grad
    one_minus_beta2_t = step**beta2_decay
    rho_t = min(lr, 1 / (step**0.5))
    alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if is_factored(grad):
        row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
        stored("row_var", row_var.lerp_(row_mean, one_minus_beta2_t))
        col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
        stored("col_var", col_var.lerp_(col_mean, one_minus_beta2_t))
        var_estimate = row_var @ col_var
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        stored("variance", variance.lerp_(grad * grad, one_minus_beta2_t))
        var_estimate = variance.clone()
    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(grad)
    denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
    if beta1 is None:
        param.add_(update, alpha=-alpha / denom)
    else:
        stored("exp_avg", exp_avg.lerp_(update.mul_(alpha / denom), 1 - beta1))
        param.sub_(exp_avg)
