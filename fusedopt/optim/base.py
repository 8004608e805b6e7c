"""What every fusedopt optimizer shares: backend choice, grouping of the
parameters into kernel-ready buckets, state creation (including fp32 master
weights), GradScaler support, and a state_dict that torch.optim can read.

A subclass names the backend op it runs (``_op``), declares its
hyperparameters (``defaults``), names its state tensors (``_elementwise_states``
for those shaped like the param, ``_shaped_states`` for others) and launches
its update on a bucket (``_update``); ``_bucket_kind`` may split a (device,
dtype) bucket further. A step is:

1. check every group's hyperparameters, every grad (sparse layout, dtype,
   shape) and every existing state tensor (dtype, shape), and raise before
   anything changes: no group is half-stepped;
2. per param group, collect the params with grads into one Bucket per
   (device, dtype), creating state at first use, staging any tensor a flat
   kernel cannot walk (non-dense views, mismatched strides); this plan is
   cached and reused while the same tensors come back (_Plan);
3. with ``max_grad_norm``, one norm launch per bucket gives the global grad
   norm (all groups), from which a clip coefficient is formed on the device;
4. launch the update, one call per bucket, with one grad multiplier per device
   (GradScaler's 1/scale times the clip coefficient: .grad is never
   rewritten); the backend also advances each parameter's step count on its
   device (not when GradScaler found inf/NaN);
5. copy staged results back.

Under torch.compile the step is traced into the graph where it can be
(_traced_plans: the plans rebuilt without the cache, Dynamo's guards standing
in for its checks), else it runs eagerly behind a graph break (_eager_step).

DTensor params (FSDP2, tensor parallel) are planned by their local shards and
their states are DTensors of their layout (fusedopt.dtensor). An optimizer
whose update needs whole-tensor statistics reduces them through
``Bucket.whole_tensor_sums`` (LAMB) or ``Bucket.stats`` (Adafactor's sharded
path); ``_reduced_dims`` names its states that reduce some of the param's
dims (their placements follow), ``_launches_empty_shards`` whether empty
local shards take part in its launches, and ``_join_statistics`` what a rank
whose shards of a bucket are all empty contributes to its collectives.
"""
from __future__ import annotations

from itertools import chain
from operator import attrgetter, is_

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends, dtensor
from ..fp8 import bucket_copies
from ..backends._bucket import Bucket, advance_steps
from ..backends._dtypes import FP8_STATE_DTYPE, LOW_PRECISION, STATE_DTYPES, SUPPORTED_PARAM_DTYPES, fp32_scalar
from ..reference import fp8_states


class FusedOptimizer(Optimizer):
    # GradScaler hands us grad_scale and found_inf (as attributes) instead of
    # unscaling the grads itself: the kernels unscale while they update.
    _step_supports_amp_scaling = True
    #: the backend function this optimizer's update calls (a backend without it is not a candidate)
    _op: str = ""
    #: states that keep their default storage when state_dtype is FP8 (Adafactor's second-moment
    #: statistics: factored ones are tiny, and the issue asks FP8 for the first moment only)
    _fp8_exempt_states: frozenset[str] = frozenset()
    #: whether each element's update depends on that element alone (no per-tensor norms or
    #: factored statistics): then a flat shard of many params can be stepped as one tensor (ZeRO)
    _elementwise_update: bool = True
    #: whether complex params are stepped as pairs of reals (torch's Adam family: view_as_real); the
    #: states are complex, as torch's, and the kernels read real views of everything
    _supports_complex: bool = True
    #: the param dtypes the step takes (with _supports_complex: complex64/128 too)
    _param_dtypes = SUPPORTED_PARAM_DTYPES + (torch.complex64, torch.complex128)
    #: states that reduce some of their param's dims ({name: dims}, e.g. Adafactor's row_var: the last):
    #: on DTensor params they are Replicate on the mesh dims that shard those dims
    _reduced_dims: dict[str, tuple[int, ...]] = {}

    def __init__(self, params, defaults: dict, *, backend: str | None = None, master_weights: bool = False,
                 max_grad_norm: float | None = None, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, fp8=None):
        check_options(max_grad_norm, master_weights)
        _check_state_dtype(type(self).__name__, state_dtype)
        self._requested_backend = backends.validate_name(backend)
        self.master_weights = master_weights
        #: storage dtype of the elementwise states; None: the param's dtype (fp32 with master weights)
        self.state_dtype = state_dtype
        #: round bf16 params without master weights stochastically (see fusedopt.reference.stochastic)
        self.stochastic_rounding = bool(stochastic_rounding)
        #: a fusedopt.Float8Recipe: the step also writes FP8 copies of the weights (see fp8_weight)
        self.fp8 = fp8
        #: clip by the global L2 norm of all grads inside step(); None or 0: off
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        self._last: dict = {"grad_norm": None}  # see last_grad_norm
        self._backend_names: dict[str, str] = {}
        self._plans: dict[int, _Plan | None] = {}  # per param group index (see _Plan)
        #: set by fusedopt.distributed.PipelineOptimizer: sums this stage's grad power sum and GradScaler
        #: flag with the other pipeline stages' (one collective), and names the params another stage counts
        self._across_stages = None
        #: set by a composite optimizer (FusedMuon) that clips by the norm of all its parts' grads: this
        #: step's clip coefficient (a 0-d device tensor), used instead of one from max_grad_norm
        self._outer_clip: Tensor | None = None
        self._has_complex = False  # some param is complex: its grads are read as real views
        super().__init__(params, defaults)

    # --- backend choice -------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, with this optimizer's checks made first: a
        group it cannot step (bad hyperparameters, a device no backend runs on,
        params an FP8 recipe cannot copy) raises and is not added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif params is not None and not isinstance(params, set):  # torch refuses sets itself
            param_group["params"] = list(params)  # a generator is read once, here
        candidate = {**self.defaults, **param_group}
        self._check_group(candidate, f"param group {len(self.param_groups)}")
        for i, p in enumerate(param_group.get("params") or ()):
            if not isinstance(p, Tensor):
                continue  # torch's TypeError follows
            where = f"{type(self).__name__}: param {i} of param group {len(self.param_groups)}"
            dtensor.check_tensor(p, where)
            if dtensor.is_dtensor(p):
                self._check_dtensor_options(where)
            self._backend_for(p.device)
            if p.is_complex() and self._supports_complex:  # (others raise at step, as torch.optim.Adafactor)
                self._check_complex(where, p)
            if self.fp8 is not None and not self._uses_fp8(p):
                raise ValueError(f"{type(self).__name__}: FP8 copies are written from fp32 weights: {p.dtype} params "
                                 f"need master_weights=True" if p.dtype in LOW_PRECISION else
                                 f"{type(self).__name__}: FP8 copies are written from fp32 weights, not {p.dtype}")
        super().add_param_group(param_group)
        self._has_complex |= any(isinstance(p, Tensor) and p.is_complex() for p in self.param_groups[-1]["params"])

    def _check_complex(self, where: str, p: Tensor) -> None:
        """Raise for a complex param this optimizer cannot step as pairs of reals."""
        if p.dtype not in (torch.complex64, torch.complex128):
            raise TypeError(f"{where}: complex params are stepped as pairs of fp32 or fp64 reals (complex64, "
                            f"complex128), got {p.dtype}")
        if dtensor.is_dtensor(p):
            raise TypeError(f"{where} is a complex DTensor: not supported (the kernels read real views of "
                            f"plain tensors)")
        if self.state_dtype is not None:
            raise ValueError(f"{where} is complex: its states are complex, as torch's (state_dtype="
                             f"{self.state_dtype} takes real params only)")

    def _check_dtensor_options(self, where: str) -> None:
        """Raise ValueError for the options that do not run on DTensor params
        yet: their FP8 scales are per block or per tensor of the local shard,
        which a checkpoint cannot reshard, and FP8 copies need each tensor's
        amax reduced over the mesh."""
        if self.state_dtype == FP8_STATE_DTYPE:
            raise ValueError(f"{where} is a DTensor: block-scaled FP8 states (state_dtype=torch.float8_e4m3fn) "
                             f"are not supported on DTensor params yet; use state_dtype=torch.bfloat16 or None")
        if self.fp8 is not None:
            raise ValueError(f"{where} is a DTensor: FP8 weight copies (fp8=) are not supported on DTensor "
                             f"params yet")

    def _backend_for(self, device: torch.device):
        name = self._backend_names.get(device.type)
        if name is None:
            name = self._backend_names[device.type] = backends.resolve(self._requested_backend, device, self._op)
        return backends.get(name)

    @property
    def backend(self) -> str | dict[str, str]:
        """The backend that runs the step: its name, or {device type: name}
        when the parameters live on several device types."""
        names = set(self._backend_names.values())
        if len(names) == 1:
            return names.pop()
        return dict(self._backend_names)

    def __getstate__(self):
        state = super().__getstate__()
        state.update(_requested_backend=self._requested_backend, master_weights=self.master_weights,
                     state_dtype=self.state_dtype, stochastic_rounding=self.stochastic_rounding, fp8=self.fp8,
                     _backend_names=dict(self._backend_names), max_grad_norm=self.max_grad_norm,
                     last_grad_norm=self.last_grad_norm)
        return state

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The global grad norm of the last step (a device tensor), with max_grad_norm."""
        return self._last["grad_norm"]

    def __setstate__(self, state):
        # also called by torch's load_state_dict with only state and param_groups
        last = state.pop("last_grad_norm", None)
        super().__setstate__(state)
        if "last_grad_norm" in state or not hasattr(self, "_last"):
            self._last = {"grad_norm": last}
        for name, default in (("state_dtype", None), ("stochastic_rounding", False), ("fp8", None),
                              ("_across_stages", None), ("_outer_clip", None)):
            if not hasattr(self, name):  # pickled before it existed
                setattr(self, name, default)
        self._has_complex = any(isinstance(p, Tensor) and p.is_complex()
                                for group in self.param_groups for p in group["params"])
        self._plans = {}  # plans hold tensors of the original: never carried over

    # --- what subclasses provide ----------------------------------------------

    def _elementwise_states(self, group: dict, kind) -> tuple[str, ...]:
        """Names of the state tensors shaped like the param, in kernel order,
        for params of bucket kind `kind`."""
        raise NotImplementedError

    def _shaped_states(self, group: dict, p: Tensor) -> dict[str, tuple[int, ...]]:
        """State tensors not shaped like the param: {name: shape} (zeros at first use)."""
        return {}

    def _bucket_kind(self, p: Tensor):
        """What else, beyond (device, dtype), must params share to go in one launch."""
        return None

    def _launches_empty_shards(self, kind) -> bool:
        """Whether buckets of this kind take DTensors whose local shard is
        empty (their update then runs on empty tensors: not the kernels')."""
        return False

    def _needs_contiguous(self, kind) -> bool:
        """Whether kernels for this kind index rows and columns (row-major
        contiguous tensors), not just flat elements (any dense layout)."""
        return False

    def _update(self, backend, group: dict, bucket: Bucket, lr, grad_mult, found_inf) -> None:
        """Launch this optimizer's update of one bucket on `backend`."""
        raise NotImplementedError

    def _join_statistics(self, group: dict, bucket: Bucket) -> None:
        """For a bucket whose DTensors all have empty local shards on this rank:
        take part in the collectives its update would make on other ranks,
        with zero partial sums (none for an elementwise update)."""

    def _check_group(self, group: dict, where: str) -> None:
        """Raise ValueError if the group's hyperparameters cannot be stepped
        with (`where` names the group in the message). Called when a group is
        added, for every group at the start of every step and after
        load_state_dict: a value edited in param_groups is checked too. This
        base checks lr; subclasses add theirs (GroupCheck)."""
        GroupCheck(type(self).__name__, group, where).at_least(0.0, "lr")

    def _clip_multiplier(self, total_norm: Tensor, max_norm: float) -> Tensor:
        """The grads' factor for a global norm: clip_grad_norm_'s
        min(max_norm / (total_norm + 1e-6), 1), formed on the device."""
        return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)

    # --- state ------------------------------------------------------------------

    def _uses_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in LOW_PRECISION

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
        fixed = {"step": (torch.float32, ()), "master_param": (torch.float32, None)} if self._uses_master(p) \
            else {"step": (torch.float32, ())}
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
        if self._uses_master(p) and "master_param" not in state:
            master = lp.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
            state["master_param"] = dtensor.like(p, master) if sharded else master
        if self._uses_fp8(p) and "fp8_weight" not in state:
            state.update(self.fp8.initial_state(state.get("master_param", p)))
        return state

    # --- the step -----------------------------------------------------------------

    def _check_grads(self, params: list[Tensor], grads: list) -> None:
        """Raise on any grad the kernels cannot take, before anything is modified.

        One combined test per grad: this runs for every param at every step.
        Shapes and devices: torch refuses a .grad of another shape or device
        when it is assigned, but a param resized or moved through ``.data``
        keeps its old grad. They are checked where a plan is built
        (_plans_of_this_step); a cached plan is reused only while the params
        keep their shapes and the grads their sizes (_Plan.reusable).
        """
        dtensor_type = dtensor.dtensor_class()
        for p, g in zip(params, grads):
            if g is None:
                continue
            if type(p) is dtensor_type and type(g) is dtensor_type:
                # a DTensor grad of its param's mesh, placements and dtype (what FSDP2 and TP give) in a few
                # plain attribute reads: a DTensor's .dtype or .layout costs ~3x a plain tensor's
                ps, gs = p._spec, g._spec
                dtype = ps.tensor_meta.dtype
                if not ((ps.placements == gs.placements or dtensor.grad_fits(g, p))
                        and (ps.mesh is gs.mesh or ps.mesh == gs.mesh) and gs.tensor_meta.dtype is dtype
                        and dtype in SUPPORTED_PARAM_DTYPES and g._local_tensor.layout is torch.strided):
                    self._refuse_grad(p, g)
                continue
            if g.layout is not torch.strided or g.dtype is not p.dtype or p.dtype not in self._param_dtypes:
                self._refuse_grad(p, g)
            if (type(p) not in _PLAIN or type(g) not in _PLAIN) and not _grad_matches(p, g):
                self._refuse_grad(p, g)

    def _refuse_grad(self, p: Tensor, g: Tensor) -> None:
        """Raise the error _check_grads found for param p and its grad g."""
        name = type(self).__name__
        if dtensor.is_dtensor(p) and not (dtensor.is_dtensor(g) and dtensor.grad_fits(g, p)):
            raise RuntimeError(
                f"{name}: the grad of a DTensor param of shape {tuple(p.shape)} on {p.device_mesh} with placements "
                f"{p.placements} is " + (f"a DTensor with placements {g.placements} on {g.device_mesh}"
                                         if dtensor.is_dtensor(g) else f"a {type(g).__name__}") +
                "; the kernels step local shards, so it must have the param's mesh and placements (or pending "
                "sums, Partial, where the param is Replicate): redistribute it first")
        if dtensor.is_dtensor(g) and not dtensor.is_dtensor(p):
            raise RuntimeError(f"{name}: a plain param of shape {tuple(p.shape)} has a DTensor grad")
        if not dtensor.is_dtensor(g):
            dtensor.check_tensor(g, f"{name}: the grad of a param of shape {tuple(p.shape)}")
        layout = dtensor.local(g).layout
        if layout is not torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients (got {layout})")
        if p.is_complex() and not self._supports_complex:  # (as torch.optim.Adafactor says it)
            raise RuntimeError(f"{name} does not support complex parameters")
        if p.dtype not in self._param_dtypes:
            raise TypeError(f"{name} supports float32, float64, bfloat16 and float16 params (and complex64, "
                            f"complex128 as pairs of reals), got {p.dtype}")
        if g.dtype is not p.dtype:
            raise RuntimeError(f"{name}: a grad must have its param's dtype; got a {g.dtype} grad for a "
                               f"{p.dtype} param of shape {tuple(p.shape)}")
        raise RuntimeError(f"{name}: a grad of shape {tuple(g.shape)} on {g.device} for a param of shape "
                           f"{tuple(p.shape)} on {p.device} (was the param resized or moved through .data?)")

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating `closure`)."""
        if torch.compiler.is_compiling() and closure is None:
            plans = self._traced_plans()
            if plans is not None:  # Dynamo traces the launches: the step is part of the graph
                self._launch(plans)
                return None
        return self._eager_step(closure)

    @torch._disable_dynamo  # under torch.compile: a graph break (see _traced_plans for when)
    @torch.no_grad()
    def _eager_step(self, closure):
        loss = evaluate_closure(closure)
        plans, writeback = self._plans_of_this_step()
        self._launch(plans)
        for original, staged in writeback:
            original.copy_(staged)
        return loss

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
          (``TRACEABLE``: cpu; the reference backend reads scalars on the
          host), DTensor or complex params, FP8
          states or copies, stochastic rounding (a seed drawn on the host),
          pipeline stages, a composite optimizer's outer clip."""
        if (self._across_stages is not None or self._outer_clip is not None or self._has_complex
                or self.fp8 is not None or self.state_dtype == FP8_STATE_DTYPE):
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

    def _launch(self, plans: list[_Plan]) -> None:
        """The step's device work for the plans: GradScaler's flag, the clip
        coefficient, then each bucket's update."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = _found_inf_on_every_rank(getattr(self, "found_inf", None), plans)
        power = self._grad_power_sum(plans) if self.max_grad_norm else None
        if self._across_stages is not None:
            power, found_inf = self._across_stages.reduce(power, found_inf, clipping=bool(self.max_grad_norm))
        clip = self._clip_coefficient(power, plans, grad_scale) if self._outer_clip is None else self._outer_clip
        scalars = _GradScalars(grad_scale, found_inf, clip)
        for group, plan in zip(self.param_groups, plans):
            for device, steps in plan.empty_steps.items():
                advance_steps(steps, scalars.found_inf(device))
            for bucket in plan.buckets:
                lr = group["lr"]
                if isinstance(lr, Tensor):
                    lr = fp32_scalar(lr, bucket.device)
                bucket.sr_seed = self._stochastic_rounding_seed(bucket)
                if not bucket.params:  # only DTensors with empty local shards: nothing to launch
                    self._join_statistics(group, bucket)
                    continue
                self._update(self._backend_for(bucket.device), group, bucket, lr,
                             scalars.grad_mult(bucket.device), scalars.found_inf(bucket.device))

    def _stochastic_rounding_seed(self, bucket: Bucket) -> int | None:
        """A fresh seed for each launch that rounds stochastically (bf16 params
        without masters), drawn from torch's default CPU generator: repeatable
        under torch.manual_seed, and no device sync. None: round to nearest."""
        if not self.stochastic_rounding or bucket.dtype != torch.bfloat16 or bucket.masters is not None:
            return None
        return int(torch.randint(0, 2**31, (), dtype=torch.int64))  # 31 bits: a Triton int32 argument

    def _grad_power_sum(self, plans: list[_Plan]) -> Tensor | None:
        """The sum of the squares of every grad the optimizer holds (all
        groups; fp64, 0-d; DTensors over their whole tensors), or None when no
        param has a grad. One reduction launch per bucket; nothing leaves the
        device. Params another pipeline stage counts are left out."""
        uncounted = self._across_stages.uncounted if self._across_stages is not None else ()
        total = None
        for plan in plans:
            for b, members in zip(plan.buckets, plan.bucket_members):
                # the kernels take no empty tensor: those of a sharded Adafactor bucket (empty local shards) sum to 0
                index = range(len(b.grads)) if b.stats is None else [i for i, g in enumerate(b.grads) if g.numel()]
                if len(index) == len(b.grads) and index:
                    sums = self._backend_for(b.device).power_sums(b.grads, 2.0)
                else:
                    sums = torch.zeros(len(b.grads), dtype=torch.float64, device=b.device)
                    if index:
                        sums[index] = self._backend_for(b.device).power_sums([b.grads[i] for i in index], 2.0)
                sums = b.whole_tensor_sums(sums, every_member=True)[0]  # DTensors: over their shards
                if uncounted and any(id(p) in uncounted for p in members):
                    counted = b.launch_cache.get("counted")
                    if counted is None:
                        counted = b.launch_cache["counted"] = torch.tensor(
                            [id(p) not in uncounted for p in members], device=b.device)
                    sums = torch.where(counted, sums, 0.0)  # (not a product: inf * 0 is NaN)
                part = sums.sum()
                total = part if total is None else total + part.to(total.device)
        return total

    def _clip_coefficient(self, power: Tensor | None, plans: list[_Plan], grad_scale: Tensor | None) -> Tensor | None:
        """With max_grad_norm: the global L2 norm from the grads' power sum
        (GradScaler's scale divided out), kept in last_grad_norm, and the clip
        coefficient from it, on the device."""
        if not self.max_grad_norm:
            return None
        # (kept in a dict: Dynamo drops attribute stores on an Optimizer in a traced step, not dict stores)
        if power is None:  # no grads: a norm of 0, as clip_grad_norm_ returns, and nothing to scale
            self._last["grad_norm"] = torch.zeros(())
            return None
        total = power.sqrt()
        if grad_scale is not None:
            total = total / grad_scale.to(device=total.device, dtype=torch.float64).reshape(())
        # fp64 when some grads are, else fp32, and the coefficient in that dtype: as clip_grad_norm_ forms them
        fp64 = any(bucket.dtype == torch.float64 for plan in plans for bucket in plan.buckets)
        self._last["grad_norm"] = norm = total if fp64 else total.float()
        return self._clip_multiplier(norm, self.max_grad_norm)

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
            master = state.get("master_param") if self._uses_master(p) else None
            fp8 = self._uses_fp8(p)
            # block-scaled FP8 states: their scales ride along like shaped states,
            # and the blocks run in row-major order, so everything is made contiguous
            fp8_scales = [fp8_states.scale_name(n) for n in names if self._state_dtype(p, n) == FP8_STATE_DTYPE]
            shaped = [*shaped, *fp8_scales]
            plan.watch(p, lp, state, ["step", *names, *shaped] + (["master_param"] if master is not None else [])
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
                                       masters=[] if master is not None else None), [])
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

    # --- state_dict -------------------------------------------------------------

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
        for saved_id, (group, p) in zip(saved_ids, params):
            state = self.state.get(p)
            saved = state_dict["state"].get(saved_id)
            if not state or saved is None:
                continue
            if "step" in state:
                state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device).reshape(()).clone()
            self._load_states(p, state, saved)
            if self._uses_master(p):
                if "master_param" not in state:
                    state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                          copy=True)
            else:
                state.pop("master_param", None)
            if not self._uses_fp8(p) or not _fp8_state_matches(state, self.fp8):
                # no recipe now, or one of another dtype / history length: the
                # FP8 state is re-created from the weight at the next step
                for name in _FP8_STATES:
                    state.pop(name, None)
            if dtensor.is_dtensor(p) or any(dtensor.is_dtensor(v) for v in state.values()):
                self._place_loaded(group, p, state)
        for index, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {index} of the loaded state_dict")
            for p in group["params"]:
                try:
                    self._check_state(group, p, self._bucket_kind(p))
                except RuntimeError as e:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {e}") from None

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
            if not isinstance(value, Tensor) or name == "step" or (name not in shapes and name != "master_param"):
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
            if name == "step" or name in scale_keys or not isinstance(value, Tensor) or not value.is_floating_point():
                continue
            if name in _FIXED_DTYPES:
                dtype = _FIXED_DTYPES[name]
                state[name] = value.to(device=p.device, dtype=dtype or value.dtype, copy=True)
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


_shape = attrgetter("shape")


def evaluate_closure(closure) -> Tensor | None:
    """torch.optim's step(closure): the loss, recomputed with grad enabled (step itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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


def _grad_matches(p: Tensor, g: Tensor) -> bool:
    """Whether grad g fits param p beyond dtype and layout: a DTensor param's
    grad is a DTensor of the same mesh and placements (or pending sums where
    the param is Replicate: dtensor.grad_fits), a plain param's a tensor the
    kernels can take."""
    if dtensor.is_dtensor(p):
        return dtensor.is_dtensor(g) and dtensor.grad_fits(g, p)
    if dtensor.is_dtensor(g):
        return False
    try:
        dtensor.check_tensor(g, "")
    except TypeError:
        return False
    return True
#: the FP8 copy's state (fusedopt.fp8.Float8Recipe)
_FP8_STATES = ("fp8_weight", "fp8_scale", "fp8_scale_inv", "fp8_amax_history")
#: states whose dtype does not follow state_dtype (None: the saved one)
_FIXED_DTYPES = {"master_param": torch.float32, "fp8_weight": None, "fp8_scale": torch.float32,
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


def check_options(max_grad_norm, master_weights) -> None:
    """The options every fusedopt optimizer takes, checked before anything is built."""
    if max_grad_norm is not None and not float(max_grad_norm) >= 0.0:
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (None or 0 turns clipping off)")
    if not isinstance(master_weights, bool):  # a string or a number is not silently taken as True
        raise ValueError(f"master_weights must be True or False, got {master_weights!r}")


def _check_state_dtype(name: str, state_dtype) -> None:
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


def check_hyperparameters(lr, eps: float, betas, weight_decay: float) -> None:
    """The range checks torch.optim's Adam family makes, with its messages."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _GradScalars:
    """This step's per-device scalars for the kernels, as 1-element tensors:
    found_inf (GradScaler; fp32), and the grad multiplier, GradScaler's
    1/scale times the clip coefficient (fp64, which each kernel rounds once to
    its math precision: fp64 params get the clip coefficient torch would use;
    None when neither applies). For the power-of-two scales GradScaler uses,
    multiplying by 1/scale gives the bits of dividing by the scale."""

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None, clip: Tensor | None):
        mult = None if grad_scale is None else grad_scale.detach().double().reciprocal()
        if clip is not None:
            mult = clip.double() if mult is None else clip.double() * mult.to(clip.device)
        self._values = {"grad_mult": mult, "found_inf": found_inf}
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

    def reusable(self, optimizer: "FusedOptimizer", group: dict, grads: list) -> bool:
        if group is not self.group or optimizer.master_weights != self.master_weights:
            return False
        params = group["params"]
        if len(params) != len(self.group_params) or not all(map(is_, params, self.group_params)):
            return False  # params replaced or reordered in the group (grads are taken by position)
        if tuple(g is not None for g in grads) != self.present:
            return False
        if any(optimizer._elementwise_states(group, kind) != names for kind, names in self.names.items()):
            return False
        # identity checks through map/operator.is_ run at C speed (~30 ns each)
        if not all(map(is_, map(optimizer.state.get, self.params), self.states)):
            return False
        if not all(map(is_, map(dict.get, self.watched_dicts, self.watched_keys), self.watched_tensors)):
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
