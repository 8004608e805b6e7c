"""Bucketed gradient all-reduce / reduce-scatter that overlaps with backward.

``GradBuckets(model)`` registers a post-accumulate-grad hook on every param.
Params are packed, in reverse registration order (the order backward tends to
produce their grads), into flat buckets of one (device, dtype): the first holds
up to ``first_bucket_mb`` (so communication starts early), the others up to
``bucket_cap_mb``; a param larger than the cap gets a bucket of its own. Each
grad is moved into its bucket's buffer as it arrives and ``p.grad`` becomes a
view of that buffer (so no second copy is held, and later accumulation lands
in the buffer directly). When the last grad of a bucket arrives, the bucket's
collective is launched asynchronously while backward goes on (in bucket
order: a bucket waits for the ones before it, so that every rank issues the
same collectives in the same order):

  mode="all_reduce"      every rank ends with the sum (or mean) of the grads
  mode="reduce_scatter"  every rank ends with its shard of every bucket:
                         ``bucket.shard``, elements [shard_start, shard_end) of the
                         bucket's flat buffer (equal contiguous shards, the
                         buffer padded with zeros to a multiple of the world size);
                         ``p.grad`` keeps this rank's own, unreduced grad

``wait()`` launches what backward did not (buckets with a param that got no
grad here: its part counts as zeros), finishes every collective and averages
(a SUM and then a scale: gloo has no PREMUL_SUM). A param that got no grad on
any rank keeps ``grad=None`` (one small all-reduce of flags says which); one that
got a grad on some rank only gets the reduced grad everywhere.
``layout`` (a list of lists of params, all of one device and dtype each) fixes
the buckets and their order instead; with mode="reduce_scatter",
``shard_sizes`` (per bucket, the number of elements each rank receives, in rank
order) cuts a bucket into uneven consecutive pieces (an all-to-all and a local
sum, the same bytes as a reduce-scatter): the ZeRO wrapper uses both so that
small buckets land in its contiguous param shards. ``keep_grads=False``
(reduce_scatter mode) leaves ``p.grad`` None and keeps only the shards: the
full-size buffer of a bucket is released as soon as its reduction is done,
and at most MAX_IN_FLIGHT buckets are being reduced at once (launching one
more first finishes the oldest), so during backward no more than that many
full-size buckets (plus the one filling) exist at a time, as in ZeRO-2.

``with buckets.no_sync():`` accumulates without communicating (gradient
accumulation); the next backward outside it reduces the accumulated grads.

``reduce_dtype=torch.bfloat16`` sends bf16 but sums in fp32: each rank sends the
bf16 chunks of its buffer to their owners (all-to-all), the owner adds the N
chunks in fp32, and (all_reduce mode) the reduced chunks are all-gathered in
bf16. So the result is the fp32 sum of bf16-rounded grads, rounded once more to
bf16 in all_reduce mode; bytes sent per element are half of fp32's.

Every rank must run the same backward/wait sequence (collectives are matched in
order), as with DDP.

DTensor params (tensor parallel, the model replicated over the data-parallel
``process_group``): their local shards are bucketed and reduced, and ``p.grad``
stays a DTensor of the param's layout whose local shard is the bucket's view.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dtensor
from . import _collectives as comm

MODES = ("all_reduce", "reduce_scatter")
#: keep_grads=False: buckets reduced at once before the oldest is finished and released
MAX_IN_FLIGHT = 2


@dataclass
class GradBucket:
    """One flat buffer of grads and the params that live in it."""

    params: list[Tensor]
    offsets: list[int]          # where each param's grad starts in `buffer`
    numel: int                  # elements used (the rest is zero padding)
    buffer: Tensor | None       # padded to a multiple of the world size (None while released)
    shard_start: int = 0        # this rank's shard of the buffer
    shard_end: int = 0
    shard: Tensor | None = None  # reduce_scatter mode: the reduced shard after wait()
    ready: list[bool] = field(default_factory=list)     # grad arrived in this (synced) backward
    has_grad: list[bool] = field(default_factory=list)  # grad arrived since the last wait() (no_sync too)
    launched: bool = False
    sends: list[int] | None = None  # reduce_scatter with explicit pieces: elements for each rank, in order
    _pending: list = field(default_factory=list)  # (work, finish) pairs
    _size: int = 0

    def view(self, i: int) -> Tensor:
        """Param i's grad in the buffer (its local shard's, for a DTensor)."""
        p = dtensor.local(self.params[i])
        return self.ensure()[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    def grad(self, i: int) -> Tensor:
        """view(i) as param i's .grad: a DTensor of the param's layout for a DTensor param."""
        p = self.params[i]
        return dtensor.like(p, self.view(i)) if dtensor.is_dtensor(p) else self.view(i)

    def ensure(self) -> Tensor:
        """The buffer, zero-filled again if it was released."""
        if self.buffer is None:
            self.buffer = torch.zeros(self._size, dtype=self.params[0].dtype, device=self.params[0].device)
        return self.buffer


class GradBuckets:
    def __init__(self, params_or_module, process_group=None, bucket_cap_mb: float = 25, first_bucket_mb: float = 1,
                 reduce_dtype: torch.dtype | None = None, average: bool = True, mode: str = "all_reduce",
                 layout: list[list[Tensor]] | None = None, shard_sizes: list[list[int]] | None = None,
                 keep_grads: bool = True):
        if mode not in MODES:
            raise ValueError(f"GradBuckets: mode must be one of {MODES}, got {mode!r}")
        if not bucket_cap_mb > 0 or not first_bucket_mb > 0:
            raise ValueError(f"GradBuckets: bucket sizes must be positive, got bucket_cap_mb={bucket_cap_mb}, "
                             f"first_bucket_mb={first_bucket_mb}")
        if reduce_dtype is not None and reduce_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"GradBuckets: reduce_dtype must be None, torch.bfloat16, torch.float16 or "
                             f"torch.float32, got {reduce_dtype}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GradBuckets needs torch.distributed initialized (dist.init_process_group)")
        params = params_or_module.parameters() if isinstance(params_or_module, torch.nn.Module) else params_or_module
        seen, self.params = set(), []
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"GradBuckets takes a module or tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.mode, self.average, self.reduce_dtype = mode, bool(average), reduce_dtype
        groups = layout if layout is not None else _pack(self.params, first_bucket_mb, bucket_cap_mb)
        if layout is not None and sorted(map(id, (p for g in layout for p in g))) != sorted(map(id, self.params)):
            raise ValueError("GradBuckets: layout must hold each param that requires grad exactly once")
        self.buckets = _make_buckets(groups, self.world, self.rank)
        if shard_sizes is not None:
            if layout is None or mode != "reduce_scatter" or len(shard_sizes) != len(self.buckets):
                raise ValueError("GradBuckets: shard_sizes needs mode='reduce_scatter' and one entry per layout bucket")
            for bucket, sends in zip(self.buckets, shard_sizes):
                if len(sends) != self.world or sum(sends) != bucket.numel or min(sends) < 0:
                    raise ValueError(f"GradBuckets: shard_sizes {sends} do not split a bucket of {bucket.numel} "
                                     f"elements over {self.world} ranks")
                bucket.sends = list(sends)
        self.keep_grads = bool(keep_grads)
        if not self.keep_grads:  # full-size buffers exist only from a bucket's first grad to its reduction
            for bucket in self.buckets:
                bucket.buffer = None
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._sync = True
        self._next = 0  # the next bucket to launch (in order)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    # --- backward ------------------------------------------------------------------

    def _on_grad(self, p: Tensor) -> None:
        bucket, i = self._where[id(p)]
        if bucket.launched:
            raise RuntimeError("GradBuckets: a grad arrived for a bucket already being reduced: call wait() "
                               "after each backward (or run the extra backward inside no_sync())")
        view = bucket.view(i)
        if p.grad is not None and not _same_memory(dtensor.local(p.grad), view):
            view.copy_(_local_grad(p))
            p.grad = bucket.grad(i)  # later accumulation lands in the buffer
        bucket.has_grad[i] = True
        if not self._sync:
            return
        bucket.ready[i] = True
        # launch in bucket order, as far as the buckets are complete: every rank
        # must issue the same collectives in the same order, even when the ranks
        # see their grads in different orders or not at all
        while self._next < len(self.buckets) and all(self.buckets[self._next].ready):
            self._launch(self.buckets[self._next])
            self._next += 1
            if not self.keep_grads:
                self._release_finished(self.buckets[:max(0, self._next - MAX_IN_FLIGHT)])

    def _release_finished(self, buckets: list[GradBucket]) -> None:
        """keep_grads=False: finish these launched buckets' reductions and free
        their full-size buffers (``p.grad`` None; the shard stays)."""
        for bucket in buckets:
            if bucket.buffer is None or not bucket.launched:
                continue
            for work, finish in bucket._pending:
                work.wait()
                finish()
            bucket._pending.clear()
            for p in bucket.params:
                p.grad = None
            bucket.buffer = None

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate grads without communicating; the first backward after
        the block reduces everything accumulated."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # --- the collectives -----------------------------------------------------------

    def _launch(self, bucket: GradBucket) -> None:
        """Start the bucket's collective; the `finish` closures run in wait()."""
        bucket.launched = True
        world, group, buf = self.world, self.group, bucket.ensure()
        divisor = world if self.average else 1
        low = self.reduce_dtype is not None and self.reduce_dtype != buf.dtype
        if bucket.sends is not None or low:
            # all-to-all: every rank sends each piece of its buffer to the piece's owner and
            # adds the N pieces it receives (in fp32 when the transfer is low precision)
            sends = bucket.sends or [buf.numel() // world] * world
            mine = sends[self.rank]
            sent = buf[:sum(sends)].to(self.reduce_dtype) if low else buf[:sum(sends)]
            received = torch.empty(world * mine, dtype=sent.dtype, device=buf.device)
            work = comm.all_to_all(received, sent, group, async_op=True, output_split_sizes=[mine] * world,
                                   input_split_sizes=sends)

            def finish():
                total = received.view(world, mine).float().sum(dim=0) if low else received.view(world, mine).sum(0)
                if divisor != 1:
                    total.div_(divisor)
                if self.mode == "reduce_scatter":
                    bucket.shard = total.to(buf.dtype)
                    return
                gathered = torch.empty_like(sent)
                comm.all_gather(gathered, total.to(sent.dtype), group)
                buf.copy_(gathered)
            bucket._pending.append((work, finish))
        elif self.mode == "all_reduce":
            work = comm.all_reduce(buf, group, async_op=True)
            bucket._pending.append((work, lambda: buf.div_(divisor) if divisor != 1 else None))
        else:
            out = torch.empty(buf.numel() // world, dtype=buf.dtype, device=buf.device)
            work = comm.reduce_scatter(out, buf, group, async_op=True)

            def finish_scatter():
                bucket.shard = out.div_(divisor) if divisor != 1 else out
            bucket._pending.append((work, finish_scatter))

    def wait(self) -> None:
        """Launch what is left, finish every collective, settle the grads."""
        if not self._sync:
            raise RuntimeError("GradBuckets.wait() inside no_sync(): nothing is reduced there")
        for bucket in self.buckets[self._next:]:
            if not bucket.launched:
                for i, has in enumerate(bucket.has_grad):
                    if not has:  # no grad here since the last wait (param unused): contribute zeros
                        bucket.view(i).zero_()
                self._launch(bucket)
        device = self.buckets[0].params[0].device if self.buckets else "cpu"  # NCCL reduces device tensors only
        had_grad = torch.tensor([float(h) for b in self.buckets for h in b.has_grad], device=device)
        flags = comm.all_reduce(had_grad, self.group, async_op=True) if self.params else None
        for bucket in self.buckets:
            for work, finish in bucket._pending:
                work.wait()
                finish()
            bucket._pending.clear()
        if flags is not None:
            flags.wait()
        used_flags = (had_grad > 0).tolist()  # one host read per wait(), not one per param
        k = 0
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                used = used_flags[k]
                k += 1
                if not used or not self.keep_grads:
                    p.grad = None  # keep_grads=False: only the shards are kept
                elif self.mode == "all_reduce" and (p.grad is None
                                                    or not _same_memory(dtensor.local(p.grad), bucket.view(i))):
                    p.grad = bucket.grad(i)
                elif self.mode == "reduce_scatter" and p.grad is None:
                    p.grad = bucket.grad(i)  # zeros: this rank's own (absent) contribution
            bucket.ready = [False] * len(bucket.params)
            bucket.has_grad = [False] * len(bucket.params)
            bucket.launched = False
            if not self.keep_grads:  # reduce_scatter: only the shard is kept; the next backward re-creates the buffer
                bucket.buffer = None
        self._next = 0

    def pending(self) -> bool:
        """Whether a backward has delivered grads (or started collectives) that
        no wait() has settled yet."""
        return any(b.launched or any(b.has_grad) for b in self.buckets)

    def shards(self) -> list[Tensor]:
        """reduce_scatter mode: this rank's reduced shard of each bucket (after wait())."""
        if self.mode != "reduce_scatter":
            raise RuntimeError("GradBuckets.shards() is for mode='reduce_scatter'")
        return [b.shard for b in self.buckets]

    def remove(self) -> None:
        """Unregister the hooks (grads stay where they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _local_grad(p: Tensor) -> Tensor:
    """p.grad's values as p's bucket holds them: a DTensor grad's local shard
    in p's placements (pending sums, Partial, reduced first: the grads of
    SequenceParallel's norm weights)."""
    g = p.grad
    if not dtensor.is_dtensor(g) or g._spec.placements == p._spec.placements:
        return dtensor.local(g)
    if not (dtensor.is_dtensor(p) and dtensor.grad_fits(g, p)):
        raise RuntimeError(f"GradBuckets: the grad of a param of shape {tuple(p.shape)} is a DTensor with "
                           f"placements {g.placements}, which the param's layout cannot take")
    return dtensor.reduced_locals([g], [p.placements])[0]


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _pack(params: list[Tensor], first_mb: float, cap_mb: float) -> list[list[Tensor]]:
    """Params in reverse order, in groups of one (device, dtype), each up to
    its cap (the first: first_mb), a larger param alone."""
    groups: list[list[Tensor]] = []
    size = 0
    for p in reversed(params):
        cap_bytes = (first_mb if len(groups) <= 1 else cap_mb) * 2**20  # groups[0] is the first bucket
        nbytes = dtensor.local(p).numel() * p.element_size()
        current = groups[-1] if groups else None
        fits = (current is not None and current[0].device == p.device and current[0].dtype == p.dtype
                and size + nbytes <= cap_bytes)
        if not fits:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    return groups


def _make_buckets(groups: list[list[Tensor]], world: int, rank: int) -> list[GradBucket]:
    """A zero-filled flat buffer per group, padded to a multiple of the world size."""
    buckets = []
    for members in groups:
        offsets, n = [], 0
        for p in members:
            offsets.append(n)
            n += dtensor.local(p).numel()
        padded = -(-n // world) * world if n else world
        buffer = torch.zeros(padded, dtype=members[0].dtype, device=members[0].device)
        shard = padded // world
        buckets.append(GradBucket(params=members, offsets=offsets, numel=n, buffer=buffer, _size=padded,
                                  shard_start=rank * shard, shard_end=(rank + 1) * shard,
                                  ready=[False] * len(members), has_grad=[False] * len(members)))
    return buckets
