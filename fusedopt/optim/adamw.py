"""FusedAdamW: torch.optim.AdamW's update, fused into one kernel per bucket."""
from __future__ import annotations

import torch
from torch import Tensor

from ..fp8 import Float8Recipe, delayed_scaling_update_
from .base import FusedOptimizer
from .checks import GroupCheck, check_hyperparameters, check_tensor_lr


class FusedAdamW(FusedOptimizer):
    """Drop-in replacement for :class:`torch.optim.AdamW`.

    Same arguments, defaults, validation errors, update and state_dict layout
    as torch.optim.AdamW (torch 2.13), with:

    * ``backend``: "reference", "cpu", "triton" or "cuda" (default: automatic,
      see :mod:`fusedopt.backends`); ``opt.backend`` says which one runs.
    * ``master_weights``: for bf16/fp16 params, keep an fp32 copy of each param
      in ``state["master_param"]`` and fp32 moments; the step reads the master,
      the low-precision grad and the moments and writes the master, the moments
      and the param (the new master rounded once, to nearest even) in one pass.
      fp32/fp64 params ignore it. ``"remainder"`` (bf16 params): the same fp32
      masters, kept as the param and its low 16 bits in
      ``state["master_remainder"]`` (int16), the param rounded from the master
      with ties away from zero (fusedopt/optim/masters.py;
      ``master_param(p)`` returns the fp32 master).
    * ``state_dtype``: None (default: moments in the param's dtype, as torch;
      fp32 with master weights) or ``torch.bfloat16``: the moments are stored
      in bf16, rounded to nearest even at every store and widened to fp32 for
      the math inside the kernel. Halves the moments' memory and traffic; the
      params (and masters) keep their precision. state_dict holds the moments
      as stored; loading an fp32 state_dict (torch.optim.AdamW's) rounds them
      once. ``torch.float8_e4m3fn``: block-scaled FP8 moments
      (:mod:`fusedopt.reference.fp8_states`): each moment is stored as e4m3fn
      values of the param's shape plus one fp32 scale per 256 elements
      (``state["exp_avg_scale"]``, ...), recomputed from the block's absmax at
      every store (round to nearest even). ``exp_avg_sq`` and ``max_exp_avg_sq``
      hold the square root of the second moment (decoded as s * s), which keeps
      it within e4m3's range. 2.03 bytes per param for both moments instead of
      8; states are always contiguous (a channels_last param is staged). Like
      any 3-bit-mantissa state, an EMA step smaller than half an fp8 ulp of the
      value (about 3-6%) is lost to rounding: with beta2 = 0.999 the second
      moment then follows rises in the gradients' scale but decays slowly.
    * ``stochastic_rounding``: bf16 params without master weights get the new
      value rounded stochastically (16 random bits added below bf16's, then
      truncated: unbiased, so updates below half a bf16 ulp still move the
      weights on average) instead of to nearest. The bits are a hash of a
      per-launch seed drawn from torch's default generator (``torch.manual_seed``
      makes runs repeatable), the tensor and the element: every backend draws
      the same ones (:mod:`fusedopt.reference.stochastic`). Other params are
      unaffected. Under CUDA-graph capture the seed is fixed at capture.
    * ``fp8``: a :class:`fusedopt.Float8Recipe`. The pass that updates each
      fp32 weight (the master with ``master_weights=True``, or an fp32 param)
      also writes an FP8 copy of it, ``saturate(w * scale)``, with delayed
      scaling (the recipe's docstring); ``opt.fp8_weight(p)`` returns
      ``(fp8_tensor, scale_inv)``. bf16/fp16 params need master weights.
    * ``max_grad_norm``: clip by the global L2 norm of all grads (all groups)
      inside ``step()``: the same as ``torch.nn.utils.clip_grad_norm_(params,
      max_grad_norm)`` before the step, but the coefficient is applied inside
      the update kernel (one norm pass + the update pass; ``.grad`` is never
      rewritten). ``opt.last_grad_norm`` holds the norm (a device tensor,
      fp32, fp64 when some grads are; of the unscaled grads under GradScaler).
      None or 0: no clipping.
    * ``foreach`` and ``fused`` are accepted (and validated as torch does) but
      change nothing: the step is always fused. ``differentiable=True`` is not
      supported. Tensor ``betas`` are accepted as torch accepts them, but read
      to the host at every step (on CUDA a sync, refused under CUDA-graph
      capture); a tensor ``lr`` is read on the device.

    The update, per element, in fp32 (fp64 for fp64 params)::

        g = grad * grad_mult, negated when maximize   (grad_mult: 1/GradScaler scale x clip coefficient)
        p = p * (1 - lr * weight_decay)
        m = lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        vmax = max(vmax, v)                                  (amsgrad)
        p = p - lr / (1 - beta1^step) * m / (sqrt(vmax or v) / sqrt(1 - beta2^step) + eps)

    GradScaler: ``scaler.step(opt)`` passes the scale and the inf flag to the
    kernel, which unscales while updating and, when an inf/NaN was found,
    leaves params, states and steps untouched, without a host sync. Grads are
    never modified.
    """

    _op = "adamw"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        fp8: Float8Recipe | None = None,
    ) -> None:
        if differentiable:
            raise NotImplementedError(
                "FusedAdamW does not support differentiable=True (its update runs in fused kernels that "
                "autograd cannot see); use torch.optim.AdamW(differentiable=True)."
            )
        _check_adam_args(lr, betas, eps, weight_decay, foreach, capturable, fused)
        if fp8 is not None and not isinstance(fp8, Float8Recipe):
            raise TypeError(f"fp8 must be a fusedopt.Float8Recipe or None, got {type(fp8).__name__}")
        defaults = {
            "lr": lr,
            "betas": tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": True,
        }
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding, fp8=fp8)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group["decoupled_weight_decay"] = True

    def _elementwise_states(self, group, kind):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _check_group(self, group, where):
        GroupCheck(type(self).__name__, group, where).at_least(0.0, "lr", "eps", "weight_decay").betas()

    def _update(self, backend, group, bucket, lr, grad_mult, found_inf):
        beta1, beta2 = group["betas"]
        amax = backend.adamw(bucket, lr=lr, beta1=_host_beta(beta1), beta2=_host_beta(beta2), eps=float(group["eps"]),
                             weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
                             maximize=bool(group["maximize"]), grad_mult=grad_mult, found_inf=found_inf)
        if bucket.fp8 is not None:
            delayed_scaling_update_(self.fp8, bucket.fp8, amax, found_inf, backend)


def _host_beta(beta) -> float:
    """A beta as the kernels take it: a Python float. A tensor beta is read to
    the host (a sync for a CUDA tensor), which a CUDA-graph capture cannot do:
    that is refused with the reason instead of failing inside CUDA."""
    if isinstance(beta, Tensor) and beta.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("FusedAdamW: tensor betas are read on the host at every step, which a CUDA graph "
                           "cannot capture; pass betas as floats (a tensor lr is fine: it is read on the device)")
    return float(beta)


def _check_adam_args(lr, betas, eps, weight_decay, foreach, capturable, fused) -> None:
    """torch.optim.Adam(W)'s argument checks (torch 2.13), with its messages."""
    if isinstance(lr, Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    check_tensor_lr(lr)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {len(betas)} values")
    for i, beta in enumerate(betas):  # before the range check: a 2-element tensor has no truth value
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
    check_hyperparameters(lr, eps, betas, weight_decay)
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
