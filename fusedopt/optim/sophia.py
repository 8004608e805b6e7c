"""FusedSophia (SophiaG, Liu et al. 2023) and the loss that feeds its
Gauss-Newton-Bartlett Hessian estimator."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FusedOptimizer
from .checks import GroupCheck, check_hyperparameters


class FusedSophia(FusedOptimizer):
    """SophiaG with the semantics of the authors' reference implementation::

        step():            g = -grad if maximize else grad;  step += 1
                           p *= 1 - lr * weight_decay
                           m = beta1 * m + (1 - beta1) * g
                           ratio = min(|m| / (rho * bs * h + 1e-15), 1)
                           p -= lr * sign(m) * ratio
        update_hessian():  h = beta2 * h + (1 - beta2) * grad * grad

    State per param: ``step``, ``exp_avg``, ``hessian`` (zeros at first use;
    ``master_weights``, ``state_dtype`` and ``max_grad_norm`` as in FusedAdamW;
    with ``state_dtype=torch.float8_e4m3fn`` both are block-scaled FP8 with
    ``exp_avg_scale`` / ``hessian_scale``, the hessian stored as its square
    root: see :mod:`fusedopt.reference.fp8_states`).
    ``step(closure=None, bs=None)``: ``bs=None`` uses the group's ``bs``.
    The documented loop (every k steps, on a batch of your choice)::

        loss = criterion(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        if step % k == k - 1:
            fusedopt.gnb_hessian_loss(model(x)).backward()
            opt.update_hessian()
            opt.zero_grad()

    ``update_hessian`` reads the grads as they are: under GradScaler, call
    ``scaler.unscale_(opt)`` before it. Each call is one launch per bucket.
    """

    _op = "sophia"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        maximize: bool = False,
        capturable: bool = False,
        bs: int = 5120,
        backend: str | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        check_hyperparameters(lr, 0.0, betas, weight_decay)
        if not 0.0 <= rho:
            raise ValueError(f"Invalid rho parameter: {rho}")
        if not bs > 0:
            raise ValueError(f"Invalid bs: {bs}")
        defaults = {"lr": lr, "betas": tuple(float(b) for b in betas), "rho": rho, "weight_decay": weight_decay,
                    "maximize": maximize, "capturable": capturable, "bs": bs}
        self._bs_override: int | None = None
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    def _elementwise_states(self, group, kind):
        return ("exp_avg", "hessian")

    def _check_group(self, group, where):
        check = GroupCheck(type(self).__name__, group, where).at_least(0.0, "lr", "rho", "weight_decay").betas()
        if not isinstance(group.get("bs"), numbers.Real) or not group["bs"] > 0:
            check.fail("bs", "must be a number > 0")

    def step(self, closure=None, bs: int | None = None):
        """One SophiaG step; `bs` (default: the group's) scales the Hessian
        estimate as in the authors' code (tokens per batch for GNB)."""
        if bs is not None and not (isinstance(bs, numbers.Real) and bs > 0):
            raise ValueError(f"Invalid bs: {bs!r} (a number > 0, or None for the group's)")
        self._bs_override = bs
        try:
            return super().step(closure)
        finally:
            self._bs_override = None

    @torch._disable_dynamo  # under torch.compile: eager, as FusedOptimizer._untraced_step
    @torch.no_grad()
    def update_hessian(self) -> None:
        """h = beta2 * h + (1 - beta2) * grad * grad for every param with a grad."""
        plans, writeback = self._plans_of_this_step()
        for group, plan in zip(self.param_groups, plans):
            for bucket in plan.buckets:
                if bucket.params:  # (none: DTensors with empty local shards)
                    self._backend_for(bucket.device).sophia_hessian(bucket, beta2=float(group["betas"][1]))
        for original, staged in writeback:
            original.copy_(staged)

    def _update(self, backend, group, bucket, lr, grad_mult, found_inf):
        bs = self._bs_override if self._bs_override is not None else group["bs"]
        backend.sophia(bucket, lr=lr, beta1=float(group["betas"][0]), rho_bs=float(group["rho"]) * float(bs),
                       weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
                       grad_mult=grad_mult, found_inf=found_inf)


def gnb_hessian_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The Gauss-Newton-Bartlett estimator's loss: cross-entropy of `logits`
    (..., classes) against labels sampled from their own softmax. Its gradient,
    squared, is the Hessian-diagonal estimate that update_hessian averages."""
    flat = logits.reshape(-1, logits.size(-1))
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(flat.float(), dim=-1), 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)
