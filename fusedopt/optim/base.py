"""What every fusedopt optimizer shares: FusedOptimizer, its backend choice,
the step, clipping and GradScaler support. It inherits its state handling
(creation, checks, FP8, state_dict loading) from optim/state.py and its
launch plans from optim/plans.py; optim/checks.py holds the argument checks.

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
in for its checks), else it runs eagerly behind a graph break (_untraced_step).

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

import functools
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .. import backends, dtensor, norms
from ..backends._bucket import Bucket, advance_steps
from ..backends._dtypes import FP8_STATE_DTYPE, LOW_PRECISION, SUPPORTED_PARAM_DTYPES, fp32_scalar
from .checks import GroupCheck, check_options, check_state_dtype
from . import masters
from .masters import OutsideWrites
from .plans import _PLAIN, PlanMixin, _found_inf_on_every_rank, _GradScalars, _Plan
from .state import StateMixin


def _hooked(step):
    """torch.optim.Optimizer's step wrapper as torch installs it
    (Optimizer.profile_hook_step: the global and the optimizer's step pre- and
    post-hooks in torch's order, and the profiler's "Optimizer.step#<class>.step"
    range), with the range recorded only while a profiler runs: recording it
    costs ~6 us a step otherwise (half the host time of a small model's step).
    Marked ``hooked``, so that torch does not wrap it again."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _with_step_hooks(step, self, args, kwargs)
        return _with_step_hooks(step, self, args, kwargs)

    wrapper.hooked = True
    return wrapper


def _with_step_hooks(step, self, args, kwargs):
    """The body of torch's wrapper: pre-hooks (which may replace the
    arguments), the step, torch's _optimizer_step_code, post-hooks."""
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


class FusedOptimizer(StateMixin, PlanMixin, Optimizer):
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

    def __init__(self, params, defaults: dict, *, backend: str | None = None, master_weights: bool | str = False,
                 max_grad_norm: float | None = None, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, fp8=None):
        check_options(max_grad_norm, master_weights)
        check_state_dtype(type(self).__name__, state_dtype)
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
        #: master_weights="remainder": the params written outside the optimizer since it last wrote them
        self._outside = OutsideWrites()
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
            self._backend_for(p.device)  # an explicit backend that cannot run here raises now, not at the step
            if self.master_weights == "remainder":
                masters.check_remainder_dtype(where, p)
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
                              ("_across_stages", None), ("_outer_clip", None), ("_outside", OutsideWrites())):
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
        """The grads' factor for a global norm: clip_grad_norm_'s (LAMB's differs)."""
        return norms.clip_coefficient(total_norm, max_norm)

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
        dtensor_type = dtensor.dtensor_class()  # (first: it caches the class, which a traced step then reads)
        if _plain_grads_fit(params, grads, self._param_dtypes):
            return
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

    @_hooked
    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating `closure`)."""
        if torch.compiler.is_compiling():
            return self._compiled_step(closure)
        # eager: no autograd while the kernels write (torch.no_grad's own wrapper costs ~1.4 us more), and
        # without _untraced_step's Dynamo wrapper (a few us a step)
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._eager_step(closure)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    @torch.no_grad()
    def _compiled_step(self, closure):
        """The step while Dynamo traces: the launches into the graph where it can (_traced_plans)."""
        if closure is None:
            plans = self._traced_plans()
            if plans is not None:  # Dynamo traces the launches: the step is part of the graph
                self._launch(plans)
                return None
        return self._untraced_step(closure)

    @torch._disable_dynamo  # under torch.compile: a graph break (see _traced_plans for when)
    @torch.no_grad()
    def _untraced_step(self, closure):
        return self._eager_step(closure)

    def _eager_step(self, closure):
        loss = evaluate_closure(closure)
        if self.master_weights == "remainder":
            self._outside.resync(self.state)
        plans = self._held_plans()
        if plans is not None:
            self._launch(plans)
        else:
            plans, writeback = self._plans_of_this_step()
            self._launch(plans)
            for original, staged in writeback:
                original.copy_(staged)
            if not writeback:
                for index, plan in enumerate(plans):
                    if self._plans.get(index) is plan:  # (cached)
                        plan.hold()
        if self.master_weights == "remainder":
            self._record_master_versions()
        return loss

    def resync_master(self, params=None) -> None:
        """master_weights="remainder": take each param's current value as its
        master (its remainder zeroed), for params written outside the
        optimizer where torch does not count it (through ``.data``); writes
        torch counts (``p.copy_()`` under no_grad, a model's
        load_state_dict) are found at the next step and resynced there. All
        params, or those given."""
        self._outside.zero(self._all_params() if params is None else params, self.state)
        self._record_master_versions()

    def _record_master_versions(self) -> None:
        """After the optimizer (or a wrapper: ZeroOptimizer's gather) wrote the params."""
        self._outside.record(self._all_params(), self.state)

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _launch(self, plans: list[_Plan]) -> None:
        """The step's device work for the plans: GradScaler's flag, the clip
        coefficient, then each bucket's update."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = _found_inf_on_every_rank(getattr(self, "found_inf", None), plans)
        power = self._grad_power_sum(plans) if self.max_grad_norm else None
        if self._across_stages is not None:
            power, found_inf = self._across_stages.reduce(power, found_inf, clipping=bool(self.max_grad_norm))
        if self._outer_clip is None:
            scalars = _GradScalars(grad_scale, found_inf, *self._clip_coefficient(power, plans, grad_scale))
        else:
            scalars = _GradScalars(grad_scale, found_inf, self._outer_clip)
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

    def _clip_coefficient(self, power: Tensor | None, plans: list[_Plan],
                          grad_scale: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """With max_grad_norm: the global L2 norm from the grads' power sum
        (GradScaler's scale divided out), kept in last_grad_norm, and (the
        clip coefficient from it, None), on the device; or (None, the grads'
        multiplier) where the backend forms both in one call (clip_scalars)."""
        if not self.max_grad_norm:
            return None, None
        # (kept in a dict: Dynamo drops attribute stores on an Optimizer in a traced step, not dict stores)
        if power is None:  # no grads: a norm of 0, as clip_grad_norm_ returns, and nothing to scale
            self._last["grad_norm"] = torch.zeros(())
            return None, None
        # fp64 when some grads are, else fp32, and the coefficient in that dtype: as clip_grad_norm_ forms them
        fp64 = any(bucket.dtype == torch.float64 for plan in plans for bucket in plan.buckets)
        dtype = torch.float64 if fp64 else torch.float32
        fused = getattr(self._backend_for(power.device), "clip_scalars", None)
        if (fused is not None and type(self)._clip_multiplier is FusedOptimizer._clip_multiplier
                and (grad_scale is None or (grad_scale.device == power.device
                                            and grad_scale.dtype in (torch.float32, torch.float64)))):
            self._last["grad_norm"], mult = fused(power, grad_scale, self.max_grad_norm, dtype)
            return None, mult
        self._last["grad_norm"] = norm = norms.l2_from_power(power, grad_scale, dtype)
        return self._clip_multiplier(norm, self.max_grad_norm), None


def evaluate_closure(closure) -> Tensor | None:
    """torch.optim's step(closure): the loss, recomputed with grad enabled (step itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _plain_grads_fit(params: list[Tensor], grads: list, dtypes) -> bool:
    """Whether every grad is a plain strided tensor of its plain param's
    dtype, among `dtypes`: _check_grads' common case in one plain loop (as
    fast as passes of map() from 1000 params on, 4x faster for one); its
    loop finds what is wrong otherwise."""
    for p, g in zip(params, grads):
        if g is not None and (type(p) not in _PLAIN or type(g) not in _PLAIN or g.layout is not torch.strided
                              or g.dtype is not p.dtype or p.dtype not in dtypes):
            return False
    return True


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


