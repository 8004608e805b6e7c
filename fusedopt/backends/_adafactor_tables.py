"""Launch metadata of Adafactor's GPU kernels (triton and cuda): its table
rows, and the layouts of the factored row / column passes, cached as the
other tables are (_tables._TableCache)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tables import _TableCache, _to_device

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
