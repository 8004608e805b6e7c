"""FusedMuon: torch.optim.Muon for the matrices, FusedAdamW for the rest, one optimizer."""
from __future__ import annotations

import functools
import inspect
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends, dtensor, norms
from ..backends._dtypes import FP8_STATE_DTYPE
from ..reference import fp8_states
from ..reference.muon import DEFAULT_NS_COEFFICIENTS, adjusted_lr, newton_schulz, newton_schulz_batched
from .adamw import FusedAdamW
from .base import evaluate_closure
from . import masters
from .checks import GroupCheck, check_options, check_state_dtype, check_tensor_lr
from .masters import OutsideWrites
from .plans import grad_multiplier

#: where an FP8 momentum buffer keeps its block scales
_SCALE = fp8_states.scale_name("momentum_buffer")
#: group keys a torch.optim.Muon state_dict lacks: filled from the defaults when one is loaded
_OWN_KEYS = ("adamw_betas", "adamw_eps", "use_muon")


class FusedMuon(Optimizer):
    """Muon (momentum orthogonalised by a Newton-Schulz iteration) for matrix
    params, AdamW for the others, in one optimizer.

    Params with ``ndim >= 2`` in a group with ``use_muon=True`` (the default)
    get torch.optim.Muon's update with the same arguments, defaults and
    ``momentum_buffer`` state; a param with ``ndim > 2`` (stacked experts
    ``[E, m, n]``, conv kernels) is orthogonalised per trailing ``m x n``
    matrix, its lr adjusted for ``m x n``. Params with ``ndim < 2``, and every
    param of a group with ``use_muon=False`` (embeddings and the output head,
    as Muon's authors advise), get AdamW with the group's ``lr`` and
    ``weight_decay``, ``adamw_betas`` and ``adamw_eps`` (FusedAdamW's
    kernels; AdamW's state names). A state_dict loads into torch.optim.Muon
    (for the matrices) and torch.optim.AdamW (for the rest) and back.

    ``backend="reference"`` runs torch.optim.Muon's algorithm itself, matrix
    by matrix (bit for bit). Any other backend batches the Newton-Schulz
    iteration over the matrices of one shape (see
    fusedopt.reference.muon.newton_schulz_batched: bf16 as torch, emulated
    with fp32 GEMMs on CPUs), with multi-tensor (foreach) momentum and
    update; ``ns_dtype=torch.float32`` iterates in fp32 instead.

    DTensor params (FSDP2, tensor parallel): momentum and update stay on the
    local shards; each matrix is orthogonalised on one owner rank of its mesh
    (round-robin), which gathers its shards and sends every rank its shard of
    the result (all-to-alls; see _orthogonalise_on_owners). (The reference
    backend gathers every matrix and orthogonalises it on every rank.)

    ``state_dtype=torch.float8_e4m3fn`` stores the momentum block-scaled in
    FP8 (as every fusedopt FP8 state, scales in ``momentum_buffer_scale``;
    plain params only): such a state_dict loads into FusedMuon with any
    state_dtype, not into torch.optim.Muon. Pipeline stages: fusedopt.distributed.
    PipelineOptimizer(parts, FusedMuon, ...), whose norm and GradScaler flag
    span the stages as for the other optimizers. ``master_weights``: True or
    "remainder" as FusedAdamW's (a matrix's remainder is joined into a
    transient fp32 master for the step).
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None, *,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 backend: str | None = None, ns_dtype: torch.dtype = torch.bfloat16,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None):
        # torch.optim.Muon's checks and messages
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        # what torch checks only when it steps, checked before anything is built
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        if ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        if ns_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"ns_dtype must be torch.bfloat16 (torch's) or torch.float32, got {ns_dtype}")
        check_options(max_grad_norm, master_weights)
        #: clip by the global L2 norm of every grad (Muon's and AdamW's params together); None or 0: off
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        #: that norm at the last step (a device tensor), with max_grad_norm
        self.last_grad_norm: Tensor | None = None
        check_state_dtype("FusedMuon", state_dtype)  # the other optimizers' choices (the inner FusedAdamW's too)
        #: bf16/fp16 params keep an fp32 master (``master_param``; "remainder": bf16 ones an int16
        #: ``master_remainder``, fusedopt/optim/masters.py) and an fp32 momentum buffer
        self.master_weights = master_weights
        #: master_weights="remainder": the matrices written outside the optimizer since it last wrote them
        self._outside = OutsideWrites()
        #: the momentum buffers' (and the AdamW states') storage dtype; None: the grad's, as torch
        self.state_dtype = state_dtype
        self.backend_name = backends.validate_name(backend)
        self.ns_dtype = ns_dtype
        #: set by fusedopt.distributed.PipelineOptimizer, as on FusedOptimizer: the norm and GradScaler's
        #: flag summed with the other pipeline stages' (one collective), the params another stage counts
        self._across_stages = None
        self._adamw: FusedAdamW | None = None
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_muon=True)
        super().__init__(params, defaults)
        self._adamw = self._build_adamw()

    def __getstate__(self):  # torch's keeps only defaults, state and param_groups
        state = super().__getstate__()
        state.update(backend_name=self.backend_name, ns_dtype=self.ns_dtype, max_grad_norm=self.max_grad_norm,
                     last_grad_norm=self.last_grad_norm, master_weights=self.master_weights,
                     state_dtype=self.state_dtype)
        return state

    def __setstate__(self, state):
        # also called by torch's load_state_dict with only state and param_groups
        super().__setstate__(state)
        if not hasattr(self, "_across_stages"):
            self._across_stages = None
        if not hasattr(self, "_outside"):
            self._outside = OutsideWrites()
        self._adamw = self._build_adamw()  # over the (possibly new) groups, sharing the (possibly new) state

    # --- which params get what ---------------------------------------------

    @staticmethod
    def _is_muon(group: dict, p: Tensor) -> bool:
        return bool(group["use_muon"]) and p.ndim >= 2

    def _matrices(self) -> list[Tensor]:
        """The params Muon itself steps (the others: the inner FusedAdamW's)."""
        return [p for g in self.param_groups for p in g["params"] if self._is_muon(g, p)]

    def add_param_group(self, param_group: dict) -> None:
        params = param_group.get("params")
        params = [params] if isinstance(params, Tensor) else list(params or ())
        if self.master_weights == "remainder":
            for i, p in enumerate(params):
                if isinstance(p, Tensor):
                    masters.check_remainder_dtype(f"FusedMuon: param {i} of param group {len(self.param_groups)}", p)
        if self.state_dtype == FP8_STATE_DTYPE and any(dtensor.is_dtensor(p) for p in params):
            raise ValueError("FusedMuon: FP8 momentum (state_dtype=torch.float8_e4m3fn) is not supported on DTensor "
                             "params yet (its block scales are per local shard); use torch.bfloat16 or None")
        super().add_param_group({**param_group, "params": params})
        if self._adamw is not None:  # a group added after construction
            self._adamw = self._build_adamw()

    def _build_adamw(self) -> FusedAdamW | None:
        """The FusedAdamW over the non-Muon params, one group per group that
        has some, sharing this optimizer's state (so state_dict, opt.state[p]
        and load_state_dict see one optimizer)."""
        groups, self._adamw_groups = [], []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if not self._is_muon(group, p)]
            if params:
                groups.append(dict(params=params, **self._adamw_hyper(group)))
                self._adamw_groups.append(index)
        if not groups:
            return None
        adamw = FusedAdamW(groups, backend=self.backend_name, master_weights=self.master_weights,
                           state_dtype=self.state_dtype)
        adamw.state = self.state
        return adamw

    @staticmethod
    def _adamw_hyper(group: dict) -> dict:
        return dict(lr=group["lr"], betas=group["adamw_betas"], eps=group["adamw_eps"],
                    weight_decay=group["weight_decay"])

    # --- the step -----------------------------------------------------------

    @torch._disable_dynamo  # eager under torch.compile (a graph break), as FusedOptimizer._untraced_step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating `closure`).

        GradScaler: ``scaler.step(opt)`` unscales the grads and skips a step
        with inf/NaN grads itself (torch's path). A wrapper that hands over the
        scale and flag instead (PipelineOptimizer sets ``grad_scale`` and
        ``found_inf``) gets them applied here: the flag (every stage's) read on
        the host, and a skipped step changes nothing; 1/scale multiplies the
        grads as the read happens."""
        loss = evaluate_closure(closure)
        work = [self._muon_params(group) for group in self.param_groups]  # every check before any update
        if self.master_weights == "remainder":
            self._outside.resync(self.state)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        power, dtype = self._grad_power() if self.max_grad_norm else (None, None)
        if self._across_stages is not None:
            power, found_inf = self._across_stages.reduce(power, found_inf, clipping=bool(self.max_grad_norm))
        if found_inf is not None and bool(found_inf.sum() > 0):
            return loss
        clip = self._clip_coefficient(power, dtype, grad_scale)
        mult = grad_multiplier(grad_scale, clip)
        for group, (params, grads) in zip(self.param_groups, work):
            if params:
                if mult is not None:  # clip_grad_norm_'s product, without writing into the grads
                    grads = [g * dtensor.scalar_like(g, mult.to(g.device)) for g in grads]
                self._muon_group(group, params, grads)
        if self.master_weights == "remainder":
            self._outside.record(self._matrices(), self.state)
        if self._adamw is not None:
            inner = self._adamw
            for index, group in zip(self._adamw_groups, inner.param_groups):
                group.update(self._adamw_hyper(self.param_groups[index]))  # schedulers edit our groups
            inner._outer_clip = clip  # the kernels apply it as they apply their own
            if grad_scale is not None:
                inner.grad_scale = grad_scale
            try:
                inner.step()
            finally:
                inner._outer_clip = None
                if grad_scale is not None:
                    del inner.grad_scale
        return loss

    def _grad_power(self) -> tuple[Tensor | None, torch.dtype | None]:
        """(the sum of the squares of every grad, Muon's and AdamW's params
        together, params another pipeline stage counts left out; the norm's
        dtype), or (None, None) when no param has a grad."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None, None
        parts, own, dtype = norms._local_norm(params, 2.0, self.backend_name, self._across_stages)
        return norms.power_total(parts, 2.0, own[0].device), dtype

    def _clip_coefficient(self, power: Tensor | None, dtype, grad_scale: Tensor | None) -> Tensor | None:
        """With max_grad_norm: clip_grad_norm_'s min(max_norm / (norm + 1e-6), 1)
        for the norm from `power` (GradScaler's scale divided out), kept in
        last_grad_norm."""
        if not self.max_grad_norm:
            return None
        if power is None:
            self.last_grad_norm = torch.zeros(())
            return None
        self.last_grad_norm = norms.l2_from_power(power, grad_scale, dtype or torch.float32)
        return norms.clip_coefficient(self.last_grad_norm, self.max_grad_norm)

    def _bucket_kind(self, p: Tensor) -> None:
        return None  # (asked with _prepare_state, as of a FusedOptimizer)

    def _prepare_state(self, group: dict, p: Tensor, kind=None) -> dict:
        """p's state with whatever is missing created, before any step (a
        wrapper's state_dict template, e.g. PipelineOptimizer's): a matrix's
        momentum buffer (and master), another param's AdamW states through
        the inner FusedAdamW."""
        if self._is_muon(group, p):
            self._momentum_buffers([p], [p])  # the buffer takes the grad's dtype: the param's
            return self.state[p]
        inner = next(g for g in self._adamw.param_groups if any(q is p for q in g["params"]))
        return self._adamw._prepare_state(inner, p, None)

    def _muon_params(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None or not self._is_muon(group, p):
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if p.grad.shape != p.shape:
                raise RuntimeError(f"FusedMuon: a grad of shape {tuple(p.grad.shape)} for a param of shape "
                                   f"{tuple(p.shape)}")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _uses_master(self, p: Tensor) -> bool:
        return self._master_name(p) is not None

    def _master_name(self, p: Tensor) -> str | None:
        return masters.name_of(self.master_weights, p)

    def master_param(self, p: Tensor) -> Tensor:
        """As FusedAdamW.master_param: p's fp32 master (joined from its
        remainder with master_weights="remainder"), p itself without one."""
        return masters.master_param(self.master_weights, p, self.state.get(p, {}))

    def resync_master(self, params=None) -> None:
        """As FusedAdamW.resync_master: the params' current values become their masters."""
        params = [p for g in self.param_groups for p in g["params"]] if params is None else list(params)
        self._outside.zero(params, self.state)
        self._record_master_versions()

    def _record_master_versions(self) -> None:
        """After the optimizer (or a wrapper: ZeroOptimizer's broadcast) wrote the params: the matrices
        here, the others in the inner FusedAdamW (which checks them as it steps them)."""
        self._outside.record(self._matrices(), self.state)
        if self._adamw is not None:
            self._adamw._record_master_versions()

    def _buffer_dtype(self, p: Tensor, g: Tensor) -> torch.dtype:
        """torch's: the grad's dtype; fp32 beside an fp32 master; else state_dtype when given
        (FP8: block-scaled, fusedopt/reference/fp8_states.py, its scales in ``momentum_buffer_scale``)."""
        if self._uses_master(p):
            return torch.float32
        return self.state_dtype or g.dtype

    def _matrix_state_dtypes(self, p: Tensor) -> dict[str, torch.dtype]:
        """The states (names, dtypes) a matrix param like p gets: a wrapper's
        template on ranks that do not hold them (ZeroOptimizer)."""
        dtypes = {"momentum_buffer": self._buffer_dtype(p, p)}
        name = self._master_name(p)
        if name is not None:
            dtypes[name] = masters.DTYPES[name]
        return dtypes

    def _check_group(self, group: dict, where: str) -> None:
        """What a wrapper checks before it communicates (ZeroOptimizer): the
        hyperparameters a scheduler or a user may have edited since __init__."""
        GroupCheck(type(self).__name__, group, where).at_least(0.0, "lr", "momentum", "weight_decay")

    def _momentum_buffers(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state and self._buffer_dtype(p, g) == FP8_STATE_DTYPE:
                state["momentum_buffer"], state[_SCALE] = fp8_states.empty_like(p)
            elif "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, dtype=self._buffer_dtype(p, g),
                                                            memory_format=torch.preserve_format)
            name = self._master_name(p)
            if name is not None and name not in state:
                state[name] = masters.initial(p, name)
            bufs.append(state["momentum_buffer"])
        return bufs

    def _updates(self, group: dict, params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]) -> list[Tensor]:
        """Momentum (in place) and the matrices Newton-Schulz orthogonalises:
        in the grad's dtype as torch (buffers of that dtype), else in fp32,
        the buffers stored back in theirs (FP8 ones decoded and re-encoded)."""
        momentum = group["momentum"]
        if all(b.dtype == g.dtype for b, g in zip(bufs, grads)):
            _foreach(torch._foreach_lerp_, bufs, grads, 1 - momentum)
            return _foreach(torch._foreach_lerp, grads, bufs, momentum) if group["nesterov"] else bufs
        grads = [g.float() for g in grads]
        scales = [self.state[p].get(_SCALE) if b.dtype == FP8_STATE_DTYPE else None for p, b in zip(params, bufs)]
        wide = [b.float() if s is None else fp8_states.decode("momentum_buffer", b, s) for b, s in zip(bufs, scales)]
        _foreach(torch._foreach_lerp_, wide, grads, 1 - momentum)
        for b, w, scale in zip(bufs, wide, scales):
            if scale is not None:
                fp8_states.store_("momentum_buffer", b, scale, w)  # fresh block scales, as every FP8 state
            elif b is not w:
                b.copy_(w)  # rounded to the buffer's dtype
        return _foreach(torch._foreach_lerp, grads, wide, momentum) if group["nesterov"] else wide

    def _muon_group(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        lr = float(group["lr"])
        bufs = self._momentum_buffers(params, grads)
        # what the update is applied to: the fp32 master where there is one (joined from a remainder: a
        # transient fp32 copy), rounded into the param after (split into param and remainder)
        targets = [masters.fp32_of(p, self.state[p]) if self._uses_master(p) else p for p in params]
        updates = self._updates(group, params, grads, bufs)
        _foreach(torch._foreach_mul_, targets, 1 - lr * group["weight_decay"])
        if self.backend_name == "reference":  # torch.optim.Muon's iteration, matrix by matrix
            # (DTensor matrices gathered whole on every rank, each rank keeping its shard of the result)
            coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
            for i, p in enumerate(params):
                rows, cols = p.shape[-2:]
                matrices = dtensor.whole(updates[i]).reshape(-1, rows, cols)
                out = torch.stack([newton_schulz(m, coefficients, steps, eps) for m in matrices])
                targets[i].add_(dtensor.shard_like(targets[i], out.view(p.shape)), alpha=self._alpha(group, p))
        else:
            # what each target adds (times its alpha): plain ones whole, DTensor ones their shard
            plain = [i for i, p in enumerate(params) if not dtensor.is_dtensor(p)]
            results = {i: r.view(params[i].shape)
                       for i, r in zip(plain, self._orthogonalise(group, [updates[i] for i in plain]))}
            by_mesh: dict = {}
            for i, p in enumerate(params):
                if dtensor.is_dtensor(p):
                    by_mesh.setdefault(p.device_mesh, []).append(i)
            for mesh, index in by_mesh.items():
                results.update(zip(index, self._orthogonalise_on_owners(group, mesh, [updates[i] for i in index])))
            by_alpha: dict[float, list[int]] = {}  # one foreach call per step size (a scalar alpha, as torch's add_)
            for i in sorted(results):
                by_alpha.setdefault(self._alpha(group, params[i]), []).append(i)
            for alpha, index in by_alpha.items():
                _foreach(torch._foreach_add_, [targets[i] for i in index], [results[i] for i in index], alpha=alpha)
        for p, t in zip(params, targets):
            if t is p:
                continue
            rem = self.state[p].get("master_remainder")
            if rem is not None:
                masters.store_split_(p, rem, t)
            else:
                p.copy_(t)  # round to nearest even

    @staticmethod
    def _alpha(group: dict, p: Tensor) -> float:
        """The step along the orthogonalised update: -lr adjusted for p's trailing matrix shape."""
        rows, cols = p.shape[-2:]
        return -adjusted_lr(float(group["lr"]), group["adjust_lr_fn"], rows, cols)

    def _orthogonalise(self, group: dict, updates: list[Tensor]) -> list[Tensor]:
        """Newton-Schulz of whole updates (each [..., m, n]), batched per
        (device, dtype, m x n): fp32 results (bf16 -> fp32 is exact), each
        shaped [-1, m, n]."""
        out: list = [None] * len(updates)
        for index in _same_shape(updates):
            rows, cols = updates[index[0]].shape[-2:]
            stack = torch.cat([updates[i].reshape(-1, rows, cols) for i in index])
            tall = rows > cols
            result = newton_schulz_batched(stack.transpose(-2, -1) if tall else stack, group["ns_coefficients"],
                                           group["ns_steps"], group["eps"], self.ns_dtype)
            result = (result.transpose(-2, -1) if tall else result).float()
            for i, piece in zip(index, result.split([updates[i].numel() // (rows * cols) for i in index])):
                out[i] = piece
        return out

    def _orthogonalise_on_owners(self, group: dict, mesh, updates: list[Tensor]) -> list[Tensor]:
        """Newton-Schulz of DTensor updates on one mesh, each matrix on one
        owner rank of the mesh (round-robin in param order, the same on every
        rank); returns each result as a DTensor laid out as its update.

        Where one process group spans the mesh (a 1-d mesh, or a mesh over
        the whole world): the owners gather their matrices' shards (one
        all-to-all per dtype; each distinct shard sent once, replicas not),
        orthogonalise, and send every rank its shard of each result (one
        all-to-all): each rank holds only its own matrices whole. Otherwise
        (an n-d sub-mesh) every rank gathers every update whole and each owner
        broadcasts its results over the mesh's per-dim groups."""
        plan = _OwnerPlan.of(mesh, updates)
        if plan is None:
            return self._orthogonalise_gathered(group, mesh, updates)
        wholes = plan.gather_to_owners(updates)
        computed = dict(zip(wholes, self._orthogonalise(group, list(wholes.values()))))
        return plan.scatter_from_owners(updates, {k: r.view(updates[k].shape) for k, r in computed.items()})

    def _orthogonalise_gathered(self, group: dict, mesh, updates: list[Tensor]) -> list[Tensor]:
        """_orthogonalise_on_owners where no process group spans the mesh:
        every rank gathers every update whole (DTensor's all-gather), owners
        compute theirs and broadcast them, one broadcast per owner and mesh dim."""
        wholes = [dtensor.whole(u) for u in updates]
        size, me = mesh.size(), _flat_rank(mesh.get_coordinate(), mesh.shape)
        owners = [k % size for k in range(len(wholes))]
        mine = [k for k, owner in enumerate(owners) if owner == me]
        computed = dict(zip(mine, self._orthogonalise(group, [wholes[k] for k in mine])))
        out: list = [None] * len(wholes)
        for owner in range(size):
            index = [k for k, o in enumerate(owners) if o == owner]
            if not index:
                continue
            if owner == me:
                buffer = torch.cat([computed[k].reshape(-1) for k in index])
            else:
                buffer = torch.empty(sum(wholes[k].numel() for k in index), dtype=torch.float32,
                                     device=wholes[index[0]].device)
            _broadcast_over_mesh(buffer, mesh, _coordinate(owner, mesh.shape))
            for k, piece in zip(index, buffer.split([wholes[k].numel() for k in index])):
                out[k] = dtensor.shard_like(updates[k], piece.view(updates[k].shape))
        return out

    # --- state_dict -----------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Ours, or torch.optim.Muon's (its groups lack the AdamW keys: the
        defaults fill them); the AdamW params' states are converted as
        FusedAdamW.load_state_dict converts them."""
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**{k: self.defaults[k] for k in _OWN_KEYS}, **g}
                                      for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)  # casts every state to its param's dtype: undone below
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        writes = []  # params rewritten from saved fp32 masters (master_weights="remainder"), after every check
        for saved_id, (group, p) in zip(saved_ids, [(g, p) for g in self.param_groups for p in g["params"]]):
            saved, state = state_dict["state"].get(saved_id), self.state.get(p)
            if not saved or not state or not self._is_muon(group, p):
                continue
            state.pop(_SCALE, None)  # (torch's load cast it to the param's dtype)
            if "momentum_buffer" in saved:
                self._load_buffer(p, state, saved)
            for name, dtype in masters.DTYPES.items():  # as saved (torch's load cast them to the param's dtype)
                state.pop(name, None)
                if isinstance(saved.get(name), Tensor):
                    state[name] = saved[name].detach().to(p.device, dtype, copy=True)
            # the saved master in this optimizer's form, or one from the param (a torch checkpoint)
            writes += masters.convert_loaded(self._master_name(p), p, state, "FusedMuon")
        self._adamw = self._build_adamw()
        if self._adamw is not None:
            inner = self._adamw
            inner.load_state_dict(self._adamw_state_dict(state_dict))  # FusedAdamW's conversions and checks
            self.state.update(inner.state)
            inner.state = self.state
        for target, bits in writes:
            target.copy_(bits)
        self._record_master_versions()

    def _load_buffer(self, p: Tensor, state: dict, saved: dict) -> None:
        """The saved momentum buffer in this optimizer's storage: FP8 ones
        (with their scales) kept as stored or decoded, others encoded into FP8
        or cast."""
        value, scale = saved["momentum_buffer"], saved.get(_SCALE)
        target = self._buffer_dtype(p, p)
        if value.dtype == FP8_STATE_DTYPE:
            if not isinstance(scale, Tensor):
                raise ValueError(f"FusedMuon.load_state_dict: the FP8 momentum_buffer of a param of shape "
                                 f"{tuple(p.shape)} comes without its {_SCALE!r}")
            if target == FP8_STATE_DTYPE:
                state["momentum_buffer"] = value.to(p.device).reshape(p.shape).contiguous().clone()
                state[_SCALE] = scale.to(p.device, torch.float32, copy=True)
                return
            value = fp8_states.decode("momentum_buffer", value.to(p.device), scale.to(p.device))
        if target == FP8_STATE_DTYPE:
            q, scales = fp8_states.encode("momentum_buffer", value.to(p.device).float().reshape(p.shape))
            state["momentum_buffer"], state[_SCALE] = q.reshape(p.shape).contiguous(), scales.float()
        else:
            state["momentum_buffer"] = value.to(p.device, target, copy=True)

    def _adamw_state_dict(self, state_dict: dict) -> dict:
        """The part of a saved state_dict that is the AdamW params', numbered as the inner FusedAdamW numbers them."""
        sub: dict = {"state": {}, "param_groups": []}
        for index, inner_group in zip(self._adamw_groups, self._adamw.param_groups):
            group, saved = self.param_groups[index], state_dict["param_groups"][index]
            ids = [i for i, p in zip(saved["params"], group["params"]) if not self._is_muon(group, p)]
            first = sum(len(g["params"]) for g in sub["param_groups"])
            numbers = list(range(first, first + len(ids)))
            sub["state"].update({n: state_dict["state"][i] for i, n in zip(ids, numbers) if i in state_dict["state"]})
            sub["param_groups"].append({**{k: v for k, v in inner_group.items() if k != "params"}, "params": numbers})
        return sub


def _foreach(op, tensors: list[Tensor], *args, **kwargs) -> list[Tensor] | None:
    """A torch._foreach_* op over lists that may mix DTensors and plain
    tensors (a TP model's plain modules), which one call cannot take: one call
    per kind, the results (for an op that returns them) in the lists' order."""
    kinds = [dtensor.is_dtensor(t) for t in tensors]
    if all(kinds) or not any(kinds):
        return op(tensors, *args, **kwargs)
    out: list = [None] * len(tensors)
    for kind in (True, False):
        index = [i for i, k in enumerate(kinds) if k == kind]
        pick = lambda xs: [xs[i] for i in index] if isinstance(xs, list) else xs  # noqa: E731
        result = op(pick(tensors), *map(pick, args), **kwargs)
        for i, r in zip(index, result or ()):
            out[i] = r
    return out if out[0] is not None else None


def _flat_rank(coordinate, shape) -> int:
    """A rank's index on a mesh from its coordinate (row-major, as the mesh's rank tensor)."""
    index = 0
    for c, n in zip(coordinate, shape):
        index = index * n + c
    return index


def _coordinate(index: int, shape) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(index % n)
        index //= n
    return out[::-1]


def _broadcast_over_mesh(buffer: Tensor, mesh, source: list[int]) -> None:
    """buffer from the rank at `source` (a mesh coordinate) to every rank of
    the mesh, dim by dim from the last: before dim d's broadcast, the ranks
    that agree with `source` on the dims before d hold it, so each dim-d
    group that has such ranks broadcasts from its member at source[d]. Every
    process group sees the same sequence of calls on all its members."""
    import torch.distributed as dist

    coordinate = mesh.get_coordinate()
    for d in reversed(range(mesh.ndim)):
        if list(coordinate[:d]) == list(source[:d]):
            group = mesh.get_group(d)
            dist.broadcast(buffer, src=dist.get_global_rank(group, source[d]), group=group)


class _OwnerPlan:
    """Who holds which block of each DTensor update on a mesh, and who owns
    each matrix (round-robin over the mesh's ranks): the all-to-alls of
    _orthogonalise_on_owners over a process group that spans the mesh."""

    def __init__(self, mesh, group, updates: list[Tensor]):
        import torch.distributed as dist

        self.group, self.size = group, mesh.size()
        coordinates = [_coordinate(i, mesh.shape) for i in range(self.size)]
        ranks = mesh.mesh.flatten().tolist()
        #: mesh index -> rank in the process group (all_to_all's split order)
        self.group_rank = [dist.get_group_rank(group, r) for r in ranks]
        self.me = _flat_rank(mesh.get_coordinate(), mesh.shape)
        self.owner = [k % self.size for k in range(len(updates))]
        #: blocks[k][i]: mesh rank i's (shape, offset) of update k
        self.blocks = [[_local_block()(u.shape, mesh.shape, c, u.placements)
                        for c in coordinates] for u in updates]
        for k, u in enumerate(updates):
            if tuple(self.blocks[k][self.me][0]) != tuple(dtensor.local(u).shape):
                raise RuntimeError(f"FusedMuon: a DTensor of shape {tuple(u.shape)} with {u.placements} has a local "
                                   f"shard of shape {tuple(dtensor.local(u).shape)}, not the block DTensor computes "
                                   f"{self.blocks[k][self.me][0]}")
        #: senders[k]: the mesh ranks that send update k's blocks to its owner (the first holder of each block)
        self.senders = []
        for per_rank in self.blocks:
            seen, senders = set(), []
            for i, (shape, offset) in enumerate(per_rank):
                key = (tuple(shape), tuple(offset))
                if key not in seen and all(shape):
                    seen.add(key)
                    senders.append(i)
            self.senders.append(senders)

    @staticmethod
    def of(mesh, updates: list[Tensor]) -> "_OwnerPlan | None":
        """The plan, or None where no process group spans the mesh (an n-d
        sub-mesh of the world) or this torch cannot say which block of a
        DTensor another rank holds."""
        import torch.distributed as dist

        if _local_block() is None:
            return None
        if mesh.ndim == 1:
            group = mesh.get_group(0)
        elif mesh.size() == dist.get_world_size():
            group = dist.group.WORLD
        else:
            return None
        return _OwnerPlan(mesh, group, updates)

    def _numel(self, k: int, i: int) -> int:
        n = 1
        for d in self.blocks[k][i][0]:
            n *= d
        return n

    def _all_to_all(self, send: dict[int, list[Tensor]], receive: dict[int, list[int]], dtype, device) -> dict:
        """One all_to_all_single: send[i] (flattened, in order) to mesh rank i;
        receive[i] the numels expected from mesh rank i, in order. Returns the
        received pieces per mesh rank."""
        import torch.distributed as dist

        order = sorted(range(self.size), key=self.group_rank.__getitem__)
        parts = [t.reshape(-1).to(dtype) for i in order for t in send.get(i, [])]
        out_sizes = [sum(receive.get(i, [])) for i in order]
        in_sizes = [sum(t.numel() for t in send.get(i, [])) for i in order]
        # the sizes first (gloo takes each side's at its word: a mismatch would write past a buffer), so that a
        # layout the ranks see differently raises on every rank instead
        counts = torch.tensor(in_sizes, dtype=torch.int64, device=device)
        announced = torch.empty_like(counts)
        dist.all_to_all_single(announced, counts, group=self.group)
        mismatch = torch.tensor([int(announced.tolist() != out_sizes)], device=device)
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=self.group)
        if mismatch.item():
            raise RuntimeError(f"FusedMuon: the ranks of a mesh disagree on the DTensor shards they exchange (this "
                               f"rank expects {out_sizes} elements from its peers, they announce "
                               f"{announced.tolist()}); are the params laid out alike on every rank?")
        sent = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        received = torch.empty(sum(out_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(received, sent, out_sizes, in_sizes, group=self.group)
        pieces, chunks = {}, received.split(out_sizes)
        for i, chunk in zip(order, chunks):
            pieces[i] = list(chunk.split(receive.get(i, [])))
        return pieces

    def gather_to_owners(self, updates: list[Tensor]) -> dict[int, Tensor]:
        """The updates this rank owns, whole (in their dtypes), by index."""
        mine = [k for k in range(len(updates)) if self.owner[k] == self.me]
        wholes = {k: torch.empty(updates[k].shape, dtype=updates[k].dtype, device=dtensor.local(updates[k]).device)
                  for k in mine}
        for dtype in sorted({u.dtype for u in updates}, key=str):
            index = [k for k, u in enumerate(updates) if u.dtype == dtype]
            send: dict[int, list[Tensor]] = {}
            for k in index:
                if self.me in self.senders[k]:
                    send.setdefault(self.owner[k], []).append(dtensor.local(updates[k]))
            receive = {i: [self._numel(k, i) for k in index if k in wholes and i in self.senders[k]]
                       for i in range(self.size)}
            device = dtensor.local(updates[index[0]]).device
            pieces = self._all_to_all(send, receive, dtype, device)
            for i in range(self.size):
                for k, piece in zip([k for k in index if k in wholes and i in self.senders[k]], pieces[i]):
                    shape, offset = self.blocks[k][i]
                    wholes[k][tuple(slice(o, o + n) for o, n in zip(offset, shape))] = piece.view(shape)
        return wholes

    def scatter_from_owners(self, updates: list[Tensor], results: dict[int, Tensor]) -> list[Tensor]:
        """Each rank's shard of every result (fp32), from the owners: DTensors laid out as the updates."""
        send: dict[int, list[Tensor]] = {}
        for k, result in sorted(results.items()):  # in index order: the order each rank expects
            for i in range(self.size):
                shape, offset = self.blocks[k][i]
                send.setdefault(i, []).append(result[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
        receive = {i: [self._numel(k, self.me) for k in range(len(updates)) if self.owner[k] == i]
                   for i in range(self.size)}
        device = dtensor.local(updates[0]).device
        pieces = self._all_to_all(send, receive, torch.float32, device)
        out: list = [None] * len(updates)
        for i in range(self.size):
            for k, piece in zip([k for k in range(len(updates)) if self.owner[k] == i], pieces[i]):
                out[k] = dtensor.like(updates[k], piece.view(self.blocks[k][self.me][0]))
        return out


@functools.cache
def _local_block():
    """torch's (private) rule for the (shape, offset) of the block of a
    DTensor at any mesh coordinate, where it has the signature this code
    was written against (torch 2.13's); None otherwise (then every rank
    gathers every update: _orthogonalise_gathered)."""
    try:
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as rule
    except ImportError:
        return None
    names = list(inspect.signature(rule).parameters)
    return rule if names[:4] == ["global_shape", "mesh_shape", "my_coordinate", "placements"] else None


def _same_shape(params: list[Tensor]) -> list[list[int]]:
    """Indices of the params per (device, dtype, trailing matrix shape): one batched iteration each."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, tuple(p.shape[-2:])), []).append(i)
    return list(groups.values())
