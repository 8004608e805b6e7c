"""Master weights shared by FusedOptimizer and FusedMuon: which state holds a
param's master (fp32 ``master_param``, or with ``master_weights="remainder"``
an int16 ``master_remainder`` that completes the bf16 param,
fusedopt/reference/remainder.py), the fp32 master from either, their
conversion on load, and the outside writes a remainder cannot survive."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import dtensor
from ..backends._dtypes import LOW_PRECISION
from ..reference import remainder

#: the states a master may be kept in, with their dtypes
DTYPES = {"master_param": torch.float32, "master_remainder": torch.int16}


def name_of(master_weights, p: Tensor) -> str | None:
    """The state holding p's master under `master_weights` (True, False or "remainder"), or None."""
    if not master_weights or p.dtype not in LOW_PRECISION:
        return None
    return "master_remainder" if master_weights == "remainder" and p.dtype == torch.bfloat16 else "master_param"


def initial(p: Tensor, name: str) -> Tensor:
    """The master a param starts with: an fp32 copy, or a zero remainder (the
    bf16 bits are all of it); a DTensor param's has its layout."""
    lp = dtensor.local(p).detach()
    master = lp.to(DTYPES[name], memory_format=torch.preserve_format, copy=True)
    if name == "master_remainder":
        master.zero_()
    return dtensor.like(p, master) if dtensor.is_dtensor(p) else master


def fp32_of(p: Tensor, state: dict) -> Tensor | None:
    """p's fp32 master from its state: master_param itself, or a new tensor
    joined from p's bits and master_remainder; None without either."""
    if "master_param" in state:
        return state["master_param"]
    rem = state.get("master_remainder")
    if rem is None:
        return None
    master = remainder.join(dtensor.local(p).detach(), dtensor.local(rem))
    return dtensor.like(p, master) if dtensor.is_dtensor(p) else master


def master_param(master_weights, p: Tensor, state: dict) -> Tensor:
    """The optimizers' master_param(p): p's fp32 master (before its first
    step, p in fp32), or p itself when it keeps none."""
    if name_of(master_weights, p) is None:
        return p
    master = fp32_of(p, state)
    return master if master is not None else p.detach().to(torch.float32, copy=True)


def check_remainder_dtype(where: str, p: Tensor) -> None:
    """Raise ValueError for an fp16 param with master_weights="remainder"."""
    if p.dtype == torch.float16:
        raise ValueError(f"{where} is float16: master_weights='remainder' keeps an fp32 master as a bf16 param's "
                         f"bits and 16 more, which fp16's layout cannot; use master_weights=True")


def store_split_(p: Tensor, rem: Tensor, master: Tensor) -> None:
    """Write the fp32 `master` as p's bf16 bits and its remainder `rem` (in place)."""
    bits, low = remainder.split(dtensor.local(master).float())
    dtensor.local(p).detach().copy_(bits)
    dtensor.local(rem).copy_(low)


def convert_loaded(want: str | None, p: Tensor, state: dict, owner: str) -> list[tuple[Tensor, Tensor]]:
    """The loaded master in the form `want` names: an fp32 master is split
    into the bf16 param and its remainder (the param is rewritten: it differs
    from the master's round-to-nearest-even at exact ties), a remainder is
    joined with the param (loaded into the model before, as usual) into an
    fp32 master; with neither (a torch.optim checkpoint) the master is the
    param. `state`'s masters must be in p's layout (and int16 remainders as
    saved: torch's load casts them to the param's dtype). Returns the param
    writes, for the caller to make once every state is checked."""
    fp32, rem = state.pop("master_param", None), state.pop("master_remainder", None)
    if want is None:
        return []
    lp = dtensor.local(p)
    if want == "master_param":
        if fp32 is None and isinstance(rem, Tensor) and rem.shape == p.shape and rem.dtype == torch.int16:
            state["master_remainder"] = rem.to(p.device)
            fp32 = fp32_of(p, state)
            del state["master_remainder"]
        state[want] = fp32 if fp32 is not None else initial(p, want)
    elif isinstance(fp32, Tensor):
        if dtensor.local(fp32).shape != lp.shape:
            raise ValueError(f"{owner}.load_state_dict: master_param of shape {tuple(fp32.shape)} for a param of "
                             f"shape {tuple(p.shape)}")
        bits, low = remainder.split(dtensor.local(fp32).to(lp.device, torch.float32))
        state[want] = dtensor.like(p, low) if dtensor.is_dtensor(p) else low
        return [(lp.detach(), bits)]
    else:
        state[want] = rem if rem is not None else initial(p, want)  # (the step's checks judge a bad one)
    return []


def _version(p: Tensor) -> int:
    """The version counter of what the kernels write of p (a DTensor's local shard)."""
    return dtensor.local(p)._version


class OutsideWrites:
    """master_weights="remainder": a remainder completes the param's bits the
    optimizer left, so a param written since (where torch counts it: an
    in-place op on it, a model's load_state_dict; not a write through .data)
    is taken as its new master, its remainder zeroed, at the next step."""

    def __init__(self):
        self.versions: dict[Tensor, int] = {}  # each param's version when its remainder last matched it

    def resync(self, state: dict) -> None:
        """Zero the remainder of every param written since record()."""
        for p, version in self.versions.items():
            if _version(p) != version:
                dtensor.local(state[p]["master_remainder"]).zero_()

    def record(self, params, state: dict) -> None:
        """Remember the versions of `params` that have a remainder, as they are now."""
        self.versions = {p: _version(p) for p in params if "master_remainder" in state.get(p, ())}

    @staticmethod
    def zero(params, state: dict) -> None:
        """Zero the remainders of `params`: each is then its own master."""
        for p in params:
            rem = state.get(p, {}).get("master_remainder")
            if rem is not None:
                dtensor.local(rem).zero_()
