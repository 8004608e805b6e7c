"""DTensor params and grads (FSDP2, tensor parallel, both on a 2-D mesh):
what the optimizers and the norms do with them.

The kernels step the local shards (``_local_tensor``: read without autograd,
~0.02 us against ~15 us for ``to_local()``), in the same buckets and launches
as plain tensors. States are DTensors with the param's mesh and placements
(the factored statistics of Adafactor: Replicate on the mesh dims that shard
the dim they reduce), so torch.distributed.checkpoint reshards them.

One rule for every statistic that reduces over some dims of a tensor (norms,
LAMB's ||p|| and ||u||, Adafactor's row and column sums and RMS): the local
partial sums, all-reduced over exactly the mesh dims whose placement shards
one of those dims. A Replicate dim holds copies and is never counted twice;
plain tensors beside DTensors are whole on every rank and are not reduced; a
Partial param is refused. Every statistic of one launch that needs the same
process group goes in one collective (TensorSums), and every rank joins it,
also one whose local shard is empty.

torch.distributed.tensor is never imported here: a DTensor exists only once
its module is loaded, so until then every tensor is plain.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import Parameter

_PLAIN_TYPES = (Tensor, Parameter)


_DTENSOR: type | None = None  # the DTensor class, once its module is loaded


def dtensor_class() -> type | None:
    """torch's DTensor class, or None while torch.distributed.tensor is not
    loaded (then no DTensor exists)."""
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = None if module is None else module.DTensor
    return _DTENSOR


def is_dtensor(t) -> bool:
    cls = type(t)
    if cls is Tensor or cls is Parameter:
        return False
    dtensor = _DTENSOR or dtensor_class()
    return dtensor is not None and issubclass(cls, dtensor)


def local(t: Tensor) -> Tensor:
    """The tensor a kernel reads: a DTensor's local shard, else t itself."""
    return t._local_tensor if is_dtensor(t) else t


def check_tensor(t: Tensor, what: str, pending_sums: bool = False) -> None:
    """Raise TypeError unless the kernels can take `t` (`what` names it):
    a plain tensor (or a subclass that leaves dispatch to torch, such as
    nn.Parameter), or a DTensor without Partial placements (with
    `pending_sums`, a grad: Partial "sum" or "avg", which reduced_locals
    reduces) whose local shard is such a tensor, strided."""
    cls = type(t)
    if cls in _PLAIN_TYPES:
        return
    if is_dtensor(t):
        for placement in t.placements:
            if placement.is_partial() and not (pending_sums and getattr(placement, "reduce_op", None) in
                                               ("sum", "avg")):
                raise TypeError(f"{what} is a DTensor with a Partial placement ({t.placements}): its local shards "
                                f"hold pending sums, not values. Reduce it first (.redistribute(mesh, "
                                f"[Replicate()]) or the param's own placements)")
        check_tensor(t._local_tensor, f"the local shard of {what}")
        if t._local_tensor.layout is not torch.strided:
            raise TypeError(f"{what}: the local shard is {t._local_tensor.layout}, not strided")
        return
    check_plain(t, what)


def check_plain(t: Tensor, what: str) -> None:
    """Raise TypeError unless `t` is a tensor whose data pointer is its data:
    not a subclass that intercepts torch's dispatch (a DTensor, a FakeTensor),
    whose pointer a kernel would write through."""
    cls = type(t)
    if cls in _PLAIN_TYPES or getattr(cls, "__torch_dispatch__", None) is Tensor.__torch_dispatch__:
        return
    kind = "a DTensor" if is_dtensor(t) else f"a {cls.__module__}.{cls.__qualname__}"
    raise TypeError(f"{what} is {kind}, a tensor subclass that intercepts torch's dispatch: fusedopt's kernels take "
                    f"plain tensors (the optimizers and norms hand them a DTensor's local shard). Pass its plain "
                    f"data, or use a torch.optim optimizer for this param")


def _shard_dim(placement, ndim: int) -> int | None:
    """The tensor dim a placement shards (Shard and _StridedShard alike), or None."""
    if placement.is_replicate():
        return None
    dim = getattr(placement, "dim", None)
    if dim is None:
        raise TypeError(f"unsupported DTensor placement {placement!r}")
    return dim % ndim if ndim else dim


class Sharding:
    """How one DTensor is laid out: mesh, placements and its number of dims."""

    __slots__ = ("_groups", "mesh", "ndim", "placements")

    def __init__(self, mesh, placements: Sequence, ndim: int):
        self.mesh, self.placements, self.ndim = mesh, tuple(placements), ndim
        self._groups: dict = {}

    def groups(self, dims: Sequence[int] | None = None) -> tuple:
        """The process groups to sum a statistic over that reduces over tensor
        dims `dims` (None: the whole tensor): one per mesh dim of more than
        one rank whose placement shards one of them, in mesh-dim order."""
        key = None if dims is None else tuple(sorted(d % self.ndim for d in dims))
        found = self._groups.get(key)
        if found is None:
            found = []
            for mesh_dim, placement in enumerate(self.placements):
                dim = _shard_dim(placement, self.ndim)
                if dim is None or self.mesh.size(mesh_dim) == 1 or (key is not None and dim not in key):
                    continue
                found.append(self.mesh.get_group(mesh_dim))
            found = self._groups[key] = tuple(found)
        return found

    def reduced_placements(self, dims: Sequence[int]) -> tuple:
        """The placements of a tensor with the param's dims where `dims` are
        reduced (to size 1: a row or column statistic): the param's, with
        Replicate on the mesh dims that shard one of them."""
        if not dims:
            return self.placements
        from torch.distributed.tensor import Replicate

        reduced = {d % self.ndim for d in dims}
        return tuple(Replicate() if _shard_dim(placement, self.ndim) in reduced else placement
                     for placement in self.placements)


_shardings: dict = {}


def sharding_for(mesh, placements: Sequence, ndim: int) -> Sharding:
    """The Sharding of a DTensor of `ndim` dims on `mesh` with `placements`
    (one object per layout)."""
    key = (mesh, tuple(placements), ndim)
    found = _shardings.get(key)
    if found is None:
        found = _shardings[key] = Sharding(mesh, placements, ndim)
    return found


def sharding_of(t: Tensor) -> Sharding | None:
    """The Sharding of a DTensor (shared by every DTensor of the same mesh,
    placements and number of dims), or None for a plain tensor."""
    if not is_dtensor(t):
        return None
    spec = t._spec
    return sharding_for(spec.mesh, spec.placements, t.dim())


def _pending_sums(have: Sequence, want: Sequence) -> tuple | None:
    """The (mesh dim, reduce op) pairs where placements `have` hold pending
    sums (Partial "sum" or "avg") that placements `want` replicate, when that
    is all that differs between them; else None."""
    pending = []
    for dim, (a, b) in enumerate(zip(have, want)):
        if a == b:
            continue
        if not (a.is_partial() and b.is_replicate() and getattr(a, "reduce_op", None) in ("sum", "avg")):
            return None
        pending.append((dim, a.reduce_op))
    return tuple(pending)


def grad_fits(g: Tensor, p: Tensor) -> bool:
    """Whether DTensor grad g can be stepped for DTensor param p: the same
    mesh, and p's placements or pending sums where p is Replicate (the grads
    of SequenceParallel's norm weights)."""
    gs, ps = g._spec, p._spec
    if not (gs.mesh is ps.mesh or gs.mesh == ps.mesh):
        return False
    return gs.placements == ps.placements or _pending_sums(gs.placements, ps.placements) is not None


def reduced_locals(grads: list[Tensor], placements: list[Sequence]) -> list[Tensor]:
    """The local shards of DTensor grads (grad_fits checked) in the
    placements `placements[i]`: a grad's own local shard when they are its
    placements, else its pending sums reduced: one all-reduce per mesh dim
    for all grads that share a mesh and pending dims (new tensors: .grad is
    left as it is)."""
    import torch.distributed as dist

    out: list = [None] * len(grads)
    batches: dict = {}
    for i, (g, want) in enumerate(zip(grads, placements)):
        if tuple(g.placements) == tuple(want):
            out[i] = g._local_tensor
        else:
            batches.setdefault((g.device_mesh, _pending_sums(g.placements, want)), []).append(i)
    for (mesh, pending), index in batches.items():
        locals_ = [grads[i]._local_tensor for i in index]
        flat = torch.cat([t.reshape(-1) for t in locals_])
        for dim, op in pending:
            dist.all_reduce(flat, group=mesh.get_group(dim))
            if op == "avg":
                flat.div_(mesh.size(dim))
        offset = 0
        for i, t in zip(index, locals_):
            out[i] = flat[offset:offset + t.numel()].view_as(t)
            offset += t.numel()
    return out


def replicated(placements: Sequence) -> tuple:
    """`placements` with pending sums (Partial) made Replicate: what a grad's are once reduced."""
    from torch.distributed.tensor import Replicate

    return tuple(Replicate() if p.is_partial() else p for p in placements)


def like(p: Tensor, value: Tensor, placements: Sequence | None = None, shape: Sequence[int] | None = None) -> Tensor:
    """A DTensor on p's mesh whose local shard is `value` (placements and
    global shape: p's, unless given; contiguous global strides when a shape is
    given). Used for the states of DTensor params."""
    from torch.distributed.tensor import DTensor

    if shape is None:
        shape, stride = p.shape, p.stride()
    else:
        shape = torch.Size(shape)
        stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value, p.device_mesh, p.placements if placements is None else placements,
                              run_check=False, shape=shape, stride=stride)


def whole(t: Tensor) -> Tensor:
    """A DTensor's whole value on every rank (an all-gather; pending sums summed); a plain tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(p: Tensor, value: Tensor) -> Tensor:
    """`value`, whole on every rank, as a DTensor laid out as p (this rank's
    shard of it: no communication); for a plain p, value itself."""
    if not is_dtensor(p):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    mesh = p.device_mesh
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, p.placements)


def scalar_like(t: Tensor, value: Tensor) -> Tensor:
    """A 0-d `value` that can multiply t: a replicated DTensor on t's mesh when t is a DTensor."""
    if not is_dtensor(t):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    mesh = t.device_mesh
    return DTensor.from_local(value.to(t.device), mesh, [Replicate()] * mesh.ndim, run_check=False)


class TensorSums:
    """Whole-tensor statistics from the local partial sums of a list of
    tensors ("members": a launch's tensors, plus the DTensors of its bucket
    whose local shard is empty, which launch nothing but must join every
    collective, as the other ranks of their groups wait for them).

    Member i has layout ``shardings[i]`` (None: a plain tensor, whole on
    every rank), global shape ``shapes[i]`` and local shape
    ``local_shapes[i]``; ``slots``: the members the kernels launch, in launch
    order.
    """

    def __init__(self, shardings: list[Sharding | None], shapes: list[torch.Size] | None,
                 local_shapes: list[torch.Size] | None, slots: list[int], device: torch.device):
        self.shardings, self.shapes, self.local_shapes, self.slots = shardings, shapes, local_shapes, slots
        self.n = len(shardings)
        self.device = device
        self._slot_index = torch.tensor(slots, dtype=torch.int64, device=device)
        self._plans: dict = {}

    def _plan(self, dims):
        """[(group, index tensor of the members it sums)] for statistics over tensor dims `dims`."""
        key = None if dims is None else tuple(dims)
        found = self._plans.get(key)
        if found is None:
            members: dict = {}
            for i, sharding in enumerate(self.shardings):
                if sharding is not None:
                    for group in sharding.groups(dims):
                        members.setdefault(group, []).append(i)
            found = self._plans[key] = [(group, index, torch.tensor(index, dtype=torch.int64, device=self.device))
                                        for group, index in members.items()]
        return found

    def whole(self, sums: Tensor, op: str = "sum", every_member: bool = False) -> Tensor:
        """sums [k, launched members]: per-tensor partial sums (or maxima with
        op="max") of the launched members -> the same of the whole tensors:
        of the launched members, or with `every_member` of all of them (a
        total over the tensors must count those with no shard here too)."""
        if not self._plan(None) and not every_member:
            return sums
        full = torch.zeros((sums.shape[0], self.n), dtype=sums.dtype, device=sums.device)
        full.index_copy_(1, self._slot_index, sums)
        self.reduce_(full, op=op)
        return full if every_member else full.index_select(1, self._slot_index)

    def reduce_(self, full: Tensor, dims: Sequence[int] | None = None, op: str = "sum") -> Tensor:
        """full [k, members] of per-member partial statistics over tensor dims
        `dims`, reduced in place: one collective per process group."""
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        for group, _, index in self._plan(None if dims is None else tuple(dims)):
            part = full.index_select(1, index)
            dist.all_reduce(part, op=reduce_op, group=group)
            full.index_copy_(1, index, part)
        return full

    def reduce_parts_(self, parts: list[Tensor], dims: Sequence[int]) -> None:
        """Per-member statistics (one tensor each, any shapes: e.g. row sums)
        over tensor dims `dims`, summed in place over each member's groups for
        those dims: the parts of one group concatenated into one collective."""
        import torch.distributed as dist

        for group, index, _ in self._plan(tuple(dims)):
            chosen = [parts[i] for i in index]
            flat = torch.cat([t.reshape(-1) for t in chosen])
            dist.all_reduce(flat, group=group)
            offset = 0
            for t in chosen:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
