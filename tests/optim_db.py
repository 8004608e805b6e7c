"""One entry per fusedopt optimizer, read by the tests that cover them all
(as torch's optim_db): its class, the arguments that exercise every state it
has, and what it supports. A new optimizer gets an entry here and is then
taken by the tests that import this module (CONTRIBUTING.md lists them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB, FusedMuon, FusedSophia


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: type
    #: besides lr: the arguments that switch on every state it keeps (amsgrad's max, Adafactor's first moment)
    kwargs: dict = field(default_factory=dict)
    #: each element's update depends on that element alone (ZeroOptimizer shards it flat)
    elementwise: bool = True
    #: a FusedOptimizer: bf16/FP8 states, stochastic rounding and master weights through the shared kernels
    fused: bool = True
    #: complex params stepped as pairs of reals
    complex: bool = True
    #: DTensor params (FSDP2, tensor parallel): tests/test_dtensor.py steps it on each layout
    dtensor: bool = True


OPTIM_DB = (
    OptimInfo("adamw", FusedAdamW, {"amsgrad": True, "weight_decay": 0.1}),
    OptimInfo("lamb", FusedLAMB, {"max_grad_norm": None}, elementwise=False),
    OptimInfo("sophia", FusedSophia, {"weight_decay": 0.1}),
    OptimInfo("adafactor", FusedAdafactor, {"beta1": 0.9}, elementwise=False, complex=False),
    OptimInfo("muon", FusedMuon, {"weight_decay": 0.1}, elementwise=False, fused=False, complex=False),
)


def optimizers(lr: float | None = None, **capabilities) -> dict[str, tuple[type, dict]]:
    """{name: (class, kwargs)} of the entries with every capability given
    (e.g. fused=True), kwargs with `lr` when given."""
    return {info.name: (info.cls, {**info.kwargs, **({} if lr is None else {"lr": lr})}) for info in OPTIM_DB
            if all(getattr(info, key) == value for key, value in capabilities.items())}
