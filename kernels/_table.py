"""Launch tables seen from a program: which chunk it owns, and the rows of the
Adam-family tables (the same numbers as MomentRow in
csrc/include/fusedopt/multi_tensor.h and MOMENT_ROWS in
fusedopt/backends/_tables.py)."""
import triton
import triton.language as tl

ROW_PARAM = tl.constexpr(0)
ROW_GRAD = tl.constexpr(1)
ROW_EXP_AVG = tl.constexpr(2)
ROW_EXP_AVG_SQ = tl.constexpr(3)
ROW_MAX_EXP_AVG_SQ = tl.constexpr(4)
ROW_MASTER = tl.constexpr(5)
ROW_STEP = tl.constexpr(6)
ROW_FP8 = tl.constexpr(7)
ROW_FP8_SCALE = tl.constexpr(8)
ROW_EXP_AVG_SCALE = tl.constexpr(9)
ROW_EXP_AVG_SQ_SCALE = tl.constexpr(10)
ROW_MAX_EXP_AVG_SQ_SCALE = tl.constexpr(11)


def table_args(tables) -> dict:
    """A launch's tables (fusedopt/backends/_tables.py: LaunchTables) by the
    names every chunk-walking kernel gives them."""
    return dict(table=tables.table, numels=tables.numel, chunk_tensor=tables.chunk_tensor,
                chunk_start=tables.chunk_start, n_tensors=tables.n_tensors)


@triton.jit
def chunk_block(start, off, end, BLOCK: tl.constexpr):
    """One block of a program's chunk: the elements' offsets in the tensor
    (start + off + 0..BLOCK-1) and the mask of those inside the chunk's `end`."""
    in_chunk = off + tl.arange(0, BLOCK)
    return start + in_chunk, in_chunk < end


@triton.jit
def address(table, row, n_tensors, t):
    """The address (int64) of tensor t of list `row`."""
    return tl.load(table + row * n_tensors + t)


@triton.jit
def moment_addresses(table, n_tensors, t, MASTER: tl.constexpr):
    """Tensor t's addresses in an Adam-family table: the param, the working
    copy the update reads (its master's row with master weights: fp32, or
    int16 remainders; else the param's), the grad, the two moments and their
    block scales (FP8 states only; 0 otherwise)."""
    return (address(table, ROW_PARAM, n_tensors, t), address(table, ROW_MASTER if MASTER else ROW_PARAM, n_tensors, t),
            address(table, ROW_GRAD, n_tensors, t), address(table, ROW_EXP_AVG, n_tensors, t),
            address(table, ROW_EXP_AVG_SQ, n_tensors, t), address(table, ROW_EXP_AVG_SCALE, n_tensors, t),
            address(table, ROW_EXP_AVG_SQ_SCALE, n_tensors, t))


@triton.jit
def program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr):
    """(tensor index, first element, element count) of this program's chunk.
    The count is 0 when GradScaler found inf/NaN: the program then touches
    nothing. Chunks never overlap: a program stops at its chunk's end."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    end = tl.minimum(tl.load(numels + t) - start, CHUNK)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, 0)
    return t, start, end
