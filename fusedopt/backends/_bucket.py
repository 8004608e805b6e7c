"""What an optimizer hands a backend: the tensors of one param group on one
device with one dtype, aligned by index and ready for a multi-tensor kernel."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Fp8Copies:
    """The FP8 copies of a bucket's weights (aligned with its params) and their
    delayed-scaling state (fusedopt.fp8.Float8Recipe says how it evolves):
    one buffer per quantity, whose rows are the params' state tensors, so
    that the update after the step is a few launches however many params.

    ``weights[i]``: param i's FP8 copy. ``scale_buffer`` [n]: the fp32 scale
    each next copy is cast with (``scales[i]``: its 0-d rows, for the kernels'
    tables). ``scale_inv_buffer`` [n]: 1 / the scale each current copy was cast
    with (column 0 of an [n, 4] tensor: rows 16-byte aligned for
    torch._scaled_mm, which refuses other scale pointers).
    ``history_buffer`` [n, amax_history_len]: the amax histories.
    """

    weights: list[Tensor]
    scales: list[Tensor]
    scale_buffer: Tensor
    scale_inv_buffer: Tensor
    history_buffer: Tensor


@dataclass
class Bucket:
    """Aligned lists: ``params[i]``, ``grads[i]``, ``states[name][i]``,
    ``masters[i]`` and ``steps[i]`` belong to the same parameter.

    Every tensor of index i has the param's numel and strides and is dense
    (non-overlapping, no gaps), so kernels treat it as a flat array; no tensor
    is empty (zero-size params never take a slot). ``steps`` hold each
    parameter's step count (0-d fp32 on the bucket's device); the backend
    advances them with the update (see advance_steps). ``dtype`` is the dtype
    of params and grads, ``state_dtype`` that of the state tensors (masters
    are fp32, or int16 remainders with ``remainders``; with block-scaled FP8 states, an optimizer may keep some
    states at their default storage, e.g. Adafactor's second-moment
    statistics: their tensors carry their dtype). ``sr_seed``: this launch's stochastic-rounding seed
    (bf16 params without masters, fusedopt/reference/stochastic.py), or None
    to round the params to nearest; the optimizer sets it before each launch.
    ``fp8`` (AdamW with an FP8 recipe): the FP8 copies the update writes
    from the new fp32 weights (Fp8Copies); the backend then returns each new
    weight's absmax. With DTensor params the tensors are their local shards,
    and ``params`` may be empty when every DTensor of the bucket has an empty
    shard on this rank (``stats`` still joins the bucket's collectives; the
    optimizer launches nothing). The one exception to "no tensor is empty":
    buckets of sharded Adafactor tensors, which never reach a kernel, take
    empty local shards too (their replicated statistics are updated).
    """

    device: torch.device
    dtype: torch.dtype
    state_dtype: torch.dtype
    kind: object = None  # the optimizer's further split (e.g. Adafactor: factored or not)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: dict[str, list[Tensor]] = field(default_factory=dict)
    masters: list[Tensor] | None = None
    #: masters hold int16 remainders, each completing its bf16 param to the fp32 master
    #: (fusedopt/reference/remainder.py: a kernel joins, updates, and splits back)
    remainders: bool = False
    steps: list[Tensor] = field(default_factory=list)
    sr_seed: int | None = None
    fp8: Fp8Copies | None = None
    #: with DTensor params: how per-tensor statistics of the local shards become
    #: whole-tensor ones (fusedopt.dtensor.TensorSums); None when every tensor is whole
    stats: object = None
    #: what a backend derives once from the bucket's layout (a cached plan reuses the bucket)
    launch_cache: dict = field(default_factory=dict)

    def whole_tensor_sums(self, *sums: Tensor, every_member: bool = False) -> tuple[Tensor, ...]:
        """Per-tensor partial sums ([len(params)] each, fp64) of the local
        shards -> the sums over the whole tensors (a collective for DTensors;
        the same tensors when every tensor is whole). The one call through
        which every backend's per-tensor statistics (LAMB's ||p||^2, ||u||^2,
        the grad norms) pass. With `every_member`: also of the DTensors with
        no shard on this rank (then one sum per member, in member order: for
        totals over the bucket)."""
        if self.stats is None:
            return sums
        return tuple(self.stats.whole(torch.stack(sums), every_member=every_member).unbind(0))


def advance_steps(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """step += 1 on the steps' device, or += 0 when GradScaler found inf/NaN,
    without a host sync (found_inf is a 1-element tensor on that device)."""
    if not steps:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (1.0 - found_inf).reshape(()))
