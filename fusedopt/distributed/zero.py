"""ZeRO stage 1/2: each rank keeps the optimizer state (and fp32 masters) of
1/N of the params.

Layout. The params of each param group are laid out, per (device, dtype), in
one flat buffer (registration order, zero-padded to a multiple of the world
size N) and every param becomes a view of it. The buffer is cut into N equal
contiguous shards (torch.chunk boundaries, no per-param rounding); rank r owns
shard r. The inner optimizer (``optimizer_class``, default FusedAdamW) is built
on this rank's shards only: one 1-d tensor per flat buffer, so its states and
masters are 1/N of the total.

Step. Grads go through GradBuckets with the same layout (one bucket per flat
buffer, so a bucket's shard r is exactly rank r's param shard):
  stage 1  all-reduce: every rank holds the full mean grads; its shard's part
           is the inner optimizer's grad (a view, no copy)
  stage 2  reduce-scatter: each rank receives only its shard of the mean grad
then the inner step updates this rank's shard of the flat params in place and
an all-gather per flat buffer brings every rank the whole updated params.

``max_grad_norm`` clips by the true global norm: each rank's partial sum of
squares over its own shards is all-reduced (the padding is zero). GradScaler's
found_inf is all-reduced too, so every rank skips a step together.

Not yet (see issue 6's notes): overlap finer than one bucket per flat buffer
(``bucket_cap_mb`` and ``overlap_comm`` are accepted and not used yet), freeing
the full grad buffer in stage 2, and DTensor-sharded, resharding checkpoints:
``state_dict()`` is this rank's shard and loads only at the same world size.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.adamw import FusedAdamW
from ..optim.base import FusedOptimizer
from . import _collectives as comm
from .grad_buckets import GradBuckets


class _Flat:
    """One flat buffer of params (one group, device, dtype) and this rank's shard of it."""

    def __init__(self, params: list[Tensor], world: int, rank: int):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        padded = -(-n // world) * world if n else world
        self.buffer = torch.zeros(padded, dtype=params[0].dtype, device=params[0].device)
        for p, o in zip(params, self.offsets):
            view = self.buffer[o:o + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view  # the module keeps its Parameter objects; their storage is now the flat buffer
        size = padded // world
        self.start, self.end = rank * size, (rank + 1) * size
        self.shard = self.buffer[self.start:self.end]  # the inner optimizer's param


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer_class=None, *, stage: int = 2, process_group=None,
                 bucket_cap_mb: float = 25, overlap_comm: bool = True, **optimizer_kwargs):
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer: stage must be 1 or 2, got {stage!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs torch.distributed initialized (dist.init_process_group)")
        if optimizer_class is None:
            optimizer_class = FusedAdamW
        if not issubclass(optimizer_class, FusedOptimizer):
            raise TypeError(f"ZeroOptimizer: optimizer_class must be a fusedopt optimizer (it takes the clip "
                            f"coefficient and GradScaler's flags in-kernel), got {optimizer_class.__name__}")
        groups = list(params)
        if not groups:
            raise ValueError("ZeroOptimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.stage, self.group = stage, process_group
        self.world, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self.bucket_cap_mb, self.overlap_comm = bucket_cap_mb, overlap_comm
        self.max_grad_norm = optimizer_kwargs.pop("max_grad_norm", None) or None
        #: the global grad norm of the last step (a tensor), with max_grad_norm
        self.last_grad_norm: Tensor | None = None

        self.flats: list[_Flat] = []
        inner_groups = []
        for group in groups:
            members = [p for p in group["params"] if p.requires_grad]
            keys = OrderedDict()
            for p in members:
                keys.setdefault((p.device, p.dtype), []).append(p)
            flats = [_Flat(ps, self.world, self.rank) for ps in keys.values()]
            self.flats += flats
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": [f.shard for f in flats]})
        self.optimizer = optimizer_class(inner_groups, **optimizer_kwargs)
        self.grads = GradBuckets([p for f in self.flats for p in f.params], process_group=process_group,
                                 mode="all_reduce" if stage == 1 else "reduce_scatter",
                                 layout=[f.params for f in self.flats])
        # what torch.optim.Optimizer.__init__ would set (not called: the groups are the inner optimizer's)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#ZeroOptimizer.zero_grad"

    _step_supports_amp_scaling = True

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    def no_sync(self):
        """Accumulate grads over several backward passes without communicating."""
        return self.grads.no_sync()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.grads.wait()
        for flat, bucket in zip(self.flats, self.grads.buckets):
            if self.stage == 1:
                flat.shard.grad = bucket.buffer[flat.start:flat.end]
            else:
                flat.shard.grad = bucket.shard
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:  # every rank skips together
            found_inf = torch.as_tensor(found_inf, dtype=torch.float32, device=self.flats[0].buffer.device).clone()
            comm.all_reduce(found_inf, self.group)
            self.optimizer.found_inf = (found_inf > 0).to(torch.float32)
        if self.max_grad_norm:
            grad_scale = self._clip(grad_scale)
        if grad_scale is not None:
            self.optimizer.grad_scale = grad_scale
        try:
            self.optimizer.step()
        finally:
            for name in ("grad_scale", "found_inf"):
                if hasattr(self.optimizer, name):
                    delattr(self.optimizer, name)
        for flat in self.flats:  # every rank gets every updated shard
            comm.all_gather(flat.buffer, flat.shard.clone(), self.group)
        return loss

    def _clip(self, grad_scale: Tensor | None) -> Tensor:
        """torch's clip_grad_norm_ rule on the global norm: the grads are to be
        multiplied by min(1, max_norm / (norm + 1e-6)). Returned as the grad
        scale the inner (fused) optimizer divides by, so no grad is modified."""
        shards = [f.shard.grad for f in self.flats]
        device = shards[0].device
        squares = torch.zeros((), dtype=torch.float64, device=device)
        for g in shards:
            squares += g.detach().double().square().sum().to(device)
        comm.all_reduce(squares, self.group)
        scale = torch.ones((), dtype=torch.float64, device=device) if grad_scale is None else \
            grad_scale.to(device=device, dtype=torch.float64).reshape(())
        total = squares.sqrt() / scale
        self.last_grad_norm = total.to(torch.float32)
        coefficient = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        return (scale / coefficient).to(torch.float32)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for flat in self.flats:
            for p in flat.params:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
            flat.shard.grad = None

    def state_dict(self) -> dict:
        """This rank's shard of the state (loads back at the same world size only, for now)."""
        return {"world_size": self.world, "rank": self.rank, "stage": self.stage,
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("world_size") != self.world or state_dict.get("rank") != self.rank:
            raise ValueError(f"ZeroOptimizer: this state_dict is rank {state_dict.get('rank')} of "
                             f"{state_dict.get('world_size')}; loading needs the same rank of the same world size "
                             f"(here {self.rank} of {self.world}): resharding is not implemented yet")
        self.optimizer.load_state_dict(state_dict["optimizer"])
