"""Launch plans: a step's params, grads and states grouped into kernel-ready
Buckets per param group (Plan), cached between steps while the same tensors
come back, or rebuilt under torch.compile for Dynamo to trace
(PlanMixin._traced_plans); staging of tensors a flat kernel cannot walk;
GradScaler's and the clip's per-device scalars (GradScalars)."""
from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_, is_not
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import dtensor
from ..backends import _held
from ..backends._bucket import Bucket
from ..backends._dtypes import FP8_STATE_DTYPE
from ..fp8 import bucket_copies
from ..reference import fp8_states
from .state import _FP8_STATES

if TYPE_CHECKING:
    from .base import FusedOptimizer


_shape = attrgetter("shape")


def _real(t: Tensor) -> Tensor:
    """A complex tensor as the kernels read it: its real view [..., 2] (no copy)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _kernel_view(t: Tensor) -> Tensor:
    """What the kernels read of a param's tensor: a DTensor's local shard, a complex one's real view."""
    return _real(dtensor.local(t))


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


_local_shard = attrgetter("_local_tensor")


_PLAIN = (Tensor, torch.nn.Parameter)


_PLAIN_OR_NONE = (Tensor, torch.nn.Parameter, type(None))


def _found_inf_on_every_rank(found_inf: Tensor | None, plans: list[_Plan]) -> Tensor | None:
    """GradScaler's found_inf, OR-ed over every process group that shards a
    DTensor param with a grad, so that every rank skips a step together
    (torch's inf check reduces over the mesh of the first DTensor grad only)."""
    if found_inf is None:
        return None
    groups = dict.fromkeys(group for plan in plans for group in plan.mesh_groups)
    if not groups:
        return found_inf
    import torch.distributed as dist

    found_inf = found_inf.clone()
    for group in groups:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return found_inf


def _local_grads(params: list, grads: list) -> list:
    """The grads as the kernels read them (checked by _check_grads): a
    DTensor's local shard, its pending sums (Partial, SequenceParallel's norm
    weights) reduced first, in one collective per mesh dim for all of them;
    the same list when every grad is plain."""
    if all(map(_PLAIN_OR_NONE.__contains__, map(type, grads))):
        return grads
    out, pending = list(grads), []
    for i, (p, g) in enumerate(zip(params, grads)):
        if type(g) in _PLAIN_OR_NONE or not dtensor.is_dtensor(g):
            continue
        if g._spec.placements == p._spec.placements:
            out[i] = g._local_tensor
        else:
            pending.append(i)
    if pending:
        reduced = dtensor.reduced_locals([grads[i] for i in pending], [params[i].placements for i in pending])
        for i, t in zip(pending, reduced):
            out[i] = t
    return out


def grad_multiplier(grad_scale: Tensor | None, clip: Tensor | None) -> Tensor | None:
    """What multiplies the grads: GradScaler's 1/scale times the clip
    coefficient (fp64, 0-d or 1-element), or None when neither applies."""
    mult = None if grad_scale is None else grad_scale.detach().double().reciprocal()
    if clip is not None:
        mult = clip.double() if mult is None else clip.double() * mult.to(clip.device)
    return mult


class _GradScalars:
    """This step's per-device scalars for the kernels, as 1-element tensors:
    found_inf (GradScaler; fp32), and the grad multiplier, GradScaler's
    1/scale times the clip coefficient (fp64, which each kernel rounds once to
    its math precision: fp64 params get the clip coefficient torch would use;
    None when neither applies). For the power-of-two scales GradScaler uses,
    multiplying by 1/scale gives the bits of dividing by the scale.
    `grad_mult`: that multiplier, formed already (a backend's clip_scalars)."""

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None, clip: Tensor | None,
                 grad_mult: Tensor | None = None):
        if grad_mult is None:
            grad_mult = grad_multiplier(grad_scale, clip)
        self._values = {"grad_mult": grad_mult, "found_inf": found_inf}
        self._dtypes = {"grad_mult": torch.float64, "found_inf": torch.float32}
        self._cache: dict = {}

    def _on(self, what: str, device: torch.device):
        t = self._values[what]
        if t is None:
            return None
        key = (what, device)
        if key not in self._cache:
            self._cache[key] = t.detach().to(device=device, dtype=self._dtypes[what]).reshape(1)
        return self._cache[key]

    def grad_mult(self, device):
        return self._on("grad_mult", device)

    def found_inf(self, device):
        return self._on("found_inf", device)


class _Plan:
    """A param group's buckets, kept between steps while they stay valid.

    Rebuilding costs a few microseconds per parameter (state lookups, layout
    checks, list building); reusing costs a few identity checks. A plan is
    reused when the group holds the same params in the same order, the same
    of them have grads, the same state tensors are in place (nothing replaced
    by load_state_dict or by hand), the params still have their shapes and
    every param and grad is contiguous (plans that had to stage a
    non-contiguous tensor are never cached).
    """

    def __init__(self, group: dict, present: tuple, master_weights: bool):
        self.group, self.present, self.master_weights = group, present, master_weights
        self.group_params = list(group["params"])  # the tensors, in order (a list edited in place is new)
        self.names: dict = {}               # bucket kind -> elementwise state names
        self.buckets: list[Bucket] = []
        self.grad_index: list[list[int]] = []   # per bucket: positions in group["params"] of its grads
        self.bucket_members: list[list[Tensor]] = []  # per bucket: its params, empty local shards too
        self.empty_steps: dict[torch.device, list[Tensor]] = {}
        self.params: list[Tensor] = []      # params with grads, their state dicts and shapes
        self.locals: list[Tensor] = []      # what the kernels read of them (a DTensor's local shard)
        self.states: list[dict] = []
        self.shapes: list[torch.Size] = []  # of the local shards
        self.numels: list[int] = []         # of the local shards
        self.dtensors: list[Tensor] = []    # the DTensor params and their local shards when planned
        self.dtensor_locals: list[Tensor] = []
        self.complex_params: list[Tensor] = []  # complex params and the real views the kernels read
        self.complex_views: list[Tensor] = []
        self.mesh_groups: dict = {}         # the process groups that shard them, in order (a dict as a set)
        self.watched_dicts: list[dict] = []  # (dict, key) -> tensor: the state tensors in use
        self.watched_keys: list[str] = []
        self.watched_tensors: list[Tensor] = []
        self.cacheable = True
        self.guard: _held.Table | None = None  # a held table over the grads (hold())

    def watch(self, p: Tensor, lp: Tensor, state: dict, keys: list[str]) -> None:
        """Keep param p (kernels read `lp`, its local shard when p is a DTensor)
        and the state tensors `keys` in use."""
        self.params.append(p)
        self.locals.append(lp)
        self.states.append(state)
        self.shapes.append(lp.shape)
        self.numels.append(lp.numel())
        if dtensor.is_dtensor(p):
            self.dtensors.append(p)
            self.dtensor_locals.append(p._local_tensor)
            self.mesh_groups.update(dict.fromkeys(dtensor.sharding_of(p).groups()))
        elif lp is not p:  # a complex param's real view: it must still view p's storage
            self.complex_params.append(p)
            self.complex_views.append(lp)
        self.watched_dicts += [state] * len(keys)
        self.watched_keys += keys
        self.watched_tensors += [state[k] for k in keys]

    def rewatch(self) -> None:
        """Watch the state tensors now in place (after some were replaced while building)."""
        self.watched_tensors = list(map(dict.get, self.watched_dicts, self.watched_keys))

    def holds(self, optimizer: "FusedOptimizer", group: dict) -> bool:
        """The checks of reusable() that do not look at the grads."""
        if group is not self.group or optimizer.master_weights != self.master_weights:
            return False
        params = group["params"]
        if len(params) != len(self.group_params) or not all(map(is_, params, self.group_params)):
            return False  # params replaced or reordered in the group (grads are taken by position)
        if any(optimizer._elementwise_states(group, kind) != names for kind, names in self.names.items()):
            return False
        # identity checks through map/operator.is_ run at C speed (~30 ns each)
        if not all(map(is_, map(optimizer.state.get, self.params), self.states)):
            return False
        return all(map(is_, map(dict.get, self.watched_dicts, self.watched_keys), self.watched_tensors))

    def hold(self) -> None:
        """After a full check and launch: when every bucket launches from a
        held table (backends/_held.py), keep a guard over the grads that lets
        the next steps skip the per-grad checks here (_held_plans)."""
        held = [b.launch_cache.get("held") for b in self.buckets]
        # (a group without grads has no bucket: its guard needs the held ops, which the cpu extension brings)
        if self.guard is None and all(held) and (held or _held.loaded()):
            gradless = [p for p, has in zip(self.group_params, self.present) if not has]
            self.guard = _held.Table({}, self.params, gradless)

    def reusable(self, optimizer: "FusedOptimizer", group: dict, grads: list) -> bool:
        if not self.holds(optimizer, group) or tuple(map(is_not, grads, repeat(None))) != self.present:
            return False
        if list(map(_shape, self.locals)) != self.shapes or not all(map(Tensor.is_contiguous, self.locals)):
            return False
        if self.complex_params and list(map(Tensor.data_ptr, self.complex_params)) != \
                list(map(Tensor.data_ptr, self.complex_views)):
            return False  # a complex param given new storage (p.data = ...): its view is stale
        if self.dtensors and not all(map(is_, map(_local_shard, self.dtensors), self.dtensor_locals)):
            return False  # a DTensor given a new local shard (FSDP2 may swap them)
        present = [g for g in grads if g is not None]  # self.params' grads (local shards), in order
        # grads of the sizes checked when the plan was built (a .grad.data swap
        # could change them), dense as they were (the kernels walk them flat)
        return list(map(Tensor.numel, present)) == self.numels and all(map(Tensor.is_contiguous, present))

    def refill(self, grads: list) -> None:
        for bucket, index in zip(self.buckets, self.grad_index):
            bucket.grads = [grads[i] for i in index]


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and without gaps: the elements fill numel() slots, in some order."""
    if t.is_contiguous():
        return True
    return t.stride() == torch.empty_like(t, memory_format=torch.preserve_format).stride()


def _flat_compatible(tensors: list[Tensor], writable: list[bool], writeback: list,
                     contiguous: bool = False) -> list[Tensor]:
    """Make the param's tensors walkable as flat arrays with one index.

    The kernels index every tensor of a param with the same flat offset, so
    all must be dense with identical strides (row-major contiguous when
    `contiguous`). Any tensor that is not (a sliced param, a grad with other
    strides) is replaced by a copy in the layout of the first dense one (or a
    contiguous one); copies of written tensors are queued in `writeback` to be
    copied back after the update.
    """
    if all(t.is_contiguous() for t in tensors):
        return tensors  # the same list: nothing staged
    layout = None if contiguous else next((t for t in tensors if _is_dense(t)), None)
    strides = layout.stride() if layout is not None else None
    out = []
    for t, w in zip(tensors, writable):
        if (t.is_contiguous() if strides is None else t.stride() == strides):
            out.append(t)
            continue
        staged = (torch.empty_like(layout, dtype=t.dtype) if layout is not None
                  else torch.empty_like(t, memory_format=torch.contiguous_format))
        staged.copy_(t)
        if w:
            writeback.append((t, staged))
        out.append(staged)
    return out


class PlanMixin:
    """FusedOptimizer's plan building (it provides the state and check methods)."""

    def _traced_plans(self) -> list[_Plan] | None:
        """Under torch.compile: this step's plans, built without the plan cache
        (Dynamo's guards on the params, grads and states take its place), for
        Dynamo to trace with the launches into the graph; or None, and the step
        runs eagerly behind a graph break, where tracing would cost more than
        it gives or cannot be done:
        - a float lr: Dynamo bakes floats into the graph, so an LR scheduler
          would recompile it every step (a tensor lr is read at run time, as
          torch advises for compiled torch.optim optimizers);
        - the first step (states are created) and staged (non-contiguous) tensors;
        - a backend whose launches are not custom ops Dynamo can trace
          (``TRACEABLE``: cpu, triton and cuda; the reference backend reads
          scalars on the host), DTensor or complex params, FP8
          states or copies, stochastic rounding (a seed drawn on the host),
          pipeline stages, a composite optimizer's outer clip;
        - master_weights="remainder": the check for params written outside
          the optimizer reads version counters on the host."""
        if (self._across_stages is not None or self._outer_clip is not None or self._has_complex
                or self.fp8 is not None or self.state_dtype == FP8_STATE_DTYPE or self.master_weights == "remainder"):
            return None
        for group in self.param_groups:
            if not isinstance(group["lr"], Tensor):
                return None
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if type(p) not in _PLAIN or type(g) not in _PLAIN or p.is_complex():
                    return None
                if not getattr(self._backend_for(p.device), "TRACEABLE", False):
                    return None
                state = self.state.get(p)
                if not state or not p.is_contiguous() or not g.is_contiguous():
                    return None
                if not all(t.is_contiguous() for t in state.values() if isinstance(t, Tensor)):
                    return None
                if self.stochastic_rounding and p.dtype == torch.bfloat16 and not self._uses_master(p):
                    return None
        plans, writeback = self._plans_of_this_step(cached=False)
        assert not writeback, "_traced_plans admits contiguous tensors only"
        return plans

    def _held_plans(self) -> list[_Plan] | None:
        """This step's plans when every one is held and still holds (_Plan.hold):
        Python checks per group and the extension checks the grads in one
        call, no per-grad work here; else None (the full path). Clipping and
        pipeline stages read the buckets' grads lists: they take the full path."""
        if (self.max_grad_norm or self._across_stages is not None or self._outer_clip is not None
                or not _held.usable()):
            return None
        plans = []
        for index, group in enumerate(self.param_groups):
            plan = self._plans.get(index)
            if plan is None or plan.guard is None or not plan.holds(self, group):
                return None
            plans.append(plan)
        if not _held.ready([plan.guard for plan in plans]):
            for plan in plans:  # the full path takes new guards after it checked (a param's storage swapped)
                plan.guard = None
            return None
        for index, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {index}")
        return plans

    def _plans_of_this_step(self, cached: bool = True) -> tuple[list[_Plan], list[tuple[Tensor, Tensor]]]:
        """Every group's plan for the grads as they are now, and the staged
        copies to write back after the kernels ran. Everything is checked
        before the first plan is built (building creates state): a bad
        hyperparameter, grad or state in any group raises with nothing changed.
        `cached`: reuse and keep plans between steps (_Plan)."""
        all_grads = [[p.grad for p in group["params"]] for group in self.param_groups]
        plans: list[_Plan | None] = []
        for index, (group, grads) in enumerate(zip(self.param_groups, all_grads)):
            self._check_group(group, f"param group {index}")
            self._check_grads(group["params"], grads)
            all_grads[index] = local_grads = _local_grads(group["params"], grads)  # what the kernels read
            if self._has_complex:
                all_grads[index] = local_grads = [_real(g) if g is not None else g for g in local_grads]
            plan = self._plans.get(index) if cached else None
            plans.append(plan if plan is not None and plan.reusable(self, group, local_grads) else None)
            if plans[-1] is None:  # a reused plan's states are the ones it checked when it was built
                for p, g, lg in zip(group["params"], grads, local_grads):
                    if g is not None:
                        if g.shape != p.shape or g.device != p.device or lg.shape != _kernel_view(p).shape:
                            self._refuse_grad(p, g)
                        self._check_state(group, p, self._bucket_kind(p))
        writeback: list[tuple[Tensor, Tensor]] = []
        for index, (group, grads, plan) in enumerate(zip(self.param_groups, all_grads, plans)):
            if plan is not None:
                plan.refill(grads)
            else:
                plans[index] = plan = self._build_plan(group, grads, writeback)
                if cached:
                    self._plans[index] = plan if plan.cacheable else None
        return plans, writeback

    def _build_plan(self, group: dict, grads: list, writeback: list) -> _Plan:
        """One Bucket per (device, dtype) of the group's params with grads, and
        the step tensors of zero-size params (advanced, but never launched).
        `grads`: what the kernels read (a DTensor grad's local shard). A
        DTensor param is launched on its local shard; one whose local shard is
        empty launches nothing but is a member of its bucket's statistics
        (Bucket.stats), so that this rank joins their collectives."""
        plan = _Plan(group, tuple(g is not None for g in grads), self.master_weights)
        buckets: dict[tuple, tuple[Bucket, list[int]]] = {}
        members: dict[tuple, list[tuple]] = {}  # per bucket: (sharding, local shape, launched) of each member
        member_params: dict[tuple, list[Tensor]] = {}  # per bucket: the member params, in the same order
        fp8_parts: dict[tuple, tuple[list[Tensor], list[dict]]] = {}  # per bucket: FP8 copies, state dicts
        for i, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None:
                continue
            kind = self._bucket_kind(p)
            names = plan.names.setdefault(kind, self._elementwise_states(group, kind))
            shaped = self._shaped_states(group, p)
            state = self._prepare_state(group, p, kind)
            sharding = dtensor.sharding_of(p)
            lp = _real(p if sharding is None else p._local_tensor)  # complex: the kernels' real view
            master_name = self._master_name(p)
            master = state.get(master_name) if master_name is not None else None
            fp8 = self._uses_fp8(p)
            # block-scaled FP8 states: their scales ride along like shaped states,
            # and the blocks run in row-major order, so everything is made contiguous
            fp8_scales = [fp8_states.scale_name(n) for n in names if self._state_dtype(p, n) == FP8_STATE_DTYPE]
            shaped = [*shaped, *fp8_scales]
            plan.watch(p, lp, state, ["step", *names, *shaped] + ([master_name] if master is not None else [])
                       + (list(_FP8_STATES) if fp8 else []))
            key = (p.device, lp.dtype, kind)
            # a DTensor with an empty local shard of a non-empty tensor still has states to update when some
            # are replicated (Adafactor's column statistics of a row-sharded matrix): launched by kinds that
            # take empties, else a member of its bucket's statistics only
            skip = lp.numel() == 0 and not (sharding is not None and p.numel() and self._launches_empty_shards(kind))
            if skip:
                plan.empty_steps.setdefault(p.device, []).append(state["step"])
                if sharding is None or p.numel() == 0:  # (a whole empty tensor: empty on every rank)
                    continue
            if key not in buckets:
                buckets[key] = (Bucket(p.device, lp.dtype, _real_dtype(self._state_dtype(p)), kind=kind,
                                       states={n: [] for n in (*names, *shaped)},
                                       masters=[] if master is not None else None,
                                       remainders=master_name == "master_remainder"), [])
                members[key] = []
            bucket, grad_index = buckets[key]
            members[key].append((sharding, p.shape, lp.shape, not skip))
            member_params.setdefault(key, []).append(p)
            if skip:
                continue
            local = _kernel_view
            tensors = ([lp, g] + [local(state[n]) for n in names] + ([local(master)] if master is not None else [])
                       + ([state["fp8_weight"]] if fp8 else []))
            staged = _flat_compatible(tensors, writable=[True, False] + [True] * (len(tensors) - 2),
                                      writeback=writeback, contiguous=self._needs_contiguous(kind) or bool(fp8_scales))
            plan.cacheable &= staged is tensors
            grad_index.append(i)
            bucket.params.append(staged[0])
            bucket.grads.append(staged[1])
            for n, t in zip(names, staged[2:]):
                bucket.states[n].append(t)
            for n in shaped:  # small, created contiguous: never staged
                bucket.states[n].append(local(state[n]).contiguous())
            if master is not None:
                bucket.masters.append(staged[2 + len(names)])
            if fp8:
                fp8_parts.setdefault(key, ([], []))
                fp8_parts[key][0].append(staged[-1])
                fp8_parts[key][1].append(state)
            bucket.steps.append(state["step"])
        for key, (weights, states) in fp8_parts.items():
            buckets[key][0].fp8 = bucket_copies(weights, states)  # may swap state entries for buffer rows
        if fp8_parts:
            plan.rewatch()
        for key, (bucket, _) in buckets.items():
            shardings, shapes, local_shapes, launched = map(list, zip(*members[key]))
            if any(s is not None for s in shardings):
                bucket.stats = dtensor.TensorSums(shardings, shapes, local_shapes,
                                                  [j for j, x in enumerate(launched) if x], bucket.device)
        plan.buckets = [bucket for bucket, _ in buckets.values()]
        plan.grad_index = [grad_index for _, grad_index in buckets.values()]
        plan.bucket_members = [member_params[key] for key in buckets]
        return plan

