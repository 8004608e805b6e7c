"""Rows of the Adam-family tensor tables: the same numbers as MomentRow in
csrc/include/fusedopt/multi_tensor.h and MOMENT_ROWS in
fusedopt/backends/_tables.py."""
import triton
import triton.language as tl

ROW_PARAM = tl.constexpr(0)
ROW_GRAD = tl.constexpr(1)
ROW_EXP_AVG = tl.constexpr(2)
ROW_EXP_AVG_SQ = tl.constexpr(3)
ROW_MAX_EXP_AVG_SQ = tl.constexpr(4)
ROW_MASTER = tl.constexpr(5)
ROW_STEP = tl.constexpr(6)


@triton.jit
def address(table, row, n_tensors, t):
    """The address (int64) of tensor t of list `row`."""
    return tl.load(table + row * n_tensors + t)
