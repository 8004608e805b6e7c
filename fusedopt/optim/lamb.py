"""FusedLAMB: apex's FusedLAMB semantics, with per-parameter steps as torch
keeps them, bf16/fp16 params and master weights, and max_grad_norm None or 0
meaning no clipping."""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import lamb as lamb_spec
from .base import FusedOptimizer
from .checks import GroupCheck, check_hyperparameters


class FusedLAMB(FusedOptimizer):
    """LAMB (You et al. 2019) as apex's FusedLAMB computes it::

        G = L2 norm of all grads of all groups (GradScaler's scale divided out)
        c = G / max_grad_norm if max_grad_norm and G > max_grad_norm else 1
        per param with a grad (state: step, exp_avg, exp_avg_sq):
            step += 1
            g = grad / c                                  (negated when maximize)
            g = g + weight_decay * p                      (unless adam_w_mode)
            m = beta1 * m + (1 - beta1 if grad_averaging else 1) * g
            v = beta2 * v + (1 - beta2) * g * g
            u = (m / bc1) / (sqrt(v / bc2) + eps)         (bc = 1 - beta^step if bias_correction else 1)
            u = u + weight_decay * p                      (adam_w_mode)
            ratio = lr * ||p|| / ||u|| if (use_nvlamb or weight_decay != 0) and ||p|| > 0 and ||u|| > 0
                    else lr
            p = p - ratio * u

    Kernels: the global norm (one reduction launch per bucket), then a pass
    that updates m and v and reduces ||p|| and ||u|| per tensor, then a pass
    that recomputes u and applies the trust ratio (recomputing reads m and v,
    8 bytes per param, the same as storing u and reading it back, without a
    buffer). Fixed against apex: ``.grad`` is never overwritten,
    ``max_grad_norm=None`` or 0 turns clipping off (apex zeroes every grad),
    bf16/fp16 params work (with ``master_weights`` and ``state_dtype`` as in
    FusedAdamW), and ``step`` lives per parameter, so state_dicts behave like torch's.
    """

    _op = "lamb"
    _elementwise_update = False  # the trust ratio is per tensor

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        use_nvlamb: bool = False,
        maximize: bool = False,
        backend: str | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        check_hyperparameters(lr, eps, betas, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(float(b) for b in betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "adam_w_mode": adam_w_mode,
            "grad_averaging": grad_averaging,
            "use_nvlamb": use_nvlamb,
            "maximize": maximize,
        }
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    def _elementwise_states(self, group, kind):
        return ("exp_avg", "exp_avg_sq")

    def _check_group(self, group, where):
        GroupCheck(type(self).__name__, group, where).at_least(0.0, "lr", "eps", "weight_decay").betas()

    def _clip_multiplier(self, total_norm, max_norm):
        return lamb_spec.clip_multiplier(total_norm, max_norm)

    def _join_statistics(self, group, bucket):
        # the one collective of a launch's ||p||^2 and ||u||^2 (Bucket.whole_tensor_sums), with no shards here
        zeros = torch.zeros(0, dtype=torch.float64, device=bucket.device)
        bucket.whole_tensor_sums(zeros, zeros)

    def _update(self, backend, group, bucket, lr, grad_mult, found_inf):
        beta1, beta2 = group["betas"]
        backend.lamb(bucket, lr=lr, beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), bias_correction=bool(group["bias_correction"]),
                     adam_w_mode=bool(group["adam_w_mode"]), grad_averaging=bool(group["grad_averaging"]),
                     use_nvlamb=bool(group["use_nvlamb"]), maximize=bool(group["maximize"]), grad_mult=grad_mult,
                     found_inf=found_inf)
