"""Device-side launch metadata for the GPU backends (triton and cuda).

A bucket becomes one int64 *table* of tensor addresses, one row per list
(params, grads, each state, master, step), plus a *chunk list*: every tensor is
cut into fixed-size chunks and each program / thread block takes one chunk, so
the work is balanced by elements whatever the tensor sizes.

Everything is packed into one pinned host buffer and copied with one
non-blocking transfer. Tables are cached by (addresses, sizes): when the same
tensors come back (states, masters and steps always do; grads do when they are
kept between steps), the cached device copy is reused, which is also what lets
a CUDA-graph capture run without any host-to-device copy (_TableCache).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dtensor import check_plain
from ..reference import fp8_states
from ._dtypes import FP8_STATE_DTYPE

# Row order of the Adam-family tables (AdamW, LAMB): MomentRow in
# csrc/include/fusedopt/multi_tensor.h and ROW_* in kernels/_table.py use the
# same numbers; a row an optimizer lacks is left absent (address 0).
MOMENT_ROWS = ("params", "grads", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "masters", "steps", "fp8_weights",
               "fp8_scales", "exp_avg_scale", "exp_avg_sq_scale", "max_exp_avg_sq_scale")

_CACHE_SIZE = 64


def _capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (asked on
    that device: the caller may not have made it current yet)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class _TableCache:
    """The device tables built for recent launches, by what they were built
    from (least recently used dropped beyond _CACHE_SIZE), with what a GPU
    needs of them beyond that:

    * a table used while a CUDA graph is captured is kept for the life of the
      process: the graph holds its address, replays never come back here, and
      a dropped table's memory would be handed to other tensors;
    * a table used on another stream than the one it was copied on is
      recorded on that stream, so that dropping it cannot free memory a
      queued kernel still reads (the allocator ignores the copy's own stream);
    * a table missing during a capture is an error: building it would record
      a host-to-device copy of host data into the graph.
    """

    def __init__(self):
        self._recent: OrderedDict[tuple, object] = OrderedDict()
        self._captured: dict[tuple, object] = {}

    def get(self, key: tuple, device: torch.device):
        entry = self._recent.get(key) or self._captured.get(key)
        capturing = _capturing(device)
        if entry is None:
            if capturing:
                raise RuntimeError(
                    "fusedopt: the optimizer's tensors changed while a CUDA graph was being captured. "
                    "Run the step once outside the capture (warm-up) with the same tensors, and keep grads "
                    "between steps (zero_grad(set_to_none=False)) so their addresses stay fixed.")
            return None
        if key in self._recent:
            self._recent.move_to_end(key)
        if capturing:
            self._captured[key] = entry
        elif device.type == "cuda":  # no-op on the copy's own stream
            entry.device_buffer.record_stream(torch.cuda.current_stream(device))
        return entry

    def put(self, key: tuple, entry):
        self._recent[key] = entry
        if len(self._recent) > _CACHE_SIZE:
            self._recent.popitem(last=False)
        return entry


def _to_device(host: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(source, copy): one non-blocking copy of an int64 host buffer, pinned
    first for CUDA (the tables keep the pinned source alive)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host, host.to(device, non_blocking=True)


_cache = _TableCache()


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

    @property
    def device_buffer(self) -> Tensor:
        """A view of the one device allocation all the tables live in."""
        return self.table

    def walk(self, first: bool = False) -> dict:
        """The chunk walk by the names the cuda ops' schemas give it; first:
        with chunk_first (ops that reduce per tensor)."""
        args = dict(table=self.table, numel=self.numel, chunk_tensor=self.chunk_tensor, chunk_start=self.chunk_start,
                    chunk_size=self.chunk_size)
        if first:
            args["chunk_first"] = self.chunk_first
        return args


def launch_tables(rows: list[list[Tensor] | None], device: torch.device, chunk_size: int) -> LaunchTables:
    """Tables for `rows` (aligned tensor lists; None for an absent row)."""
    n = len(rows[0])
    addresses = tuple(0 if row is None else t.data_ptr() for row in rows for t in (row or [None] * n))
    numels = tuple(t.numel() for t in rows[0])
    key = (device, chunk_size, addresses, numels)
    cached = _cache.get(key, device)
    if cached is not None:
        return cached
    for row in rows:  # a new table: a DTensor's (null) pointer would reach the kernels
        for t in row or ():
            check_plain(t, "a tensor of a launch")
    counts = [(size + chunk_size - 1) // chunk_size for size in numels]
    n_chunks = sum(counts)
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64))
    first_chunk = torch.tensor([0] + counts[:-1], dtype=torch.int64).cumsum(0)
    chunk_start = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk_size
    chunk_first = torch.cat([first_chunk, torch.tensor([n_chunks], dtype=torch.int64)])
    host = torch.cat([torch.tensor(addresses, dtype=torch.int64), torch.tensor(numels, dtype=torch.int64),
                      chunk_tensor, chunk_start, chunk_first])
    host, flat = _to_device(host, device)
    a, b = len(addresses), len(addresses) + n
    c, d = b + n_chunks, b + 2 * n_chunks
    return _cache.put(key, LaunchTables(flat[:a], flat[a:b], flat[b:c], flat[c:d], flat[d:], n, n_chunks, chunk_size,
                                        host))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-n // multiple) * multiple


def launch_sizes(bucket, chunk_size: int, block_size: int = 1) -> tuple[int, int]:
    """(block, chunk) for a launch over `bucket`: as given, or with block-scaled
    FP8 states the next multiples that keep each 256-element state block inside
    one loop iteration (block) and one chunk (the kernels encode whole blocks)."""
    if bucket.state_dtype != FP8_STATE_DTYPE:
        return block_size, chunk_size
    block = round_up(block_size, fp8_states.BLOCK)
    return block, round_up(chunk_size, block)


def moment_rows(bucket, states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq")) -> list[list[Tensor] | None]:
    """The bucket's lists in MOMENT_ROWS order (None for a state it lacks);
    `states` names the states in the three moment rows (Sophia: exp_avg, hessian)."""
    moments = [bucket.states.get(name) for name in states] + [None] * (3 - len(states))
    scales = [bucket.states.get(f"{name}_scale") for name in states] + [None] * (3 - len(states))
    return [bucket.params, bucket.grads, *moments, bucket.masters, bucket.steps,
            bucket.fp8.weights if bucket.fp8 else None, bucket.fp8.scales if bucket.fp8 else None, *scales]
