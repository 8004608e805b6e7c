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

import math
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


def moment_rows(bucket, second: str = "exp_avg_sq") -> list[list[Tensor] | None]:
    """The bucket's lists in MOMENT_ROWS order (None for a state it lacks);
    `second` names the state in the second-moment row (Sophia: "hessian")."""
    return [bucket.params, bucket.grads, bucket.states.get("exp_avg"), bucket.states.get(second),
            bucket.states.get("max_exp_avg_sq"), bucket.masters, bucket.steps,
            bucket.fp8.weights if bucket.fp8 else None, bucket.fp8.scales if bucket.fp8 else None,
            bucket.states.get("exp_avg_scale"), bucket.states.get(second + "_scale"),
            bucket.states.get("max_exp_avg_sq_scale")]


# Row order of the Adafactor tables: AdafactorRow in csrc/include/fusedopt/adafactor.h
# and ROW_* in kernels/adafactor.py use the same numbers.
ADAFACTOR_ROWS = ("params", "grads", "exp_avg", "variance", "row_var", "col_var", "masters", "steps",
                  "exp_avg_scale")


def adafactor_rows(bucket) -> list[list[Tensor] | None]:
    """The bucket's lists in ADAFACTOR_ROWS order (None for a state it lacks)."""
    states = bucket.states
    return [bucket.params, bucket.grads, states.get("exp_avg"), states.get("variance"), states.get("row_var"),
            states.get("col_var"), bucket.masters, bucket.steps, states.get("exp_avg_scale")]


def adafactor_storage(bucket) -> tuple[torch.dtype, torch.dtype]:
    """(second-moment statistics, exp_avg) storage dtypes of an Adafactor
    bucket: they differ when exp_avg is block-scaled FP8 (FusedAdafactor
    keeps its statistics at their default storage)."""
    stats = bucket.states["row_var" if "row_var" in bucket.states else "variance"][0].dtype
    return stats, bucket.states["exp_avg"][0].dtype if "exp_avg" in bucket.states else stats


@dataclass(frozen=True)
class FactoredTables:
    """Programs of the factored (row / column) passes over tensors [.., R, C]."""
    rows: Tensor          # int64 [n] R of each tensor
    cols: Tensor          # int64 [n] C
    slice_first: Tensor   # int64 [n] index of the tensor's first batch slice (rmean has one value per slice)
    n_slices: int
    row_tensor: Tensor    # int64 [row programs] tensor of each row program (RB rows of the [B*R, C] view)
    row_start: Tensor     # int64 [row programs] its first row
    row_first: Tensor     # int64 [n + 1] first row program of each tensor
    col_tensor: Tensor    # int64 [col programs] (tensor, batch slice, first column, slice index) of each
    col_batch: Tensor     #   column program (CB columns of one batch slice, all R rows)
    col_start: Tensor
    col_slice: Tensor
    host: Tensor

    @property
    def device_buffer(self) -> Tensor:
        return self.rows


_factored_cache = _TableCache()


def factored_tables(shapes: list[torch.Size], device: torch.device, row_block: int, col_block: int) -> FactoredTables:
    key = (tuple(tuple(s) for s in shapes), device, row_block, col_block)
    cached = _factored_cache.get(key, device)
    if cached is not None:
        return cached
    rows, cols, slice_first, row_tensor, row_start, row_first = [], [], [], [], [], []
    col_tensor, col_batch, col_start, col_slice = [], [], [], []
    n_slices = 0
    for t, shape in enumerate(shapes):
        R, C = shape[-2], shape[-1]
        B = math.prod(shape[:-2])
        rows.append(R)
        cols.append(C)
        slice_first.append(n_slices)
        row_first.append(len(row_tensor))
        for r0 in range(0, B * R, row_block):
            row_tensor.append(t)
            row_start.append(r0)
        for b in range(B):
            for c0 in range(0, C, col_block):
                col_tensor.append(t)
                col_batch.append(b)
                col_start.append(c0)
                col_slice.append(n_slices + b)
        n_slices += B
    row_first.append(len(row_tensor))
    parts = [rows, cols, slice_first, row_tensor, row_start, row_first, col_tensor, col_batch, col_start, col_slice]
    host = torch.tensor([v for part in parts for v in part], dtype=torch.int64)
    host, flat = _to_device(host, device)
    views, offset = [], 0
    for part in parts:
        views.append(flat[offset:offset + len(part)])
        offset += len(part)
    return _factored_cache.put(key, FactoredTables(views[0], views[1], views[2], n_slices, views[3], views[4],
                                                   views[5], views[6], views[7], views[8], views[9], host))


# The CUDA kernels' work lists over factored tensors: AdafactorLayout in
# csrc/include/fusedopt/adafactor.h reads one int64 array holding these parts
# one after another, in this order.
FACTORED_TASK_PARTS = ("rows", "cols", "slice_first", "task_first", "task_slice", "task_row0", "task_rows", "task_col",
                       "slice_tensor", "slice_batch", "slice_task_first", "colprog_slice", "colprog_col0")
#: rows per task and columns per column program (kAfTaskRows, kAfColBlock there)
TASK_ROWS = 32
COL_BLOCK = 64


@dataclass(frozen=True)
class FactoredTasks:
    """The CUDA backend's programs over tensors [.., R, C]: tasks of at most
    TASK_ROWS rows of one batch slice (each writes its C column sums at
    task_col), and column programs of COL_BLOCK columns of one slice."""
    packed: Tensor       # int64, the FACTORED_TASK_PARTS one after another
    n_tasks: int
    n_slices: int
    n_col_programs: int
    col_total: int       # column sums over all tasks
    host: Tensor

    @property
    def device_buffer(self) -> Tensor:
        return self.packed


_tasks_cache = _TableCache()


def factored_tasks(shapes: list[torch.Size], device: torch.device) -> FactoredTasks:
    key = (tuple(tuple(s) for s in shapes), device)
    cached = _tasks_cache.get(key, device)
    if cached is not None:
        return cached
    parts: dict[str, list[int]] = {name: [] for name in FACTORED_TASK_PARTS}
    col_total = 0
    for t, shape in enumerate(shapes):
        R, C = shape[-2], shape[-1]
        parts["rows"].append(R)
        parts["cols"].append(C)
        parts["slice_first"].append(len(parts["slice_tensor"]))
        parts["task_first"].append(len(parts["task_slice"]))
        for b in range(math.prod(shape[:-2])):
            slice_index = len(parts["slice_tensor"])
            parts["slice_tensor"].append(t)
            parts["slice_batch"].append(b)
            parts["slice_task_first"].append(len(parts["task_slice"]))
            for r0 in range(0, R, TASK_ROWS):
                parts["task_slice"].append(slice_index)
                parts["task_row0"].append(r0)
                parts["task_rows"].append(min(TASK_ROWS, R - r0))
                parts["task_col"].append(col_total)
                col_total += C
            for c0 in range(0, C, COL_BLOCK):
                parts["colprog_slice"].append(slice_index)
                parts["colprog_col0"].append(c0)
    parts["task_first"].append(len(parts["task_slice"]))
    parts["slice_task_first"].append(len(parts["task_slice"]))
    host, packed = _to_device(torch.tensor([v for name in FACTORED_TASK_PARTS for v in parts[name]],
                                           dtype=torch.int64), device)
    return _tasks_cache.put(key, FactoredTasks(packed, len(parts["task_slice"]), len(parts["slice_tensor"]),
                                               len(parts["colprog_slice"]), col_total, host))
