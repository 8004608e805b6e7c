"""What every fusedopt optimizer shares: backend choice, grouping of the
parameters into kernel-ready buckets, state creation (including fp32 master
weights), GradScaler support, and a state_dict that torch.optim can read.

A subclass declares its hyperparameters (``defaults``), names its elementwise
state tensors (``_elementwise_states``) and launches its update on a bucket
(``_update``). A step is:

1. check every grad (sparse, dtype, shape, device) and raise before anything
   changes;
2. per param group, collect the params with grads into one Bucket per
   (device, dtype), creating state at first use, staging any tensor a flat
   kernel cannot walk (non-dense views, mismatched strides);
3. advance each parameter's step count on its device (not when GradScaler
   found inf/NaN) and launch the update, one call per bucket;
4. copy staged results back.
"""
from __future__ import annotations

from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends
from ..backends._bucket import Bucket
from ..backends._dtypes import LOW_PRECISION, SUPPORTED_PARAM_DTYPES, fp32_scalar


class FusedOptimizer(Optimizer):
    # GradScaler hands us grad_scale and found_inf (as attributes) instead of
    # unscaling the grads itself: the kernels unscale while they update.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, backend: str | None = None, master_weights: bool = False):
        self._requested_backend = backends.validate_name(backend)
        self.master_weights = bool(master_weights)
        self._backend_names: dict[str, str] = {}
        super().__init__(params, defaults)

    # --- backend choice -------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._backend_for(p.device)

    def _backend_for(self, device: torch.device):
        name = self._backend_names.get(device.type)
        if name is None:
            name = self._backend_names[device.type] = backends.resolve(self._requested_backend, device)
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
                     _backend_names=dict(self._backend_names))
        return state

    # --- what subclasses provide ----------------------------------------------

    def _elementwise_states(self, group: dict) -> tuple[str, ...]:
        """Names of the state tensors shaped like the param, in kernel order."""
        raise NotImplementedError

    def _update(self, backend, group: dict, bucket: Bucket, lr, grad_scale, found_inf) -> None:
        """Launch this optimizer's update of one bucket on `backend`."""
        raise NotImplementedError

    # --- state ------------------------------------------------------------------

    def _uses_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in LOW_PRECISION

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if self._uses_master(p) else p.dtype

    def _prepare_state(self, group: dict, p: Tensor) -> dict:
        """The param's state, with anything missing created (lazily, as torch does)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        dtype = self._state_dtype(p)
        for name in self._elementwise_states(group):
            if name not in state:
                state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if self._uses_master(p) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        return state

    # --- the step -----------------------------------------------------------------

    def _check_grads(self) -> None:
        """Raise on any grad the kernels cannot take, before anything is modified."""
        name = type(self).__name__
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{name} does not support sparse gradients (got layout {g.layout})")
                if p.dtype not in SUPPORTED_PARAM_DTYPES:
                    raise TypeError(f"{name} supports float32, float64, bfloat16 and float16 params, got {p.dtype}")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise RuntimeError(
                        f"{name}: a grad must match its param in dtype, shape and device; got grad "
                        f"{g.dtype} {tuple(g.shape)} on {g.device} for param {p.dtype} {tuple(p.shape)} on {p.device}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating `closure`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        amp = _AmpScalars(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        writeback: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            buckets, empty_steps = self._buckets(group, writeback)
            for device, steps in empty_steps.items():
                _advance_steps(steps, amp.found_inf(device))
            for bucket in buckets:
                _advance_steps(bucket.steps, amp.found_inf(bucket.device))
                lr = group["lr"]
                if isinstance(lr, Tensor):
                    lr = fp32_scalar(lr, bucket.device)
                self._update(self._backend_for(bucket.device), group, bucket, lr,
                             amp.grad_scale(bucket.device), amp.found_inf(bucket.device))
        for original, staged in writeback:
            original.copy_(staged)
        return loss

    def _buckets(self, group: dict, writeback: list) -> tuple[list[Bucket], dict]:
        """One Bucket per (device, dtype) of the group's params with grads, and
        the step tensors of zero-size params (advanced, but never launched)."""
        names = self._elementwise_states(group)
        buckets: dict[tuple, Bucket] = {}
        empty_steps: dict[torch.device, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._prepare_state(group, p)
            if p.numel() == 0:
                empty_steps.setdefault(p.device, []).append(state["step"])
                continue
            master = state.get("master_param") if self._uses_master(p) else None
            bucket = buckets.get((p.device, p.dtype))
            if bucket is None:
                bucket = buckets[(p.device, p.dtype)] = Bucket(
                    p.device, p.dtype, states={n: [] for n in names}, masters=[] if master is not None else None)
            tensors = [p, p.grad] + [state[n] for n in names] + ([master] if master is not None else [])
            tensors = _flat_compatible(tensors, writable=[True, False] + [True] * (len(tensors) - 2),
                                       writeback=writeback)
            bucket.params.append(tensors[0])
            bucket.grads.append(tensors[1])
            for n, t in zip(names, tensors[2:]):
                bucket.states[n].append(t)
            if master is not None:
                bucket.masters.append(tensors[-1])
            bucket.steps.append(state["step"])
        return list(buckets.values()), empty_steps

    # --- state_dict -------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict (ours or torch.optim's, which share a layout).

        torch casts every floating state tensor to its param's dtype and leaves
        ``step`` where it was saved. Afterwards: steps go to the param's device
        as float32, and with master weights the moments and the master are
        taken at fp32 from the saved values (the master from the param when
        the saved state has none, e.g. a torch.optim.AdamW checkpoint).
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            state = self.state.get(p)
            saved = state_dict["state"].get(saved_id)
            if not state or saved is None:
                continue
            if "step" in state:
                state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device).reshape(())
            if self._uses_master(p):
                for name, value in saved.items():
                    if name != "step" and isinstance(value, Tensor) and value.is_floating_point():
                        state[name] = value.to(device=p.device, dtype=torch.float32, copy=True)
                if "master_param" not in state:
                    state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                          copy=True)
            else:
                state.pop("master_param", None)


class _AmpScalars:
    """GradScaler's grad_scale and found_inf, as 1-element fp32 tensors per device."""

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None):
        self._grad_scale, self._found_inf = grad_scale, found_inf
        self._cache: dict = {}

    def _on(self, what: str, t: Tensor | None, device: torch.device):
        if t is None:
            return None
        key = (what, device)
        if key not in self._cache:
            self._cache[key] = fp32_scalar(t, device)
        return self._cache[key]

    def grad_scale(self, device):
        return self._on("grad_scale", self._grad_scale, device)

    def found_inf(self, device):
        return self._on("found_inf", self._found_inf, device)


def _advance_steps(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """step += 1 on the device, or += 0 when GradScaler found inf/NaN (no host sync)."""
    if not steps:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (1.0 - found_inf).reshape(()))


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and without gaps: the elements fill numel() slots, in some order."""
    if t.is_contiguous():
        return True
    return t.stride() == torch.empty_like(t, memory_format=torch.preserve_format).stride()


def _flat_compatible(tensors: list[Tensor], writable: list[bool], writeback: list) -> list[Tensor]:
    """Make the param's tensors walkable as flat arrays with one index.

    The kernels index every tensor of a param with the same flat offset, so
    all must be dense with identical strides. Any tensor that is not (a sliced
    param, a grad with other strides) is replaced by a copy in the layout of
    the first dense one; copies of written tensors are queued in `writeback`
    to be copied back after the update.
    """
    if all(t.is_contiguous() for t in tensors):
        return tensors
    layout = next((t for t in tensors if _is_dense(t)), None)
    strides = layout.stride() if layout is not None else None
    out = []
    for t, w in zip(tensors, writable):
        if strides is not None and t.stride() == strides:
            out.append(t)
            continue
        staged = torch.empty_like(layout, dtype=t.dtype) if layout is not None else t.contiguous().clone()
        staged.copy_(t)
        if w:
            writeback.append((t, staged))
        out.append(staged)
    return out
