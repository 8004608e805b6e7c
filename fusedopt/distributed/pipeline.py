"""Pipeline parallelism (torch.distributed.pipelining): the optimizer side.

A pipeline schedule runs forward and backward only; each rank then holds the
grads of its own stages. What the step must see of the other stages:

- the clip norm of the *whole* model: each stage's power sum (its DTensor
  params over their whole tensors, fusedopt.dtensor's rule) summed over the
  pipeline group before the root (max for the inf-norm), so every stage clips
  by the same coefficient;
- GradScaler's inf/NaN flag, OR-ed over the pipeline group, so every stage
  skips together and keeps the same scale;
- a param held by two stages (a tied embedding and output head) counted once:
  the copy on the lowest pipeline rank that holds it counts, the others count
  0 (their grads must be the same: summing the tied grads is the model's job);
- checkpoints keyed by the params' fully qualified names, so that one written
  at one pipeline split loads at another.

The norm and the flag travel in one all-reduce per step (none when neither
is asked for). ``pp_group=None``: one stage in one process, no communication.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import norms
from ..optim.adamw import FusedAdamW
from ..optim.base import FusedOptimizer, evaluate_closure
from ..optim.muon import FusedMuon
from ._wrapper import WrappingOptimizer

#: the attribute mark_shared sets on a param
_SHARED = "_fusedopt_shared"


def mark_shared(param: Tensor, name: str) -> Tensor:
    """Mark `param` as one copy of a param that several pipeline stages hold
    (a tied embedding and output head), under a `name` the same on every
    stage that holds a copy. The global grad norm (PipelineOptimizer's
    max_grad_norm, clip_grad_norm_ with pp_group) counts it once: the copy on
    the lowest pipeline rank that holds it. Mark before building the
    optimizer or the first clip. Returns the param."""
    if not isinstance(param, Tensor):
        raise TypeError(f"mark_shared: expected a parameter, got {type(param).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"mark_shared: name must be a non-empty str (the same on every stage), got {name!r}")
    setattr(param, _SHARED, name)
    return param


#: what module wrappers insert into names (torch.compile, activation checkpointing, FSDP1): dropped, as
#: torch.distributed.checkpoint.state_dict drops them, so that a checkpoint does not depend on them
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean_fqn(fqn: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def _group_of(pp_group):
    """A ProcessGroup from pp_group (a ProcessGroup or a 1-D DeviceMesh), None for one process."""
    if pp_group is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(pp_group, DeviceMesh):
        if pp_group.ndim != 1:
            raise ValueError(f"pp_group: expected the pipeline dim of the mesh (a 1-D DeviceMesh, e.g. "
                             f"mesh['pp']), got a {pp_group.ndim}-D mesh")
        return pp_group.get_group()
    if not isinstance(pp_group, dist.ProcessGroup):
        raise TypeError(f"pp_group: expected a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, "
                        f"got {type(pp_group).__name__}")
    return pp_group


class _AcrossStages:
    """This rank's link to the other pipeline stages: which of its params
    another stage counts (`uncounted`, ids), and the collective that sums a
    power sum (max for the inf-norm) and ORs GradScaler's flag over them."""

    def __init__(self, group, device: torch.device, uncounted: set[int]):
        self.group, self.device, self.uncounted = group, device, uncounted
        #: GradScaler's flag after the last reduce (every stage's OR), for the scaler's update()
        self.found_inf: Tensor | None = None

    def reduce(self, power: Tensor | None, found_inf: Tensor | None, *, clipping: bool):
        """(power sum of the grads' squares, GradScaler's flag) summed / OR-ed
        over the stages, in one all-reduce; nothing when neither is in use."""
        if found_inf is not None:
            self.found_inf = found_inf
        if self.group is None or (not clipping and found_inf is None):
            return power, found_inf
        packed = torch.zeros(2, dtype=torch.float64, device=self.device)
        if power is not None:
            packed[0] = power.to(self.device)
        if found_inf is not None:
            packed[1] = found_inf.to(self.device).sum()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        if found_inf is not None:
            found_inf = self.found_inf = (packed[1] > 0).to(found_inf).reshape(found_inf.shape)
        return (packed[0] if clipping else power), found_inf

    def reduce_power(self, power: Tensor, p: float) -> Tensor:
        """A norm's power sum (max for p = inf) over the stages."""
        if self.group is None:
            return power
        power = power.to(self.device).clone()
        op = dist.ReduceOp.MAX if p == float("inf") else dist.ReduceOp.SUM
        if op is dist.ReduceOp.MAX:  # MAX drops NaN on some backends: carry it as inf
            power = torch.where(power.isnan(), torch.full_like(power, float("inf")), power)
        dist.all_reduce(power, op=op, group=self.group)
        return power


def _tie_names(named: list[tuple[str, Tensor]], ties: dict[str, str]) -> dict[int, str]:
    """id(param) -> the name of its tie (mark_shared, or a `shared=` group's first name)."""
    names = {}
    for fqn, p in named:
        name = getattr(p, _SHARED, None) or ties.get(fqn)
        if name is not None:
            names[id(p)] = name
    return names


def _tie_owners(group, device: torch.device, names: set[str]) -> tuple[dict[str, int], int]:
    """(tie name -> the lowest rank of `group` holding it, this rank). A
    collective on every rank of the group (none in one process)."""
    if group is None or dist.get_world_size(group) == 1:
        return {name: 0 for name in names}, 0
    flag = torch.tensor([float(bool(names))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    me = dist.get_rank(group)
    if not flag.item():  # no tie anywhere
        return {}, me
    held = [None] * dist.get_world_size(group)
    dist.all_gather_object(held, sorted(names), group=group)
    owners: dict[str, int] = {}
    for rank, stage_names in enumerate(held):
        for name in stage_names:
            owners.setdefault(name, rank)
    return owners, me


def _uncounted(named: list[tuple[str, Tensor]], names: dict[int, str], owners: dict[str, int], me: int) -> set[int]:
    """ids of the params another stage counts: a tie counts on its lowest
    rank, once there (a rank holding two copies counts the first)."""
    counted, out = set(), set()
    for _, p in named:
        name = names.get(id(p))
        if name is None:
            continue
        if owners[name] != me or name in counted:
            out.add(id(p))
        else:
            counted.add(name)
    return out


def _device_for(group, params) -> torch.device:
    """Where the cross-stage collectives run: the params' device (a GPU for NCCL)."""
    device = params[0].device if params else torch.device("cpu")
    if device.type == "cpu" and group is not None and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


#: (process group, the tie names this rank marks) -> _tie_owners' answer, for clip_grad_norm_: every rank
#: learns the owners once (its collectives) while the marks stay the same
_clip_owners: dict = {}


@torch._disable_dynamo  # eager under torch.compile (a graph break), as FusedOptimizer._untraced_step
@torch.no_grad()
def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *, pp_group=None,
                    backend: str | None = None) -> Tensor:
    """fusedopt.clip_grad_norm_ by the norm of every pipeline stage's grads.

    Call it on every rank of `pp_group` (a ProcessGroup or the mesh's pipeline
    dim) with that rank's params: each stage's power sum (DTensor grads over
    their whole tensors) is summed over the group (max for the inf-norm), so
    every stage gets the same total norm and clips by the same coefficient.
    Params marked with mark_shared count once. ``pp_group=None``: exactly
    fusedopt.clip_grad_norm_."""
    group = _group_of(pp_group)
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    if group is None:
        return norms._clip(params, max_norm, norm_type, error_if_nonfinite, backend)
    named = [(str(i), p) for i, p in enumerate(params)]
    names = _tie_names(named, {})
    device = _device_for(group, params)
    key = (group, tuple(sorted(set(names.values()))))
    if key not in _clip_owners:
        _clip_owners[key] = _tie_owners(group, device, set(names.values()))
    across = _AcrossStages(group, device, _uncounted(named, names, *_clip_owners[key]))
    return norms._clip(params, max_norm, norm_type, error_if_nonfinite, backend, across)


class PipelineOptimizer(WrappingOptimizer):
    """One fusedopt optimizer over the stages this rank holds, stepping with
    the other pipeline stages (see the module's docstring).

    ``model_parts``: this rank's stage modules (one, or several for
    interleaved / looped schedules), each a module whose ``named_parameters()``
    give the whole model's names (the model with the other stages' layers
    removed). Their trainable params, plain tensors or DTensors, go into one
    param group of ``optimizer_class(params, **optimizer_kwargs)`` (one launch
    per bucket for all parts). ``pp_group``: the pipeline group (a
    ProcessGroup or the mesh's 1-D pipeline dim); None for one stage in one
    process (then no communication: a checkpoint continues without
    pipelining). ``shared``: groups of names of one param held by several
    stages, e.g. ``[("tok_embeddings.weight", "output.weight")]`` (or
    mark_shared), counted once by the norm.

    ``state_dict()`` is flat and keyed by name (``state.<fqn>.<name>``,
    ``param_groups.<fqn>.<key>``, torchtitan's layout), DTensor states stay
    DTensors: torch.distributed.checkpoint saves it at one pipeline split and
    loads it at another. States not created yet are created (zero, step 0)
    first, so that a fresh optimizer's state_dict is a template to load into.
    """

    def __init__(self, model_parts: nn.Module | Iterable[nn.Module], optimizer_class=FusedAdamW, *,
                 pp_group=None, shared: Iterable[Iterable[str]] = (), **optimizer_kwargs):
        parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        if not parts or not all(isinstance(m, nn.Module) for m in parts):
            raise TypeError("PipelineOptimizer: model_parts must be an nn.Module or a non-empty list of them "
                            "(the stages this rank holds)")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, (FusedOptimizer, FusedMuon))):
            raise TypeError(f"PipelineOptimizer: optimizer_class must be a fusedopt optimizer (its step takes the "
                            f"pipeline's norm and GradScaler flag), got {optimizer_class!r}")
        group = _group_of(pp_group)
        named, by_fqn = [], {}
        for part in parts:
            for fqn, p in part.named_parameters():
                fqn = _clean_fqn(fqn)
                if fqn in by_fqn and by_fqn[fqn] is not p:
                    raise ValueError(f"PipelineOptimizer: two model parts hold different params named {fqn!r}; "
                                     f"each part's named_parameters() must give the whole model's names")
                if fqn in by_fqn or not p.requires_grad or any(p is q for _, q in named):
                    continue
                by_fqn[fqn] = p
                named.append((fqn, p))
        if not named:
            raise ValueError("PipelineOptimizer: the model parts have no trainable params")
        ties = {}
        for names in shared:
            names = [names] if isinstance(names, str) else list(names)
            for fqn in names:
                ties[fqn] = names[0]
        self._wrap(optimizer_class([p for _, p in named], **optimizer_kwargs))
        self.pp_group = group
        self._fqns = {id(p): fqn for fqn, p in named}
        device = _device_for(group, [p for _, p in named])
        names = _tie_names(named, ties)
        self.optimizer._across_stages = _AcrossStages(
            group, device, _uncounted(named, names, *_tie_owners(group, device, set(names.values()))))
    @property
    def last_grad_norm(self) -> Tensor | None:
        """The norm of every stage's grads at the last step (with max_grad_norm)."""
        return self.optimizer.last_grad_norm

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("PipelineOptimizer: its params are the model parts' (keyed by name in the "
                                  "state_dict); build it again with the new parts instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    @torch._disable_dynamo  # eager under torch.compile (collectives, host-side plans): a graph break
    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """The inner optimizer's step, with the norm of every stage's grads
        (max_grad_norm) and GradScaler's flag OR-ed over the stages.

        GradScaler: ``scaler.step(opt)`` passes itself as ``grad_scaler`` (the
        contract torch keeps for optimizers with ``_step_supports_amp_scaling``;
        it warns that it is being deprecated). The inf/NaN check runs here,
        is OR-ed over the stages together with the norm, and the scaler is
        handed that flag, so every stage skips together and keeps the same
        scale. ``scaler.unscale_(opt)`` first (to clip by hand) works too."""
        loss = evaluate_closure(closure)
        inner = self.optimizer
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        per_optimizer = None
        if grad_scaler is not None:
            from torch.amp.grad_scaler import OptState

            per_optimizer = grad_scaler._per_optimizer_states[id(self)]
            if per_optimizer["stage"] is OptState.READY:
                grad_scaler._check_inf_per_device(self)
                grad_scale = grad_scaler._scale
            flags = list(per_optimizer["found_inf_per_device"].values())
            # a stage without grads has no flag: it still joins the collective, with a 0
            found_inf = (sum(f.to(flags[0].device) for f in flags[1:]) + flags[0] if flags else
                         torch.zeros(1, device=inner._across_stages.device))
        self._inner_step(grad_scale, found_inf)
        if per_optimizer is not None:  # the scaler's update() sees every stage's flag
            flag = inner._across_stages.found_inf
            per_optimizer["found_inf_per_device"] = {flag.device: flag}
        return loss

    # --- state_dict ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """{``state.<fqn>.<name>``: state, ``param_groups.<fqn>.<key>``: value}
        for this rank's params (see the class docstring)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner = self.optimizer
        out = {}
        for group in inner.param_groups:
            for p in group["params"]:
                fqn = self._fqns[id(p)]
                state = inner._prepare_state(group, p, inner._bucket_kind(p))
                for name, value in state.items():
                    out[f"state.{fqn}.{name}"] = value
                for key, value in group.items():
                    if key != "params":
                        out[f"param_groups.{fqn}.{key}"] = value
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, out) or out
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this layout, written at any pipeline split:
        the entries of this rank's params are taken (the others belong to
        other stages), states and hyperparameters; a param without saved
        state starts afresh."""
        if isinstance(state_dict.get("state"), dict) and "param_groups" in state_dict:
            raise ValueError("PipelineOptimizer.load_state_dict takes its flat layout keyed by name "
                             "('state.<fqn>.<name>', 'param_groups.<fqn>.<key>'), not torch.optim's nested one")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        states: dict[str, dict] = {}
        groups: dict[str, dict] = {}
        for key, value in state_dict.items():
            kind, _, rest = key.partition(".")
            fqn, _, name = rest.rpartition(".")
            if kind == "state" and fqn:
                states.setdefault(fqn, {})[name] = value
            elif kind == "param_groups" and fqn:
                groups.setdefault(fqn, {})[name] = value
            else:
                raise ValueError(f"PipelineOptimizer.load_state_dict: unexpected key {key!r} (expected "
                                 f"'state.<fqn>.<name>' or 'param_groups.<fqn>.<key>')")
        mine = set(self._fqns.values())
        if (states or groups) and not mine.intersection(states) and not mine.intersection(groups):
            raise ValueError(f"PipelineOptimizer.load_state_dict: none of this rank's {len(mine)} params is in the "
                             f"state_dict (e.g. {sorted(mine)[:3]}; it names "
                             f"{sorted(set(states) | set(groups))[:3]}): another model, or names changed?")
        inner = self.optimizer
        nested = {"state": {}, "param_groups": []}
        index = 0
        for group in inner.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                saved.update(groups.get(self._fqns[id(p)], {}))
                if self._fqns[id(p)] in states:
                    nested["state"][index] = states[self._fqns[id(p)]]
                index += 1
            nested["param_groups"].append({**saved, "params": list(range(index - len(group["params"]), index))})
        inner.load_state_dict(nested)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
