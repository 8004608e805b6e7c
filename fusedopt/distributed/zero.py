"""ZeRO stage 1/2: each rank keeps the optimizer state (and fp32 masters) of
1/N of the params.

Layout. The params of each param group are laid out, per (device, dtype), in
one flat buffer (registration order, zero-padded to a multiple of the world
size N) and every param becomes a view of it. The buffer is cut into N equal
contiguous shards (torch.chunk boundaries, no per-param rounding); rank r owns
shard r. The inner optimizer (``optimizer_class``, default FusedAdamW) is built
on this rank's shards only: one 1-d tensor per flat buffer, so its states and
masters are 1/N of the total.

The inner optimizer must update each element from that element alone
(FusedAdamW, FusedSophia): it sees one 1-d shard mixing several params, so
LAMB's per-tensor trust ratio and Adafactor's factored statistics would be
taken over the wrong elements (refused). As in DeepSpeed's ZeRO, every
element of a shard is stepped at every step: a param that got no grad on any
rank is stepped with a zero grad (weight decay and momentum still move it,
where a plain fusedopt optimizer skips it), and all params of a flat buffer
share one step count.

FusedMuon (``optimizer_class=FusedMuon``) orthogonalises whole matrices, so
its matrices (2+ dims in a ``use_muon`` group) are not cut: each is owned by
one rank (balanced by Newton-Schulz cost), laid out in flat buffers per
owner; the owner receives their mean grads (a reduce's bytes: the buffer's
all-to-all sends everything to the owner), steps them whole, and broadcasts
them. Its other params (AdamW) take the element-wise shards above. Plain
params only (DTensors: FusedMuon itself); no FP8 momentum.

Step. Grads go through GradBuckets in buckets of consecutive params of one
flat buffer (up to ``bucket_cap_mb``; one bucket per flat buffer with
``overlap_comm=False``), the last params first, each launched as soon as
backward has produced its grads:
  stage 1  all-reduce: every rank holds the full mean grads; the part of each
           bucket that falls in this rank's shard is copied into the shard's grad
  stage 2  each bucket is cut where the shards are cut and every piece is summed
           on its owner (an all-to-all with uneven splits and a local sum: a
           reduce-scatter's bytes), so each rank receives only its shard of the
           mean grad; a bucket's full-size buffer exists from its first grad
           to the end of its reduction (GradBuckets keep_grads=False: at most
           MAX_IN_FLIGHT buckets reduced at once, then the oldest is freed),
           so during backward only a few buckets of full grads exist, and
           between steps only the shards (``p.grad`` is None)
then the inner step updates this rank's shard of the flat params in place and
an all-gather per flat buffer brings every rank the whole updated params.

``max_grad_norm`` clips by the true global norm: each rank's partial sum of
squares over its own shards is all-reduced (the padding is zero). GradScaler's
found_inf is all-reduced too, so every rank skips a step together.

Checkpoints: ``state_dict()`` is sharded (DTensors) and reshards through
torch.distributed.checkpoint; ``full_state_dict()`` / a full dict in
``load_state_dict`` move to and from the torch.optim.AdamW layout.

Tensor parallel (DP x TP): params that are DTensors (e.g. ``parallelize_module``
on the TP sub-mesh, the model replicated over the data-parallel
``process_group``) are laid out by their local shards, in flat buffers of
their own per set of mesh groups that shard them: the global norm sums each
buffer's squares over the ZeRO group and then over those groups, so a TP
shard is counted once and a replicated param once; GradScaler's flag is OR-ed
over them too. Params sharded over the ZeRO group itself (FSDP) are refused.
``full_state_dict()`` gives their states as DTensors of their layout; the
sharded ``state_dict()`` does not take them yet (it raises).

GradScaler: see ``step()``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dtensor
from ..backends._dtypes import FP8_STATE_DTYPE, math_dtype
from ..optim.adamw import FusedAdamW
from ..optim.base import FusedOptimizer, evaluate_closure
from ..optim.muon import FusedMuon
from . import _collectives as comm
from ._wrapper import WrappingOptimizer
from .grad_buckets import GradBuckets


class _Flat:
    """One flat buffer of params (one group, device, dtype, and for DTensors
    the process groups that shard them: ``groups``) and this rank's shard of
    it. A DTensor param takes its local shard's place. With an ``owner``
    (FusedMuon's matrices) the buffer is not cut: that rank's shard is all of
    it, the others' are empty, and the owner steps the params as ``views``
    shaped like them."""

    def __init__(self, params: list[Tensor], world: int, rank: int, groups: tuple = (), owner: int | None = None):
        self.params, self.groups, self.owner = params, groups, owner
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += dtensor.local(p).numel()
        self.numel = n  # elements in use; the rest of the buffer is zero padding
        padded = n if owner is not None else -(-n // world) * world if n else world
        self.buffer = torch.zeros(padded, dtype=params[0].dtype, device=params[0].device)
        for p, o in zip(params, self.offsets):
            local = dtensor.local(p)
            view = self.buffer[o:o + local.numel()].view_as(local)
            view.copy_(local.detach())
            # the module keeps its Parameter objects (a DTensor its local shard object); their storage is now
            # the flat buffer
            local.data = view
        if owner is None:
            size = padded // world
            #: each rank's [start, end) of the buffer
            self.bounds = [(r * size, (r + 1) * size) for r in range(world)]
        else:
            self.bounds = [(0, n) if r == owner else (n, n) for r in range(world)]
        self.start, self.end = self.bounds[rank]
        self.shard = self.buffer[self.start:self.end]  # the inner optimizer's param (without an owner)
        #: the owner's params as the inner optimizer steps them: views of the buffer, shaped like the params
        self.views = [self.buffer[o:o + p.numel()].view_as(p) for p, o in zip(params, self.offsets)] \
            if owner == rank else []

    def inner_params(self) -> list[Tensor]:
        """What the inner optimizer steps of this buffer here."""
        return self.views if self.owner is not None else [self.shard]

    def give_views_grads(self) -> None:
        """The owner's views take their parts of the shard's (reduced) grad."""
        for view, o in zip(self.views, self.offsets):
            view.grad = self.shard.grad[o:o + view.numel()].view_as(view)


def _runs(flat: _Flat, cap_bytes: float) -> list[tuple[list[Tensor], int, int]]:
    """flat's params cut into runs of consecutive params of at most cap_bytes
    (a larger param alone): (params, first element, end element) each."""
    runs, members, size = [], [], 0
    for p in flat.params:
        nbytes = dtensor.local(p).numel() * p.element_size()
        if members and size + nbytes > cap_bytes:
            runs.append(members)
            members, size = [], 0
        members.append(p)
        size += nbytes
    if members:
        runs.append(members)
    index = {id(p): o for p, o in zip(flat.params, flat.offsets)}
    return [(ps, index[id(ps[0])], index[id(ps[-1])] + dtensor.local(ps[-1]).numel()) for ps in runs]


class ZeroOptimizer(WrappingOptimizer):
    def __init__(self, params, optimizer_class=None, *, stage: int = 2, process_group=None,
                 bucket_cap_mb: float = 25, overlap_comm: bool = True, **optimizer_kwargs):
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer: stage must be 1 or 2, got {stage!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs torch.distributed initialized (dist.init_process_group)")
        if optimizer_class is None:
            optimizer_class = FusedAdamW
        muon = isinstance(optimizer_class, type) and issubclass(optimizer_class, FusedMuon)
        if muon and optimizer_kwargs.get("state_dtype") == FP8_STATE_DTYPE:
            raise ValueError("ZeroOptimizer(FusedMuon): FP8 momentum (state_dtype=torch.float8_e4m3fn) is not "
                             "supported yet; use torch.bfloat16 or None")
        if not muon and not issubclass(optimizer_class, FusedOptimizer):
            raise TypeError(f"ZeroOptimizer: optimizer_class must be a fusedopt optimizer (it takes the clip "
                            f"coefficient and GradScaler's flags in-kernel), got {optimizer_class.__name__}")
        if not muon and not optimizer_class._elementwise_update:
            raise TypeError(f"ZeroOptimizer: {optimizer_class.__name__}'s update is not elementwise (per-tensor "
                            f"norms or statistics), and each rank steps one flat shard mixing several params; "
                            f"use FusedAdamW or FusedSophia, or the optimizer without ZeRO")
        groups = list(params)
        if not groups:
            raise ValueError("ZeroOptimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])}
                  for g in groups]
        self.stage, self.group, self._muon = stage, process_group, muon
        self.world, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        self.bucket_cap_mb, self.overlap_comm = bucket_cap_mb, overlap_comm
        self.max_grad_norm = optimizer_kwargs.pop("max_grad_norm", None) or None
        #: the global grad norm of the last step (a tensor), with max_grad_norm
        self.last_grad_norm: Tensor | None = None

        #: FusedMuon: each matrix's owner rank (balanced by Newton-Schulz cost)
        owners = _matrix_owners(groups, self.world) if muon else {}
        self.flats: list[_Flat] = []
        inner_groups = []
        #: the params of each group in the caller's order (the full state_dict's numbering)
        self._original: list[list[Tensor]] = []
        for group in groups:
            given = group["params"]
            given = [given] if isinstance(given, Tensor) else list(given)
            self._original.append(given)
            members = [p for p in given if p.requires_grad]
            keys = OrderedDict()
            for p in members:
                owner = owners.get(id(p))
                keys.setdefault((p.device, p.dtype, self._sharding_groups(p), owner), []).append(p)
            flats = [_Flat(ps, self.world, self.rank, key[2], key[3]) for key, ps in keys.items()]
            self.flats += flats
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": [t for f in flats for t in f.inner_params()]})
        self._wrap(optimizer_class(inner_groups, **optimizer_kwargs))
        # buckets of consecutive params of one flat buffer, the last params first (backward's order)
        cap = bucket_cap_mb * 2**20 if overlap_comm else float("inf")
        self._bucket_ranges: list[tuple[_Flat, int, int]] = []  # (flat, first element, end element)
        layout, shard_sizes = [], []
        for flat in reversed(self.flats):
            for members, lo, hi in reversed(_runs(flat, cap)):
                layout.append(members)
                self._bucket_ranges.append((flat, lo, hi))
                shard_sizes.append([max(0, min(hi, end) - max(lo, start)) for start, end in flat.bounds])
        self.grads = GradBuckets([p for f in self.flats for p in f.params], process_group=process_group,
                                 mode="all_reduce" if stage == 1 else "reduce_scatter", layout=layout,
                                 shard_sizes=shard_sizes if stage == 2 else None, keep_grads=stage == 1)
        for flat in self.flats:  # this rank's part of the mean grad, where the buckets deliver it
            flat.shard.grad = torch.zeros_like(flat.shard)
        # the state exists before the first step, so that a checkpoint can be loaded into it
        for group in self.optimizer.param_groups:
            for shard in group["params"]:
                self.optimizer._prepare_state(group, shard, self.optimizer._bucket_kind(shard))
        #: the inner optimizer's number for each of its params (its state_dict's keys)
        self._inner_number = {id(p): n for n, p in enumerate(p for g in self.optimizer.param_groups
                                                              for p in g["params"])}

    def _sharding_groups(self, p: Tensor) -> tuple:
        """The process groups that shard DTensor param p (none for a plain one);
        refused when one is the ZeRO group itself."""
        if not dtensor.is_dtensor(p):
            return ()
        if self._muon:
            raise ValueError(f"ZeroOptimizer(FusedMuon): DTensor params (a param of shape {tuple(p.shape)}, "
                             f"{p.placements}) are not supported yet; use FusedMuon itself on them (FSDP2, TP)")
        dtensor.check_tensor(p, "ZeroOptimizer: a param")
        groups = dtensor.sharding_of(p).groups()
        zero_ranks = set(dist.get_process_group_ranks(self.group or dist.group.WORLD))
        # two ranks of the ZeRO group holding different shards of p: ZeRO would average them as replicas
        if any(len(zero_ranks.intersection(dist.get_process_group_ranks(g))) > 1 for g in groups):
            raise ValueError(f"ZeroOptimizer: a DTensor param of shape {tuple(p.shape)} is already sharded over "
                             f"the ZeRO process group ({p.placements} on {p.device_mesh}): ZeRO shards a model "
                             f"replicated over its group (e.g. tensor parallel over another mesh dim); use a plain "
                             f"fusedopt optimizer with FSDP2")
        return groups

    def _over_sharding_groups(self, values: Tensor, op=dist.ReduceOp.SUM) -> None:
        """values[i] (one per flat buffer, already reduced over the ZeRO group)
        reduced in place over the groups that shard flat i's params: one
        collective per group (index tensors made once: no host sync a step)."""
        plan = self.__dict__.get("_group_plan")
        if plan is None or plan[0] != values.device:
            members: dict = {}
            for i, flat in enumerate(self.flats):
                for group in flat.groups:
                    members.setdefault(group, []).append(i)
            plan = self._group_plan = (values.device, [(g, torch.tensor(ix, device=values.device))
                                                       for g, ix in members.items()])
        for group, index in plan[1]:
            part = values.index_select(0, index)
            dist.all_reduce(part, op=op, group=group)
            values.index_copy_(0, index, part)

    def no_sync(self):
        """Accumulate grads over several backward passes without communicating."""
        return self.grads.no_sync()

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("ZeroOptimizer: params are laid out in flat buffers and sharded at construction; "
                                  "build a new ZeroOptimizer with every param group instead of adding one")

    def remove_hooks(self) -> None:
        """Unregister the grad hooks (GradBuckets.remove): call it before
        building another ZeroOptimizer on the same params. Also done when this
        one is garbage collected."""
        self.grads.remove()

    def __del__(self):
        grads = self.__dict__.get("grads")
        if grads is not None:
            grads.remove()

    @torch._disable_dynamo  # eager under torch.compile (collectives, host-side plans): a graph break
    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """Reduce the grads, step this rank's shards, all-gather the params.

        GradScaler: ``scaler.step(opt)`` passes itself as ``grad_scaler`` (the
        contract torch keeps for optimizers with ``_step_supports_amp_scaling``;
        torch warns that it is being deprecated). The inf/NaN check then runs
        here, on the reduced shard grads, and is all-reduced, and the scaler is
        handed that global flag, so every rank skips the same steps and keeps
        the same scale. The grads are unscaled inside the kernel. Calling
        ``scaler.unscale_(opt)`` first is not supported (clip with
        ``max_grad_norm`` instead)."""
        loss = evaluate_closure(closure)
        for index, group in enumerate(self.optimizer.param_groups):  # before the grads are reduced and freed
            self.optimizer._check_group(group, f"param group {index}")
        self.grads.wait()
        for flat in self.flats:  # zeros where no bucket delivers (a shard of padding only)
            if flat.shard.grad is None:
                flat.shard.grad = torch.zeros_like(flat.shard)
        for (flat, lo, hi), bucket in zip(self._bucket_ranges, self.grads.buckets):
            first, last = max(lo, flat.start), min(hi, flat.end)  # the bucket's part of this rank's shard
            if first >= last:
                continue
            target = flat.shard.grad[first - flat.start:last - flat.start]
            target.copy_(bucket.buffer[first - lo:last - lo] if self.stage == 1 else bucket.shard)
        for flat in self.flats:
            flat.give_views_grads()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scaler is not None:
            grad_scale, found_inf = self._scaler_flags(grad_scaler)
        elif found_inf is not None:  # every rank skips together
            found_inf = self._on_every_rank(torch.as_tensor(found_inf, dtype=torch.float32,
                                                            device=self.flats[0].buffer.device).clone())
            found_inf = (found_inf > 0).to(torch.float32)
        if self.max_grad_norm:
            grad_scale = self._clip(grad_scale)
        self._inner_step(grad_scale, found_inf)
        for flat in self.flats:  # every rank gets every updated shard
            if flat.owner is None:
                comm.all_gather(flat.buffer, flat.shard.clone(), self.group)
            else:
                dist.broadcast(flat.buffer, src=self._global(flat.owner), group=self.group)
        if self.optimizer.master_weights == "remainder":  # the gather rewrote the shards' bits: not a change
            self.optimizer._record_master_versions()
        return loss

    def _global(self, rank: int) -> int:
        """A rank of the ZeRO group as a global rank (what collectives' src/dst take)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _scaler_flags(self, scaler) -> tuple[Tensor, Tensor]:
        """GradScaler's scale, and found_inf over every rank's shard grads
        (also recorded in the scaler, for its update())."""
        from torch.amp.grad_scaler import OptState

        per_optimizer = scaler._per_optimizer_states[id(self)]  # the scaler's own bookkeeping for this optimizer
        if per_optimizer["stage"] is OptState.UNSCALED:
            raise RuntimeError("ZeroOptimizer: scaler.unscale_(opt) before scaler.step(opt) is not supported "
                               "(the grads are reduced inside step()); clip with max_grad_norm instead")
        device = self.flats[0].buffer.device
        grads = [f.shard.grad for f in self.flats if f.shard.grad is not None]
        bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any() if grads else torch.tensor(False)
        found_inf = self._on_every_rank(bad.to(device=device, dtype=torch.float32).reshape(1))
        found_inf = (found_inf > 0).to(torch.float32)
        per_optimizer["found_inf_per_device"] = {found_inf.device: found_inf}
        return scaler._scale.to(device), found_inf

    def _on_every_rank(self, found_inf: Tensor) -> Tensor:
        """A found_inf flag summed over the ZeRO group, then OR-ed over every group that shards a param."""
        comm.all_reduce(found_inf, self.group)
        values = found_inf.reshape(1).expand(len(self.flats)).clone()
        self._over_sharding_groups(values, dist.ReduceOp.MAX)
        return values.max().reshape(found_inf.shape)

    def _clip(self, grad_scale: Tensor | None) -> Tensor:
        """torch's clip_grad_norm_ rule on the global norm: the grads are to be
        multiplied by min(1, max_norm / (norm + 1e-6)). Returned as the grad
        scale the inner (fused) optimizer divides by, so no grad is modified."""
        shards = [f.shard.grad for f in self.flats]
        device = shards[0].device
        # each square in the math precision, sums in fp64 (fusedopt.norms' rule), one per flat buffer: summed
        # over the ZeRO group, then over the groups that shard its params (a TP shard and a replica count once)
        squares = torch.stack([g.detach().to(math_dtype(g.dtype)).square().double().sum().to(device) for g in shards])
        comm.all_reduce(squares, self.group)
        self._over_sharding_groups(squares)
        squares = squares.sum()
        scale = torch.ones((), dtype=torch.float64, device=device) if grad_scale is None else \
            grad_scale.to(device=device, dtype=torch.float64).reshape(())
        # the norm and the coefficient in fp32, fp64 when some grads are, as clip_grad_norm_ forms them;
        # handed on in fp64 (the inner optimizer takes 1 / grad_scale in fp64)
        norm_dtype = torch.float64 if any(g.dtype == torch.float64 for g in shards) else torch.float32
        self.last_grad_norm = (squares.sqrt() / scale).to(norm_dtype)
        coefficient = (self.max_grad_norm / (self.last_grad_norm + 1e-6)).clamp(max=1.0)
        return scale / coefficient.double()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the grads. After a backward whose grads are then discarded
        (no step), the collectives it started are finished first, as every
        rank does the same: the next backward starts clean."""
        if self.grads.pending():
            self.grads.wait()
        for flat in self.flats:
            for p in flat.params:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
            flat.shard.grad = None  # re-created (zeros, then the buckets' parts) by the next step
            for view in flat.views:
                view.grad = None

    # --- checkpoints ------------------------------------------------------------------

    def _elementwise_flats(self) -> list[_Flat]:
        """The buffers cut across the ranks (a sharded state_dict numbers them in this order)."""
        return [flat for flat in self.flats if flat.owner is None]

    def _valid(self, flat: _Flat) -> int:
        """How many elements of this rank's shard are real (not padding)."""
        return max(0, min(flat.end, flat.numel) - flat.start)

    def _elementwise(self, flat: _Flat, state: dict) -> list[str]:
        """The state entries shaped like the shard (sharded in checkpoints); the rest (step) are replicated."""
        return [k for k, v in state.items() if isinstance(v, Tensor) and v.dim() == 1
                and v.numel() == flat.shard.numel()]

    def state_dict(self) -> dict:
        """The sharded state: per flat buffer (numbered in order), each
        elementwise state (exp_avg, exp_avg_sq, master_param, ...) as a 1-d
        DTensor of the buffer's global length, Shard(0) over the ranks (this
        rank's part is its shard without the padding), the step as a plain
        tensor; FusedMuon's matrices (whole on their owners) one entry each,
        ``"matrix<n>"`` (n: the param's number in the caller's order), cut the
        same way (a collective); the inner optimizer's param_groups. It exists before the first
        step. ``torch.distributed.checkpoint.save`` writes it at N ranks and
        ``torch.distributed.checkpoint.load`` fills ``opt.state_dict()`` of a
        ZeroOptimizer at M ranks in place; then ``opt.load_state_dict(it)``."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if any(flat.groups for flat in self.flats):
            # each TP rank's flat buffers hold other shards of other tensors: a 1-d DTensor over the ZeRO
            # group would give them one name, and checkpoint writes would collide
            raise NotImplementedError("ZeroOptimizer.state_dict(): the sharded state of tensor-parallel "
                                      "(DTensor) params is not supported yet; use full_state_dict() and "
                                      "load_state_dict(full)")
        mesh = DeviceMesh.from_group(self.group or dist.group.WORLD, self.flats[0].buffer.device.type)
        inner = self.optimizer.state_dict()
        state = {}
        for i, flat in enumerate(self._elementwise_flats()):
            own = self.optimizer.state[flat.shard]
            entry = {}
            for name, value in own.items():
                if name in self._elementwise(flat, own):
                    value = DTensor.from_local(value[:self._valid(flat)], mesh, [Shard(0)], run_check=False,
                                               shape=(flat.numel,), stride=(1,))
                entry[name] = value
            state[i] = entry
        for flat in self.flats:
            if flat.owner is not None:
                state.update(self._owned_state_sharded(flat, mesh))
        return {"state": state, "param_groups": inner["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a sharded state_dict (``state_dict()``, possibly filled by
        torch.distributed.checkpoint at another world size) or a full one in
        the torch.optim.AdamW layout (``full_state_dict()``, or a plain
        FusedAdamW's / torch.optim.AdamW's): each rank takes its part."""
        from torch.distributed.tensor import DTensor

        states = state_dict["state"]
        sharded = any(isinstance(v, DTensor) for entry in states.values() for v in entry.values())
        inner_state = {}
        for flat in self.flats:
            if flat.owner is not None:  # the owner's matrices' states, numbered as the inner optimizer numbers them
                per_view = self._owned_state_loaded(flat, states) if sharded else \
                    self._owned_state_from_full(flat, states)
                inner_state.update({self._inner_number[id(v)]: entry for v, entry in zip(flat.views, per_view)})
        for i, flat in enumerate(self._elementwise_flats()):
            pieces = {}
            if sharded:
                for name, value in states.get(i, {}).items():
                    pieces[name] = value.to_local() if isinstance(value, DTensor) else value
            else:
                pieces = self._pieces_from_full(flat, states)
            entry = {}
            for name, value in pieces.items():
                if isinstance(value, Tensor) and value.dim() == 1 and name != "step":
                    padded = torch.zeros(flat.shard.numel(), dtype=value.dtype, device=flat.shard.device)
                    padded[:value.numel()] = value
                    value = padded
                entry[name] = value
            inner_state[self._inner_number[id(flat.shard)]] = entry
        # the saved hyperparameters, with the inner optimizer's numbering of its shards
        inner_groups = self.optimizer.state_dict()["param_groups"]
        groups = [dict(g, params=ig["params"]) for g, ig in zip(state_dict["param_groups"], inner_groups)]
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": groups})

    def _full_index(self) -> dict[int, int]:
        """id(param) -> its number in a full state_dict (the caller's order, all groups)."""
        index, n = {}, 0
        for given in self._original:
            for p in given:
                index[id(p)] = n
                n += 1
        return index

    def _pieces_from_full(self, flat: _Flat, states: dict) -> dict:
        """This rank's shard of each elementwise state of `flat`, cut from a full state_dict."""
        index = self._full_index()
        per_param = [states.get(index[id(p)], {}) for p in flat.params]
        # sorted: every rank must hold its states in one order (full_state_dict gathers them in it)
        names = sorted({k for s in per_param for k, v in s.items() if isinstance(v, Tensor) and v.dim() > 0})
        pieces = {}
        for name in names:
            parts = []
            for p, s in zip(flat.params, per_param):
                value = s.get(name)
                parts.append(torch.zeros(dtensor.local(p).numel(), device=flat.shard.device) if value is None
                             else _local_piece(p, value.detach()).reshape(-1).to(flat.shard.device))
            whole = torch.cat(parts) if parts else torch.zeros(0)
            pieces[name] = whole[flat.start:flat.start + self._valid(flat)]
        steps = [s["step"] for s in per_param if "step" in s]
        if steps:
            pieces["step"] = torch.as_tensor(steps[0], dtype=torch.float32).clone()
        return pieces

    def full_state_dict(self) -> dict | None:
        """Collective: the whole state on rank 0 in the torch.optim.AdamW layout
        (per param: step and each elementwise state shaped like the param,
        numbered in the caller's order; the param_groups), loadable by a plain
        FusedAdamW or torch.optim.AdamW, or back by ``load_state_dict``.
        Other ranks get None."""
        index = self._full_index()
        state: dict = {}
        for flat in self.flats:
            if flat.owner is not None:
                for name, whole in self._owned_vectors_on_rank0(flat).items():
                    for p, offset in zip(flat.params, flat.offsets):
                        state.setdefault(index[id(p)], {})[name] = whole[offset:offset + p.numel()].view_as(p).clone()
                continue
            own = self.optimizer.state[flat.shard]
            for name in sorted(self._elementwise(flat, own)):  # one gather per state, in one order on every rank
                shards = [torch.empty_like(own[name]) for _ in range(self.world)] if self.rank == 0 else None
                dist.gather(_wire(own[name].contiguous()), _wires(shards), dst=self._global(0), group=self.group)
                if self.rank != 0:
                    continue
                whole = torch.cat(shards)
                for p, offset in zip(flat.params, flat.offsets):
                    entry = state.setdefault(index[id(p)], {"step": own["step"].clone()})
                    local = dtensor.local(p)
                    value = whole[offset:offset + local.numel()].view_as(local).clone()
                    entry[name] = dtensor.like(p, value) if dtensor.is_dtensor(p) else value
        if self.rank != 0:
            return None
        groups = []
        for given, inner_group in zip(self._original, self.optimizer.param_groups):
            groups.append({**{k: v for k, v in inner_group.items() if k != "params"},
                           "params": [index[id(p)] for p in given]})
        return {"state": state, "param_groups": groups}


    # --- checkpoints of FusedMuon's matrices (each whole on its owner) --------------------
    # In a sharded state_dict a matrix buffer's states are cut as every other buffer's are (1-d, Shard(0) over
    # the ranks): a scatter from the owner when saving, a gather to it when loading, so a checkpoint reshards
    # to any world size (and other owners) like the rest.

    def _owned_template(self, flat: _Flat) -> dict[str, torch.dtype]:
        """The states (names, dtypes) each matrix of an owner's buffer has, known on every rank."""
        return dict(sorted(self.optimizer._matrix_state_dtypes(flat.params[0]).items()))

    def _owned_vectors(self, flat: _Flat) -> dict[str, Tensor]:
        """On the owner: each state of the buffer's matrices as one 1-d vector, in the buffer's order."""
        states = [self.optimizer.state[v] for v in flat.views]
        return {name: torch.cat([s[name].reshape(-1).to(dtype) for s in states])
                for name, dtype in self._owned_template(flat).items()}

    def _owned_state_sharded(self, flat: _Flat, mesh) -> dict:
        """A sharded state_dict's entries for the buffer's matrices: one per
        matrix, keyed by its number in the caller's order (not by buffer:
        the owners, and so the buffers, change with the world size)."""
        from torch.distributed.tensor import DTensor, Shard

        index, out = self._full_index(), {}
        for k, p in enumerate(flat.params):
            size = -(-p.numel() // self.world)  # Shard(0)'s chunks (torch.chunk's), each padded to `size`
            valid = max(0, min(p.numel(), (self.rank + 1) * size) - self.rank * size)
            entry = {}
            for name, dtype in self._owned_template(flat).items():
                chunks = None
                if flat.views:
                    padded = torch.zeros(size * self.world, dtype=dtype, device=flat.buffer.device)
                    padded[:p.numel()] = self.optimizer.state[flat.views[k]][name].reshape(-1)
                    chunks = list(padded.split(size))
                mine = torch.empty(size, dtype=dtype, device=flat.buffer.device)
                dist.scatter(_wire(mine), _wires(chunks), src=self._global(flat.owner), group=self.group)
                entry[name] = DTensor.from_local(mine[:valid], mesh, [Shard(0)], run_check=False,
                                                 shape=(p.numel(),), stride=(1,))
            out[_matrix_key(index[id(p)])] = entry
        return out

    def _owned_state_loaded(self, flat: _Flat, states: dict) -> list[dict]:
        """A sharded state_dict's chunks of the buffer's matrices' states
        gathered on the owner: one state per matrix there (none elsewhere)."""
        from torch.distributed.tensor import DTensor

        index, per_view = self._full_index(), []
        for p in flat.params:
            saved, entry = states.get(_matrix_key(index[id(p)]), {}), {}
            size = -(-p.numel() // self.world)
            for name in self._owned_template(flat):
                if name not in saved:
                    continue
                local = saved[name].to_local() if isinstance(saved[name], DTensor) else saved[name]
                padded = torch.zeros(size, dtype=local.dtype, device=flat.buffer.device)
                padded[:local.numel()] = local.reshape(-1)
                chunks = [torch.empty_like(padded) for _ in range(self.world)] if flat.views else None
                dist.gather(_wire(padded), _wires(chunks), dst=self._global(flat.owner), group=self.group)
                if flat.views:
                    entry[name] = torch.cat(chunks)[:p.numel()].view_as(p).clone()
            per_view.append(entry)
        return per_view if flat.views else []

    def _owned_state_from_full(self, flat: _Flat, states: dict) -> list[dict]:
        """A full state_dict's states of the owner's matrices (nothing to communicate)."""
        index = self._full_index()
        return [{k: v for k, v in states.get(index[id(p)], {}).items() if isinstance(v, Tensor)}
                for p, _ in zip(flat.params, flat.views)]

    def _owned_vectors_on_rank0(self, flat: _Flat) -> dict[str, Tensor]:
        """The buffer's state vectors sent from the owner to rank 0 (full_state_dict); {} on other ranks."""
        out, vectors = {}, self._owned_vectors(flat) if self.rank == flat.owner else {}
        for name, dtype in self._owned_template(flat).items():
            if self.rank == flat.owner:
                vector = vectors[name]
                if self.rank != 0:
                    dist.send(_wire(vector), dst=self._global(0), group=self.group)
            elif self.rank == 0:
                vector = torch.empty(flat.numel, dtype=dtype, device=flat.buffer.device)
                dist.recv(_wire(vector), src=self._global(flat.owner), group=self.group)
            if self.rank == 0:
                out[name] = vector
        return out


def _wire(t: Tensor) -> Tensor:
    """What a state travels as in a collective: itself, or an int16 remainder
    (master_weights="remainder") as its bytes (gloo has no int16); a view, so a
    receiving buffer fills the state."""
    return t.view(torch.uint8) if t.dtype == torch.int16 else t


def _wires(tensors: list[Tensor] | None) -> list[Tensor] | None:
    return None if tensors is None else [_wire(t) for t in tensors]


def _matrix_key(number: int) -> str:
    """A FusedMuon matrix's key in a sharded state_dict: its number in the caller's order."""
    return f"matrix{number}"


def _matrix_owners(groups: list[dict], world: int) -> dict[int, int]:
    """id(param) -> the rank that steps it, for every param FusedMuon
    orthogonalises (2+ dims in a ``use_muon`` group): the costliest Newton-
    Schulz first, each to the least loaded rank (the lowest on a tie), so
    every rank computes the same owners."""
    matrices = [p for g in groups if g.get("use_muon", True) for p in g["params"]
                if p.requires_grad and p.ndim >= 2 and p.numel()]
    costs = []
    for p in matrices:
        rows, cols = sorted(p.shape[-2:])
        costs.append(p.numel() // (rows * cols) * (2 * rows * rows * cols + rows ** 3))  # one iteration's flops/2
    load, owners = [0] * world, {}
    for k in sorted(range(len(matrices)), key=lambda k: -costs[k]):
        rank = min(range(world), key=load.__getitem__)
        owners[id(matrices[k])] = rank
        load[rank] += costs[k]
    return owners


def _local_piece(p: Tensor, value: Tensor) -> Tensor:
    """What of a full state_dict's `value` for param p this rank keeps: p's
    local shard of it for a DTensor param (a DTensor state redistributed to
    p's placements, a whole one cut without communication)."""
    if not dtensor.is_dtensor(p):
        return dtensor.local(value)
    from torch.distributed.tensor import distribute_tensor

    if dtensor.is_dtensor(value):
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value._local_tensor
    return distribute_tensor(value.to(dtensor.local(p).device), p.device_mesh, p.placements,
                             src_data_rank=None)._local_tensor
