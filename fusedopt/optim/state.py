"""State of a fusedopt optimizer: what each param's state holds (dtype per
state_dtype and master weights, shapes, DTensor placements), its checks
before a step, its lazy creation, FP8 states and weight copies, and the
state_dict load that converts torch.optim's (or another configuration's)
states into what the kernels take. FusedOptimizer inherits StateMixin."""
from __future__ import annotations

from itertools import chain

import torch
from torch import Tensor

from .. import dtensor
from ..backends._dtypes import FP8_STATE_DTYPE, LOW_PRECISION
from ..reference import fp8_states
from . import masters


#: the FP8 copy's state (fusedopt.fp8.Float8Recipe)
_FP8_STATES = ("fp8_weight", "fp8_scale", "fp8_scale_inv", "fp8_amax_history")


#: states whose dtype does not follow state_dtype (None: the saved one)
_FIXED_DTYPES = {**masters.DTYPES, "fp8_weight": None, "fp8_scale": torch.float32,
                 "fp8_scale_inv": torch.float32, "fp8_amax_history": torch.float32}


def _fp8_state_matches(state: dict, recipe) -> bool:
    """Whether a loaded FP8 state is complete and shaped for `recipe`."""
    if not all(name in state for name in _FP8_STATES):
        return False
    return (state["fp8_weight"].dtype == recipe.dtype
            and state["fp8_amax_history"].shape == (recipe.amax_history_len,))


def _fp8_state_ok(state: dict, name: str, p: Tensor) -> bool:
    """Whether FP8 state `name` has p's shape and its scales (one per block)."""
    scales = state.get(fp8_states.scale_name(name))
    return (state[name].shape == p.shape and state[name].is_contiguous() and isinstance(scales, Tensor)
            and scales.dtype == torch.float32 and scales.shape == (fp8_states.n_blocks(p.numel()),))


class StateMixin:
    """FusedOptimizer's state methods (it provides state, param_groups,
    master_weights, state_dtype, fp8 and the subclass hooks they call)."""

    def _uses_master(self, p: Tensor) -> bool:
        """Whether p's update works on an fp32 master (kept whole, or as a remainder)."""
        return bool(self.master_weights) and p.dtype in LOW_PRECISION

    def _master_name(self, p: Tensor) -> str | None:
        """The state that holds p's master: fp32 ``master_param``, int16 ``master_remainder``, or None."""
        return masters.name_of(self.master_weights, p)

    def master_param(self, p: Tensor) -> Tensor:
        """The fp32 master of param p as the last step left it: with
        ``master_weights=True`` the state tensor itself, with ``"remainder"``
        a new tensor joined from p's bf16 bits and its remainder (exactly the
        master ``True`` would hold), before p's first step p in fp32. For
        fp32/fp64 params (no master) p itself. E.g. to feed torch.optim.AdamW
        on fp32 copies: ``[opt.master_param(p) for p in params]`` and
        ``load_state_dict`` of this optimizer's state_dict."""
        return masters.master_param(self.master_weights, p, self.state.get(p, {}))

    def _uses_fp8(self, p: Tensor) -> bool:
        """Whether p gets an FP8 copy: with a recipe, when its working copy is fp32."""
        return self.fp8 is not None and (self._uses_master(p) or p.dtype == torch.float32)

    def _state_dtype(self, p: Tensor, name: str | None = None) -> torch.dtype:
        """The storage dtype of p's state tensor `name` (all but step and
        master_param): ``state_dtype``, else p's dtype (fp32 with master
        weights). Without a name: the dtype ``state_dtype`` gives, which every
        state has but those in _fp8_exempt_states when it is FP8."""
        if self.state_dtype is not None and not (self.state_dtype == FP8_STATE_DTYPE
                                                 and name in self._fp8_exempt_states):
            return self.state_dtype
        return torch.float32 if self._uses_master(p) else p.dtype

    def _state_shapes(self, group: dict, p: Tensor, kind) -> dict[str, tuple[int, ...] | None]:
        """{name: shape} of the param's states the kernels read (None: p's shape)."""
        shapes: dict[str, tuple[int, ...] | None] = {name: None for name in self._elementwise_states(group, kind)}
        shapes.update(self._shaped_states(group, p))
        return shapes

    def _check_state(self, group: dict, p: Tensor, kind) -> None:
        """Raise RuntimeError (before any update) when an existing state entry
        is not what the kernels take: another dtype than this optimizer stores
        (e.g. assigned by hand: load_state_dict converts, the kernels would
        not), another shape than the param's (a param resized through .data,
        a state replaced by hand), or not a tensor. Missing entries are fine:
        they are created at first use."""
        state = self.state.get(p)
        if not state:
            return
        name_ = type(self).__name__
        where = f"{name_}: state {{!r}} of a {p.dtype} param of shape {tuple(p.shape)}"
        fixed = {"step": (torch.float32, ())}
        master = self._master_name(p)
        if master is not None:
            fixed[master] = (_FIXED_DTYPES[master], None)
        expected = {name: (self._state_dtype(p, name), shape)
                    for name, shape in self._state_shapes(group, p, kind).items()}
        is_dtensor = dtensor.is_dtensor(p)
        local_shapes = self._state_shapes(group, p._local_tensor, kind) if is_dtensor else {}
        for name, (dtype, shape) in {**fixed, **expected}.items():
            if name not in state:
                continue
            t = state[name]
            if not isinstance(t, Tensor):
                raise RuntimeError(f"{where.format(name)} is a {type(t).__name__}, not a tensor")
            if name == "step":  # the kernels advance it in place, as one float32
                if t.dtype != torch.float32 or t.numel() != 1 or t.device != p.device:
                    raise RuntimeError(f"{where.format(name)} is a {t.dtype} tensor of {t.numel()} elements on "
                                       f"{t.device}; the kernels take one float32 on {p.device} (load_state_dict "
                                       f"converts)")
                continue
            if dtype == FP8_STATE_DTYPE and t.dtype == dtype:
                if not _fp8_state_ok(state, name, p):
                    raise RuntimeError(
                        f"{name_}: FP8 state {name!r} of a param of shape {tuple(p.shape)} needs the "
                        f"param's shape, contiguous, and {fp8_states.scale_name(name)!r}: fp32 "
                        f"[{fp8_states.n_blocks(p.numel())}] (one scale per {fp8_states.BLOCK} elements)")
                continue
            if t.dtype != dtype:
                raise RuntimeError(
                    f"{where.format(name)} is {t.dtype}, but this optimizer stores it as {dtype} (state_dtype="
                    f"{self.state_dtype}, master_weights={self.master_weights}); load states with "
                    f"load_state_dict, which converts them")
            want = tuple(p.shape) if shape is None else tuple(shape)
            if tuple(t.shape) != want or t.device != p.device:
                raise RuntimeError(f"{where.format(name)} has shape {tuple(t.shape)} on {t.device}; the kernels "
                                   f"take {want} on {p.device}")
            if is_dtensor or dtensor.is_dtensor(t):
                self._check_dtensor_state(where.format(name), name, p, t, local_shapes.get(name))
        if self._uses_fp8(p) and "fp8_weight" in state:
            t = state["fp8_weight"]
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
                raise RuntimeError(f"{where.format('fp8_weight')} must be a tensor of the param's shape")

    def _state_placements(self, p: Tensor, name: str) -> tuple:
        """The placements of DTensor param p's state `name`: p's, with
        Replicate on the mesh dims that shard a dim the state reduces."""
        return dtensor.sharding_of(p).reduced_placements(self._reduced_dims.get(name, ()))

    def _check_dtensor_state(self, where: str, name: str, p: Tensor, t: Tensor, local_shape) -> None:
        """A state of a DTensor param is a DTensor on its mesh with the
        placements that follow from the param's (dtensor.Sharding) and the
        local shape the kernels read; a plain param's states are plain."""
        if not dtensor.is_dtensor(p):
            raise RuntimeError(f"{where} is a DTensor, but the param is a plain tensor")
        if not dtensor.is_dtensor(t):
            raise RuntimeError(f"{where} is a plain tensor, but the param is a DTensor on {p.device_mesh} with "
                               f"placements {p.placements}: its states are DTensors (load_state_dict converts)")
        placements = self._state_placements(p, name)
        if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(placements):
            raise RuntimeError(f"{where} is a DTensor on {t.device_mesh} with placements {t.placements}; the "
                               f"kernels take it on {p.device_mesh} with {tuple(placements)} (load_state_dict "
                               f"redistributes)")
        want = p._local_tensor.shape if local_shape is None else torch.Size(local_shape)
        if t._local_tensor.shape != want:
            raise RuntimeError(f"{where} has a local shard of shape {tuple(t._local_tensor.shape)}; the param's "
                               f"local shard takes {tuple(want)}")

    def _prepare_state(self, group: dict, p: Tensor, kind) -> dict:
        """The param's state, with anything missing created (lazily, as torch
        does), after _check_state's checks of what is there."""
        self._check_state(group, p, kind)
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        # a DTensor's states are made from its local shard and wrapped (dtensor.like), without DTensor dispatch
        sharded = dtensor.is_dtensor(p)
        lp = p._local_tensor if sharded else p
        local_shapes = self._state_shapes(group, lp, kind) if sharded else {}
        for name, shape in self._state_shapes(group, p, kind).items():
            dtype = self._state_dtype(p, name)
            if name not in state and dtype == FP8_STATE_DTYPE:
                state[name], state[fp8_states.scale_name(name)] = fp8_states.empty_like(p)
            elif name not in state:
                value = (torch.zeros_like(lp, dtype=dtype, memory_format=torch.preserve_format) if shape is None
                         else torch.zeros(local_shapes.get(name, shape), dtype=dtype, device=lp.device))
                state[name] = value if not sharded else dtensor.like(p, value) if shape is None else \
                    dtensor.like(p, value, self._state_placements(p, name), shape)
        master_name = self._master_name(p)
        if master_name is not None and master_name not in state:
            state[master_name] = masters.initial(p, master_name)
        if self._uses_fp8(p) and "fp8_weight" not in state:
            state.update(self.fp8.initial_state(self.master_param(p)))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict (ours or torch.optim's, which share a layout).

        torch casts every floating state tensor to its param's dtype and leaves
        ``step`` where it was saved. Afterwards: steps go to the param's device
        as float32, the other states are taken from the saved values in the
        dtype this optimizer stores (``state_dtype``, or fp32 with master
        weights: a bf16 param's fp32 moments are not rounded through bf16 on
        the way), and with master weights the master is taken at fp32 from the
        saved one, or from the param when the saved state has none (e.g. a
        torch.optim.AdamW checkpoint). FP8 copies (``fp8=``) are loaded as
        saved when they match the recipe's dtype and history length, and are
        otherwise re-created from the weight at the next step.

        Load hooks work as on torch's optimizers: the conversion reads the
        state_dict the pre-hooks returned, and runs before the post-hooks.
        Then every group and state is checked as a step would check it; on any
        error the optimizer is left as it was before the call.
        """
        before = (self.state, self.param_groups, self._plans)
        hooked: list[dict] = []
        # registered now, so that the pre-hook runs after the user's (it sees
        # the dict they returned) and the post-hook before theirs
        pre = self.register_load_state_dict_pre_hook(lambda _, sd: hooked.append(sd))
        post = self.register_load_state_dict_post_hook(lambda _: self._convert_loaded(hooked[-1]), prepend=True)
        try:
            super().load_state_dict(state_dict)  # replaces self.state and self.param_groups
        except BaseException:
            self.state, self.param_groups, self._plans = before  # torch never modifies the old containers
            raise
        finally:
            pre.remove()
            post.remove()

    def _convert_loaded(self, state_dict: dict) -> None:
        """load_state_dict's work after torch's (see there), then its checks."""
        self._plans = {}
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        writes: list[tuple[Tensor, Tensor]] = []  # params rewritten from loaded fp32 masters, after the checks
        for saved_id, (group, p) in zip(saved_ids, params):
            state = self.state.get(p)
            saved = state_dict["state"].get(saved_id)
            if not state or saved is None:
                continue
            if "step" in state:
                state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device).reshape(()).clone()
            self._load_states(p, state, saved)
            if not self._uses_fp8(p) or not _fp8_state_matches(state, self.fp8):
                # no recipe now, or one of another dtype / history length: the
                # FP8 state is re-created from the weight at the next step
                for name in _FP8_STATES:
                    state.pop(name, None)
            if dtensor.is_dtensor(p) or any(dtensor.is_dtensor(v) for v in state.values()):
                self._place_loaded(group, p, state)
            writes += masters.convert_loaded(self._master_name(p), p, state, type(self).__name__)
        for index, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {index} of the loaded state_dict")
            for p in group["params"]:
                try:
                    self._check_state(group, p, self._bucket_kind(p))
                except RuntimeError as e:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {e}") from None
        for target, bits in writes:
            target.copy_(bits)
        self._outside.record([p for _, p in params], self.state)

    def _place_loaded(self, group: dict, p: Tensor, state: dict) -> None:
        """Loaded states in the layout the kernels take for p: for a DTensor
        param, a whole (plain) state is cut into this rank's shard (no
        communication: every rank holds it) and a DTensor state of other
        placements is redistributed; a plain param's DTensor state is
        gathered (a collective, as every rank loads the same dict)."""
        from torch.distributed.tensor import distribute_tensor

        shapes = self._state_shapes(group, p, self._bucket_kind(p))
        sharding = dtensor.sharding_of(p)
        for name, value in list(state.items()):
            if not isinstance(value, Tensor) or name == "step" or (name not in shapes and name not in masters.DTYPES):
                continue
            if sharding is None:
                if dtensor.is_dtensor(value):
                    state[name] = value.full_tensor()
                continue
            shape = shapes.get(name)
            placements = self._state_placements(p, name)
            want = tuple(p.shape) if shape is None else tuple(shape)
            if dtensor.is_dtensor(value):
                if value.device_mesh != p.device_mesh:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: state {name!r} of a param on "
                                     f"{p.device_mesh} is a DTensor on {value.device_mesh}")
                if tuple(value.placements) != tuple(placements):
                    value = value.redistribute(p.device_mesh, placements)
            elif tuple(value.shape) == want:
                value = distribute_tensor(value.to(p.device), p.device_mesh, placements, src_data_rank=None)
            else:
                continue  # _check_state names what is wrong with it
            state[name] = dtensor.like(p, value._local_tensor.contiguous(), placements, shape)

    def _load_states(self, p: Tensor, state: dict, saved: dict) -> None:
        """Take p's saved floating-point states into `state` in the dtype this
        optimizer stores. Block-scaled FP8 states (a payload with its
        ``<name>_scale``) are kept as stored when this optimizer stores FP8
        too, else decoded; full-precision ones are encoded when it does."""
        scale_keys = {fp8_states.scale_name(n) for n, v in saved.items()
                      if isinstance(v, Tensor) and v.dtype == FP8_STATE_DTYPE}
        for key in [k for k in state if k.endswith("_scale") and k not in _FIXED_DTYPES]:
            state.pop(key)  # torch's load put them there cast to the param's dtype
        for name, value in saved.items():
            if name == "step" or name in scale_keys or not isinstance(value, Tensor):
                continue
            if name in _FIXED_DTYPES:  # (the int16 remainder too: torch's load cast it to the param's dtype)
                dtype = _FIXED_DTYPES[name]
                state[name] = value.to(device=p.device, dtype=dtype or value.dtype, copy=True)
                continue
            if not value.is_floating_point():
                continue
            target = self._state_dtype(p, name)
            scale = saved.get(fp8_states.scale_name(name))
            if value.dtype == FP8_STATE_DTYPE and not isinstance(scale, Tensor):
                raise ValueError(f"{type(self).__name__}.load_state_dict: the FP8 state {name!r} of a param of "
                                 f"shape {tuple(p.shape)} comes without its {fp8_states.scale_name(name)!r}")
            if value.dtype == FP8_STATE_DTYPE and target == FP8_STATE_DTYPE:
                q, scales = value, scale  # as stored: no second rounding
            elif value.dtype == FP8_STATE_DTYPE:
                state[name] = fp8_states.decode(name, value, scale).to(device=p.device, dtype=target)
                continue
            elif target == FP8_STATE_DTYPE:
                q, scales = fp8_states.encode(name, value.to(p.device).reshape(p.shape))
            else:
                state[name] = value.to(device=p.device, dtype=target, copy=True)
                continue
            state[name] = q.to(p.device).reshape(p.shape).contiguous().clone()
            state[fp8_states.scale_name(name)] = scales.to(device=p.device, dtype=torch.float32, copy=True)

    def fp8_weight(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``(fp8_tensor, scale_inv)``: the FP8 copy of param p written by the
        last step (a recipe's dtype, p's shape) and the inverse of the scale it
        was cast with (0-d fp32), so that ``fp8_tensor.float() * scale_inv``
        approximates the weight; ready for ``torch._scaled_mm``. Before p's
        first step this creates p's state, with the copy cast from the initial
        weight (Float8Recipe.initial_state), so the first forward has one too.
        Call it where the copy is used (a dict lookup), not once: steps update
        these tensors in place, but scale_inv moves into a new buffer shared
        by the bucket whenever the step's set of tensors changes (the first
        step after the state is created or loaded, a step where some param of
        the group has no grad, ...), and a tensor kept from before stops
        following."""
        if self.fp8 is None:
            raise RuntimeError(f"{type(self).__name__} keeps no FP8 copies: pass fp8=fusedopt.Float8Recipe(...)")
        state = self.state.get(p)
        if not state or "fp8_weight" not in state:
            group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
            if group is None:
                raise ValueError("fp8_weight: this tensor is not a param of this optimizer")
            state = self._prepare_state(group, p, self._bucket_kind(p))
        return state["fp8_weight"], state["fp8_scale_inv"]

