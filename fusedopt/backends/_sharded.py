"""The GPU backends' Adafactor for DTensor params (fusedopt/dtensor.py; the
cpu backend's is csrc/cpu/adafactor_sharded.cpp): the step in phases with
the statistics summed over the shards between them (step), the bucket's
layout, and the update of the replicated statistics of members whose local
shard is empty (they launch nothing)."""
from __future__ import annotations

import dataclasses

import torch

from ..reference import adafactor as adafactor_spec
from ._bucket import advance_steps
from .reference import _load_state, _store_state


def step(bucket, make_phases, *, lr, beta2_decay, eps1, eps2, d, found_inf) -> None:
    """One step of a bucket of sharded tensors (``stats``; every member in it,
    empty shards too). make_phases(live_bucket) gives the backend's launches
    over the members with a local element:

      sums(row_sums, col_sums, layout) -> sum(p*p) per live member    (factored; writes the raw row
                                                                        and column sums of g*g)
      factors(row_sums, col_sums, layout) -> per live slice the sum of row_var (after the update)
      unorm(rmean) -> sum(u*u) per live member                          (rmean per live slice)
      vector_stats() -> (sum(p*p), sum(u*u)) per live member            (0-d / 1-d; variance updated)
      apply(scale, rmean)                                               (the update)

    Between them, the collectives of bucket.stats; every rank makes the same
    ones, whatever found_inf (the kernels then write zeros and change nothing)."""
    stats, device = bucket.stats, bucket.device
    layout = bucket.launch_cache.get("adafactor_sharded")
    if layout is None:
        layout = bucket.launch_cache["adafactor_sharded"] = ShardedLayout(bucket)
    advance_steps(bucket.steps, found_inf)
    live = layout.live_bucket(bucket)
    phases = make_phases(live) if live.params else None
    math = torch.float64 if bucket.dtype == torch.float64 else torch.float32  # of rmean and the scale
    eps1 = torch.finfo(bucket.dtype).eps if eps1 is None else eps1
    zeros = {"dtype": torch.float64, "device": device}
    p_sq, u_sq = torch.zeros(stats.n, **zeros), torch.zeros(stats.n, **zeros)
    rmean = None
    if bucket.kind.factored:
        row_sums, col_sums = torch.zeros(layout.n_rows, **zeros), torch.zeros(layout.n_cols, **zeros)
        if phases is not None:
            p_sq.index_copy_(0, layout.live_index, phases.sums(row_sums, col_sums, layout))
        stats.reduce_parts_(list(row_sums.split(layout.row_counts)), dims=(-1,))
        stats.reduce_parts_(list(col_sums.split(layout.col_counts)), dims=(-2,))
        rv_sums = torch.zeros(layout.n_slices, **zeros)
        if phases is not None:
            rv_sums.index_copy_(0, layout.live_slices, phases.factors(row_sums, col_sums, layout))
        for i in layout.empty:  # replicated statistics of an empty shard (a few rows or columns, in torch ops)
            empty_shard_factors(bucket, i, layout, row_sums, col_sums, rv_sums, beta2_decay, found_inf)
        stats.reduce_parts_(list(rv_sums.split(layout.slice_counts)), dims=(-2,))
        if phases is not None:
            rmean = (rv_sums.index_select(0, layout.live_slices) / layout.slice_full_rows).to(math)
            rmean = torch.where(rmean < eps1, torch.full_like(rmean, eps1), rmean)  # clamp, keeping NaN
            u_sq.index_copy_(0, layout.live_index, phases.unorm(rmean))
    elif phases is not None:
        live_p, live_u = phases.vector_stats()
        p_sq.index_copy_(0, layout.live_index, live_p)
        u_sq.index_copy_(0, layout.live_index, live_u)
    p_sq, u_sq = bucket.whole_tensor_sums(p_sq, u_sq)
    if phases is None:
        return
    scale = adafactor_spec.scales(p_sq.index_select(0, layout.live_index), u_sq.index_select(0, layout.live_index),
                                  layout.live_numel, torch.stack(live.steps), lr, eps2, d, math)
    phases.apply(scale, rmean)


class ShardedLayout:
    """The phased Adafactor's layout of a bucket, made once per bucket (a
    cached plan reuses it): its members with a non-empty local shard (what
    the kernels launch over: live_bucket), and where each member's rows,
    columns and slices sit in the flat sums."""

    def __init__(self, bucket):
        stats, device = bucket.stats, bucket.device
        self.live = live = [i for i, p in enumerate(bucket.params) if p.numel()]
        self.empty = [i for i in range(len(bucket.params)) if i not in set(live)]
        self.live_index = torch.tensor(live, dtype=torch.int64, device=device)
        self.live_numel = torch.tensor([stats.shapes[i].numel() for i in live], dtype=torch.int64, device=device)
        self.row_counts, self.col_counts, self.slice_counts, rows0, cols0, slices0 = [], [], [], [], [], []
        slice_tensor, slice_batch, live_slices, full_rows, full_cols, slice_full_rows = [], [], [], [], [], []
        n_rows = n_cols = n_slices = 0
        factored = bool(bucket.kind.factored)
        for i, (shape, local) in enumerate(zip(stats.shapes, stats.local_shapes)):
            batch, r, c = (local[:-2].numel(), local[-2], local[-1]) if factored else (1, 1, 1)
            rows0.append(n_rows)
            cols0.append(n_cols)
            slices0.append(n_slices)
            self.row_counts.append(batch * r)
            self.col_counts.append(batch * c)
            self.slice_counts.append(batch)
            if factored and i in set(live):
                full_rows.append(shape[-2])
                full_cols.append(shape[-1])
                for b in range(batch):
                    slice_tensor.append(len(full_rows) - 1)
                    slice_batch.append(b)
                    live_slices.append(n_slices + b)
                    slice_full_rows.append(float(shape[-2]))
            n_rows, n_cols, n_slices = n_rows + batch * r, n_cols + batch * c, n_slices + batch
        self.n_rows, self.n_cols, self.n_slices = n_rows, n_cols, n_slices
        self.rows0, self.cols0, self.slices0 = rows0, cols0, slices0

        def ints(xs):
            return torch.tensor(xs, dtype=torch.int64, device=device)

        self.row_base, self.col_base = ints([rows0[i] for i in live]), ints([cols0[i] for i in live])
        self.slice_tensor, self.slice_batch, self.live_slices = ints(slice_tensor), ints(slice_batch), ints(live_slices)
        self.full_rows, self.full_cols = ints(full_rows), ints(full_cols)
        self.slice_full_rows = torch.tensor(slice_full_rows, dtype=torch.float64, device=device)

    def live_bucket(self, bucket):
        """The bucket of this step's members with a non-empty local shard (the
        bucket itself when none is empty): made per step, as a cached plan
        refills the bucket's grads."""
        if not self.empty:
            return bucket

        def pick(xs):
            return None if xs is None else [xs[i] for i in self.live]

        return dataclasses.replace(
            bucket, params=pick(bucket.params), grads=pick(bucket.grads), masters=pick(bucket.masters),
            steps=pick(bucket.steps), states={k: pick(v) for k, v in bucket.states.items()}, launch_cache={})


def empty_shard_factors(bucket, i, layout, row_sums, col_sums, rv_sums, beta2_decay, found_inf):
    """Member i has no element here but may hold rows (its columns sharded
    away) or columns (its rows sharded away) of replicated statistics: lerp
    them to the whole rows' and columns' means, as _sharded_factors does."""
    stats = bucket.stats
    shape = stats.shapes[i]
    dtype = torch.float64 if bucket.dtype == torch.float64 else torch.float32
    w = bucket.steps[i].double().pow(beta2_decay).to(dtype)
    rows = row_sums[layout.rows0[i]:layout.rows0[i] + layout.row_counts[i]]
    cols = col_sums[layout.cols0[i]:layout.cols0[i] + layout.col_counts[i]]
    skip = found_inf is not None and found_inf.reshape(()) != 0  # on the device: no host sync
    for name, sums, count in (("row_var", rows, shape[-1]), ("col_var", cols, shape[-2])):
        old = _load_state(bucket, name, i, dtype)
        new = old.lerp((sums / count).to(dtype).view_as(old), w)
        _store_state(bucket, name, i, torch.where(skip, old, new) if found_inf is not None else new)
    stored = _load_state(bucket, "row_var", i, dtype).double().reshape(layout.slice_counts[i], -1).sum(-1)
    if found_inf is not None:
        stored = torch.where(skip, torch.zeros_like(stored), stored)
    rv_sums[layout.slices0[i]:layout.slices0[i] + layout.slice_counts[i]] = stored
