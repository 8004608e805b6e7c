"""What every fusedopt optimizer checks of its arguments before building
anything: the options all take (check_options, check_state_dtype), the
constructors' hyperparameters with torch.optim's messages
(check_hyperparameters), and each param group's values at every step
(GroupCheck: values edited in param_groups are checked too)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends._dtypes import STATE_DTYPES


def check_options(max_grad_norm, master_weights) -> None:
    """The options every fusedopt optimizer takes, checked before anything is built."""
    if max_grad_norm is not None and not float(max_grad_norm) >= 0.0:
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (None or 0 turns clipping off)")
    # a number or another string is not silently taken as True
    if not isinstance(master_weights, bool) and master_weights != "remainder":
        raise ValueError(f"master_weights must be True, False or 'remainder', got {master_weights!r}")


def check_state_dtype(name: str, state_dtype) -> None:
    if state_dtype is None or state_dtype in STATE_DTYPES:
        return
    raise ValueError(f"{name}: state_dtype must be None, torch.bfloat16 or torch.float8_e4m3fn, got {state_dtype!r}")


class GroupCheck:
    """Checks of one param group's hyperparameters, each raising ValueError
    that names the optimizer, the group, the key and the value: what a step
    checks of values that may have been edited in param_groups since
    construction (the constructors check their arguments first, with torch's
    own messages). Tensor values are checked for being one real number, not
    for their value: that would be a host sync."""

    def __init__(self, optimizer: str, group: dict, where: str):
        self.optimizer, self.group, self.where = optimizer, group, where

    def fail(self, key: str, why: str):
        raise ValueError(f"{self.optimizer}: {self.where}: {key}={self.group.get(key)!r}: {why}")

    def number(self, key: str, value, low: float, high: float | None = None, *, high_open: bool = False):
        """`value` (of `key`) is a real number within [low, high] ([low, high) with high_open)."""
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                self.fail(key, "a tensor here must hold one real number")
            return self
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(key, "not a number")
        if not (low <= x and (high is None or (x < high if high_open else x <= high))):  # NaN fails too
            bound = "" if high is None else f" and {'<' if high_open else '<='} {high}"
            self.fail(key, f"must be >= {low}{bound}")
        return self

    def at_least(self, low: float, *keys: str) -> "GroupCheck":
        for key in keys:
            if key not in self.group:
                self.fail(key, "missing")
            self.number(key, self.group[key], low)
        return self

    def betas(self, n: int = 2) -> "GroupCheck":
        betas = self.group.get("betas")
        if isinstance(betas, (Tensor, str)) or not hasattr(betas, "__len__") or len(betas) != n:
            self.fail("betas", f"must be {n} numbers")
        for beta in betas:
            self.number("betas", beta, 0.0, 1.0, high_open=True)
        return self


def check_tensor_lr(lr) -> None:
    """torch.optim's check of an lr given as a tensor, with its message."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_hyperparameters(lr, eps: float, betas, weight_decay: float) -> None:
    """The checks torch.optim's Adam family makes, with its messages: a
    tensor lr of one element, betas a pair, every value in its range."""
    check_tensor_lr(lr)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {len(betas)} values")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")

