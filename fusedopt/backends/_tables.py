"""Device-side launch metadata for the GPU backends (triton and cuda).

A bucket becomes one int64 *table* of tensor addresses, one row per list
(params, grads, each state, master, step), plus a *chunk list*: every tensor is
cut into fixed-size chunks and each program / thread block takes one chunk, so
the work is balanced by elements whatever the tensor sizes.

Everything is packed into one pinned host buffer and copied with one
non-blocking transfer. Tables are cached by (addresses, sizes): when the same
tensors come back (states, masters and steps always do; grads do when they are
kept between steps), the cached device copy is reused, which is also what lets
a CUDA-graph capture run without any host-to-device copy.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

# Row order of the Adam-family tables (AdamW, LAMB): MomentRow in
# csrc/include/fusedopt/multi_tensor.h and ROW_* in kernels/_table.py use the
# same numbers; a row an optimizer lacks is left absent (address 0).
MOMENT_ROWS = ("params", "grads", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "masters", "steps")

_CACHE_SIZE = 64
_cache: OrderedDict[tuple, "LaunchTables"] = OrderedDict()


@dataclass(frozen=True)
class LaunchTables:
    table: Tensor          # int64 [rows * n_tensors] addresses (0 for an absent row)
    numel: Tensor          # int64 [n_tensors]
    chunk_tensor: Tensor   # int64 [n_chunks] tensor index of each chunk
    chunk_start: Tensor    # int64 [n_chunks] first element of each chunk
    chunk_first: Tensor    # int64 [n_tensors + 1] first chunk of each tensor (for per-tensor reductions)
    n_tensors: int
    n_chunks: int
    chunk_size: int
    host: Tensor           # the pinned source buffer, kept alive for graph replays


def launch_tables(rows: list[list[Tensor] | None], device: torch.device, chunk_size: int) -> LaunchTables:
    """Tables for `rows` (aligned tensor lists; None for an absent row)."""
    n = len(rows[0])
    addresses = tuple(0 if row is None else t.data_ptr() for row in rows for t in (row or [None] * n))
    numels = tuple(t.numel() for t in rows[0])
    key = (device, chunk_size, addresses, numels)
    cached = _cache.get(key)
    if cached is not None:
        _cache.move_to_end(key)
        return cached
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fusedopt: the optimizer's tensors changed while a CUDA graph was being captured. "
            "Run the step once outside the capture (warm-up) with the same tensors, and keep grads "
            "between steps (zero_grad(set_to_none=False)) so their addresses stay fixed."
        )
    counts = [(size + chunk_size - 1) // chunk_size for size in numels]
    n_chunks = sum(counts)
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64))
    first_chunk = torch.tensor([0] + counts[:-1], dtype=torch.int64).cumsum(0)
    chunk_start = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk_size
    chunk_first = torch.cat([first_chunk, torch.tensor([n_chunks], dtype=torch.int64)])
    host = torch.cat([torch.tensor(addresses, dtype=torch.int64), torch.tensor(numels, dtype=torch.int64),
                      chunk_tensor, chunk_start, chunk_first])
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    a, b = len(addresses), len(addresses) + n
    c, d = b + n_chunks, b + 2 * n_chunks
    tables = LaunchTables(flat[:a], flat[a:b], flat[b:c], flat[c:d], flat[d:], n, n_chunks, chunk_size, host)
    _cache[key] = tables
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return tables


def moment_rows(bucket) -> list[list[Tensor] | None]:
    """The bucket's lists in MOMENT_ROWS order (None for a state it lacks)."""
    return [bucket.params, bucket.grads, bucket.states.get("exp_avg"), bucket.states.get("exp_avg_sq"),
            bucket.states.get("max_exp_avg_sq"), bucket.masters, bucket.steps]
