"""``fusedopt.GradScaler``: torch.amp.GradScaler whose inf/NaN check takes
models sharded with DTensors (FSDP2, tensor parallel).

torch's own check runs one foreach op per (device, dtype) over the grads,
which DTensor dispatch refuses when the list mixes DTensors and plain tensors
(a tensor-parallel model whose norms stay plain modules), and reduces the flag
over the placements and mesh of the first grad only (a replicated param first
leaves the ranks of other shards out: they skip the step through fusedopt's
own OR, but their scales drift apart). This one checks the local shards and
ORs the flag over every process group that shards a grad or holds its
pending sums, so every rank skips together and keeps the same scale. It
also works on a pipeline stage that never calls scale() (the loss is on
another stage): with a PipelineOptimizer the scale starts at init_scale on
its first unscale_/step.
Everything else is torch's.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.amp.grad_scaler import _MultiDeviceReplicator

from . import dtensor


class GradScaler(torch.amp.GradScaler):
    """Drop-in for ``torch.amp.GradScaler(device, ...)`` (same arguments)."""

    def _start_scale(self, optimizer: torch.optim.Optimizer) -> None:
        """The initial scale, on the device of the optimizer's params, when
        scale() was never called and the optimizer is a PipelineOptimizer: a
        stage without the loss scales nothing itself (its grads arrive scaled
        from the next stage), where torch's scaler would raise in unscale_/step."""
        from .distributed.pipeline import PipelineOptimizer

        # elsewhere a missing scale() is the user's mistake, which torch's error reports
        if self._enabled and self._scale is None and isinstance(optimizer, PipelineOptimizer):
            device = next((p.device for g in optimizer.param_groups for p in g["params"]), None)
            self._lazy_init_scale_growth_tracker(device or torch.device(self._device))

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self._start_scale(optimizer)
        super().unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        self._start_scale(optimizer)
        return super().step(optimizer, *args, **kwargs)

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
        per_device_inv_scale = _MultiDeviceReplicator(inv_scale)
        per_device_found_inf = _MultiDeviceReplicator(found_inf)
        grads: dict = defaultdict(lambda: defaultdict(list))
        groups: dict = {}  # the process groups to OR over, in order (a dict as a set)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    g = param.grad
                    if g is None:
                        continue
                    if not allow_fp16 and g.dtype == torch.float16:
                        raise ValueError("Attempting to unscale FP16 gradients.")
                    if dtensor.is_dtensor(g):
                        sharding = dtensor.sharding_for(g.device_mesh, dtensor.replicated(g.placements), g.dim())
                        groups.update(dict.fromkeys(sharding.groups()))
                        mesh = g.device_mesh
                        groups.update(dict.fromkeys(mesh.get_group(d) for d, p in enumerate(g.placements)
                                                    if p.is_partial() and mesh.size(d) > 1))
                        g = g._local_tensor  # unscaling pending sums scales their sum
                    elif g.is_sparse:
                        if g.dtype is torch.float16:  # duplicate indices: check the coalesced values (as torch)
                            param.grad = g = g.coalesce()
                        g = g._values()
                    grads[g.device][g.dtype].append(g)
            for device, per_dtype in grads.items():
                for tensors in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(
                        tensors, per_device_found_inf.get(device), per_device_inv_scale.get(device))
        if groups:
            import torch.distributed as dist

            for flag in per_device_found_inf._per_device_tensors.values():
                for group in groups:
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return per_device_found_inf._per_device_tensors
