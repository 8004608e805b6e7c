"""Adafactor as Triton launches (csrc/include/fusedopt/adafactor.h has the
per-element steps in the same order; fusedopt/reference/adafactor.py is the
spec). Table rows: ADAFACTOR_ROWS in fusedopt/backends/_adafactor_tables.py.

0-d / 1-d tensors, by chunks:
  _vector_stats    variance = lerp(variance, g*g, 1 - beta2_t); partial sums of p*p and u*u
  _apply           p = p * decay + scale * u            (or through the first moment, which may be
                                                        block-scaled FP8: kernels/fp8_states.py)
Tensors of 2+ dims (row-major [.., R, C], leading dims batched):
  _row_stats       one program per block of rows: row sums of g*g (final: row_var updated), sum(p*p)
  _col_stats       one program per (batch slice, block of columns): col_var updated, mean of row_var
  _factored_unorm  by chunks: partial sums of u*u, u = g * rsqrt(clamp(row * col / rmean, eps1^2))
  _apply           as above
Partial sums are combined per tensor in order by kernels/norms.py's
_combine_kernel; the scale per tensor comes from reference.adafactor.scales.

Local shards of DTensor params (fusedopt/dtensor.py) go in phases, with the
statistics summed over the shards between them (the Python side's
collectives): _row_stats and _col_stats with RAW write the row and column
sums of g*g instead of updating row_var and col_var; _sharded_factors then
updates them from the whole rows' and columns' sums and sums row_var per
slice (for the row mean); _factored_unorm and _apply as above.
"""
import triton
import triton.language as tl

from ._numeric import (F32, F64, as_stored, div_ieee, f64, launch_sr_key, lerp, load_math, load_state, load_weight,
                       lr_and_decay, sqrt_ieee, store_math, store_weight, to_math)
from ._table import address, chunk_block, program_chunk
from .fp8_states import load_any_state, store_any_state

ROW_PARAM = tl.constexpr(0)
ROW_GRAD = tl.constexpr(1)
ROW_EXP_AVG = tl.constexpr(2)
ROW_VARIANCE = tl.constexpr(3)
ROW_ROW_VAR = tl.constexpr(4)
ROW_COL_VAR = tl.constexpr(5)
ROW_MASTER = tl.constexpr(6)
ROW_STEP = tl.constexpr(7)
ROW_EXP_AVG_SCALE = tl.constexpr(8)


@triton.jit
def _lerp_weight(table, n_tensors, t, beta2_decay, ACC: tl.constexpr):
    """1 - beta2_t = step^beta2_decay, from the tensor's own step (>= 1), in
    the math dtype ACC. Formed in fp64 (beta2_decay: f64_bits): in fp32,
    tl.exp and tl.log are the GPU's approximations (ex2/lg2.approx), unlike
    the interpreter's numpy."""
    step = tl.load(address(table, ROW_STEP, n_tensors, t).to(tl.pointer_type(tl.float32))).to(tl.float64)
    return tl.exp(f64(beta2_decay) * tl.log(step)).to(ACC)


@triton.jit
def _eps1_scalars(eps1, P_KIND: tl.constexpr):
    """eps1, eps1^2 and 1 / eps1 in the math precision, each formed in fp64
    from eps1's f64_bits and rounded once (csrc/cpu/adafactor.cpp)."""
    e = f64(eps1)
    return to_math(e, P_KIND), to_math(e * e, P_KIND), to_math(1.0 / e, P_KIND)


@triton.jit
def _grad(grad, offs, mask, grad_mult_ptr, P_KIND: tl.constexpr, GRAD_MULT: tl.constexpr, MAXIMIZE: tl.constexpr):
    g = load_math(grad, offs, mask, P_KIND)
    if GRAD_MULT:
        g = g * to_math(tl.load(grad_mult_ptr), P_KIND)  # fp64, rounded once
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _u(g, var_est, eps1_sq, KIND: tl.constexpr):
    """rsqrt(clamp(var_est, min=eps1^2)) * g, with clamp keeping NaN as torch's does."""
    return div_ieee(1.0, sqrt_ieee(tl.where(var_est < eps1_sq, eps1_sq, var_est), KIND), KIND) * g


@triton.jit(do_not_specialize=["beta2_decay", "eps1"])
def _vector_stats(table, numels, chunk_tensor, chunk_start, n_tensors, n_chunks, beta2_decay: tl.int64, eps1: tl.int64,
                  grad_mult_ptr, found_inf_ptr, partials,
                  P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
                  GRAD_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND  # the working copy: the master, or the param
    ACC: tl.constexpr = tl.float64 if P_KIND == F64 else tl.float32
    _, eps1_sq, _ = _eps1_scalars(eps1, P_KIND)
    param = address(table, ROW_PARAM, n_tensors, t)
    work = address(table, ROW_MASTER if MASTER else ROW_PARAM, n_tensors, t)
    grad = address(table, ROW_GRAD, n_tensors, t)
    variance = address(table, ROW_VARIANCE, n_tensors, t)
    w = _lerp_weight(table, n_tensors, t, beta2_decay, ACC)
    p_acc = tl.zeros([BLOCK], ACC)
    u_acc = tl.zeros([BLOCK], ACC)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        g = _grad(grad, offs, mask, grad_mult_ptr, P_KIND, GRAD_MULT, MAXIMIZE)
        v = lerp(load_state(variance, offs, mask, S_KIND, P_KIND), g * g, w)
        store_math(variance, offs, v, mask, S_KIND)
        u = _u(g, as_stored(v, S_KIND), eps1_sq, W_KIND)
        p = load_weight(param, work, offs, mask, W_KIND, REM)
        p_acc += p * p
        u_acc += tl.where(mask, u * u, 0.0)
    c = tl.program_id(0)
    tl.store(partials + c, tl.sum(p_acc, axis=0).to(tl.float64))
    tl.store(partials + n_chunks + c, tl.sum(u_acc, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["beta2_decay"])
def _row_stats(table, n_tensors, prog_tensor, prog_row0, rows, cols, numels, beta2_decay: tl.int64, grad_mult_ptr,
               found_inf_ptr, p_partials, row_out, row_base,
               P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
               GRAD_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, RB: tl.constexpr,
               CB: tl.constexpr, RAW: tl.constexpr):
    """RAW: the rows' sums of g*g (fp64) at row_out + row_base[t], row_var left as it is."""
    pid = tl.program_id(0)
    t = tl.load(prog_tensor + pid)
    row0 = tl.load(prog_row0 + pid)
    C = tl.load(cols + t)
    n_rows = tl.load(numels + t) // C  # batch slices' rows, one after another
    if HAS_FOUND_INF:
        n_rows = tl.where(tl.load(found_inf_ptr) == 0, n_rows, 0)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND  # the working copy: the master, or the param
    ACC: tl.constexpr = tl.float64 if P_KIND == F64 else tl.float32
    param = address(table, ROW_PARAM, n_tensors, t)
    work = address(table, ROW_MASTER if MASTER else ROW_PARAM, n_tensors, t)
    grad = address(table, ROW_GRAD, n_tensors, t)
    row_var = address(table, ROW_ROW_VAR, n_tensors, t)
    rr = row0 + tl.arange(0, RB)
    rmask = rr < n_rows
    row_acc = tl.zeros([RB], ACC)
    p_acc = tl.zeros([RB], ACC)
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        offs = rr[:, None] * C + cc[None, :]
        mask = rmask[:, None] & (cc < C)[None, :]
        g = _grad(grad, offs, mask, grad_mult_ptr, P_KIND, GRAD_MULT, MAXIMIZE)
        row_acc += tl.sum(g * g, axis=1)
        p = load_weight(param, work, offs, mask, W_KIND, REM)
        p_acc += tl.sum(p * p, axis=1)
    if RAW:
        tl.store(row_out + tl.load(row_base + t) + rr, row_acc.to(tl.float64), mask=rmask)
    else:
        w = _lerp_weight(table, n_tensors, t, beta2_decay, ACC)
        rv = lerp(load_state(row_var, rr, rmask, S_KIND, P_KIND), div_ieee(row_acc, C.to(ACC), P_KIND), w)
        store_math(row_var, rr, rv, rmask, S_KIND)
    tl.store(p_partials + pid, tl.sum(p_acc, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["beta2_decay", "eps1"])
def _col_stats(table, n_tensors, prog_tensor, prog_batch, prog_col0, prog_slice, rows, cols, beta2_decay: tl.int64,
               eps1: tl.int64,
               grad_mult_ptr, found_inf_ptr, rmean, col_out, col_base,
               P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
               GRAD_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, RB: tl.constexpr,
               CB: tl.constexpr, RAW: tl.constexpr):
    """RAW: the columns' sums of g*g (fp64) at col_out + col_base[t] + b * C, col_var and rmean left."""
    pid = tl.program_id(0)
    t = tl.load(prog_tensor + pid)
    b = tl.load(prog_batch + pid)
    c0 = tl.load(prog_col0 + pid)
    R = tl.load(rows + t)
    C = tl.load(cols + t)
    if HAS_FOUND_INF:
        R = tl.where(tl.load(found_inf_ptr) == 0, R, 0)
    ACC: tl.constexpr = tl.float64 if P_KIND == F64 else tl.float32
    grad = address(table, ROW_GRAD, n_tensors, t)
    row_var = address(table, ROW_ROW_VAR, n_tensors, t)
    col_var = address(table, ROW_COL_VAR, n_tensors, t)
    cc = c0 + tl.arange(0, CB)
    cmask = cc < C
    col_acc = tl.zeros([CB], ACC)
    rv_acc = tl.zeros([RB], ACC)
    for r0 in range(0, R, RB):
        rr = r0 + tl.arange(0, RB)
        offs = (b * R + rr)[:, None] * C + cc[None, :]
        g = _grad(grad, offs, (rr < R)[:, None] & cmask[None, :], grad_mult_ptr, P_KIND, GRAD_MULT, MAXIMIZE)
        col_acc += tl.sum(g * g, axis=0)
        if not RAW:
            rv_acc += load_state(row_var, b * R + rr, rr < R, S_KIND, P_KIND)  # final: _row_stats ran before
    if RAW:
        tl.store(col_out + tl.load(col_base + t) + b * C + cc, col_acc.to(tl.float64), mask=cmask)
        return
    w = _lerp_weight(table, n_tensors, t, beta2_decay, ACC)
    live = cc < tl.where(R > 0, C, 0)  # nothing when GradScaler found inf/NaN
    cv = lerp(load_state(col_var, b * C + cc, live, S_KIND, P_KIND), div_ieee(col_acc, R.to(ACC), P_KIND), w)
    store_math(col_var, b * C + cc, cv, live, S_KIND)
    mean = div_ieee(tl.sum(rv_acc, axis=0), R.to(ACC), P_KIND)
    eps1, _, _ = _eps1_scalars(eps1, P_KIND)
    mean = tl.where(mean < eps1, eps1, mean)
    slot = tl.load(prog_slice + pid) + tl.arange(0, 1)
    writer = tl.where((c0 == 0) & (R > 0), 1, 0)  # one program per slice writes
    tl.store(rmean + slot, tl.zeros([1], ACC) + mean, mask=tl.arange(0, 1) < writer)


@triton.jit(do_not_specialize=["beta2_decay"])
def _sharded_factors(table, n_tensors, slice_tensor, slice_batch, rows, cols, full_rows, full_cols, row_sums,
                     row_base, col_sums, col_base, beta2_decay: tl.int64, found_inf_ptr, rv_sums,
                     P_KIND: tl.constexpr, S_KIND: tl.constexpr, HAS_FOUND_INF: tl.constexpr, RB: tl.constexpr,
                     CB: tl.constexpr):
    """One program per batch slice: row_var and col_var lerped to the whole
    rows' and columns' means (sums over full_cols / full_rows elements), and
    the sum of row_var over the slice's local rows, as stored (fp64)."""
    i = tl.program_id(0)
    t = tl.load(slice_tensor + i)
    b = tl.load(slice_batch + i)
    R = tl.load(rows + t)
    C = tl.load(cols + t)
    if HAS_FOUND_INF:  # GradScaler found inf/NaN: nothing moves, the sum is 0
        live = tl.load(found_inf_ptr) == 0
        R = tl.where(live, R, 0)
        C = tl.where(live, C, 0)
    ACC: tl.constexpr = tl.float64 if P_KIND == F64 else tl.float32
    row_var = address(table, ROW_ROW_VAR, n_tensors, t)
    col_var = address(table, ROW_COL_VAR, n_tensors, t)
    w = _lerp_weight(table, n_tensors, t, beta2_decay, ACC)
    full_c = tl.load(full_cols + t).to(tl.float64)
    full_r = tl.load(full_rows + t).to(tl.float64)
    rows0 = tl.load(row_base + t) + b * R
    acc = tl.zeros([RB], tl.float64)
    for r0 in range(0, R, RB):
        rr = r0 + tl.arange(0, RB)
        mask = rr < R
        mean = div_ieee(tl.load(row_sums + rows0 + rr, mask=mask, other=0.0), full_c, F64).to(ACC)
        rv = lerp(load_state(row_var, b * R + rr, mask, S_KIND, P_KIND), mean, w)
        store_math(row_var, b * R + rr, rv, mask, S_KIND)
        acc += tl.where(mask, as_stored(rv, S_KIND).to(tl.float64), 0.0)
    cols0 = tl.load(col_base + t) + b * C
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        mask = cc < C
        mean = div_ieee(tl.load(col_sums + cols0 + cc, mask=mask, other=0.0), full_r, F64).to(ACC)
        cv = lerp(load_state(col_var, b * C + cc, mask, S_KIND, P_KIND), mean, w)
        store_math(col_var, b * C + cc, cv, mask, S_KIND)
    tl.store(rv_sums + i, tl.sum(acc, axis=0))


@triton.jit
def _factored_u(grad, row_var, col_var, rmean, slice0, offs, mask, R, C, eps1_sq, inv_eps1, grad_mult_ptr,
                P_KIND: tl.constexpr, S_KIND: tl.constexpr, W_KIND: tl.constexpr, GRAD_MULT: tl.constexpr,
                MAXIMIZE: tl.constexpr):
    """u = g * (rowq * col < eps1^2 ? 1 / eps1 : rsqrt(rowq) * rsqrt(col)), rowq = row / rmean:
    csrc/cpu/adafactor.cpp's separable form of torch's rsqrt(clamp(row * col / rmean, eps1^2)) * g."""
    rc = R * C
    b = offs // rc
    r = (offs // C) % R
    c = offs % C
    row = load_state(row_var, b * R + r, mask, S_KIND, P_KIND)
    rowq = div_ieee(row, tl.load(rmean + slice0 + b, mask=mask, other=1.0), W_KIND)
    col = load_state(col_var, b * C + c, mask, S_KIND, P_KIND)
    factor = div_ieee(1.0, sqrt_ieee(rowq, W_KIND), W_KIND) * div_ieee(1.0, sqrt_ieee(col, W_KIND), W_KIND)
    factor = tl.where(rowq * col < eps1_sq, inv_eps1, factor)
    return _grad(grad, offs, mask, grad_mult_ptr, P_KIND, GRAD_MULT, MAXIMIZE) * factor


@triton.jit(do_not_specialize=["eps1"])
def _factored_unorm(table, numels, chunk_tensor, chunk_start, n_tensors, rows, cols, slice_first, rmean,
                    eps1: tl.int64,
                    grad_mult_ptr, found_inf_ptr, partials,
                    P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
                    GRAD_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND  # the working copy: the master, or the param
    ACC: tl.constexpr = tl.float64 if P_KIND == F64 else tl.float32
    grad = address(table, ROW_GRAD, n_tensors, t)
    row_var = address(table, ROW_ROW_VAR, n_tensors, t)
    col_var = address(table, ROW_COL_VAR, n_tensors, t)
    R = tl.load(rows + t)
    C = tl.load(cols + t)
    slice0 = tl.load(slice_first + t)
    _, eps1_sq, inv_eps1 = _eps1_scalars(eps1, P_KIND)
    u_acc = tl.zeros([BLOCK], ACC)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        u = _factored_u(grad, row_var, col_var, rmean, slice0, offs, mask, R, C, eps1_sq, inv_eps1,
                        grad_mult_ptr, P_KIND, S_KIND, W_KIND, GRAD_MULT, MAXIMIZE)
        u_acc += tl.where(mask, u * u, 0.0)
    tl.store(partials + tl.program_id(0), tl.sum(u_acc, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["eps1", "lr", "weight_decay", "one_minus_beta1"])
def _apply(table, numels, chunk_tensor, chunk_start, n_tensors, rows, cols, slice_first, rmean, eps1: tl.int64,
           lr: tl.int64, lr_ptr, weight_decay: tl.int64, one_minus_beta1: tl.int64, scale_ptr, grad_mult_ptr,
           found_inf_ptr, sr_seed,
           SR: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
           GRAD_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, FACTORED: tl.constexpr, BETA1: tl.constexpr,
           M_KIND: tl.constexpr, LR_IS_PTR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr,
           BLOCK: tl.constexpr):
    """The update; exp_avg (BETA1) stored as M_KIND: S_KIND, or FP8_BLOCKED
    (then BLOCK is a multiple of 256 and chunks start at multiples of BLOCK)."""
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND  # the working copy: the master, or the param
    param = address(table, ROW_PARAM, n_tensors, t)
    work = address(table, ROW_MASTER if MASTER else ROW_PARAM, n_tensors, t)
    grad = address(table, ROW_GRAD, n_tensors, t)
    exp_avg = address(table, ROW_EXP_AVG, n_tensors, t)
    exp_avg_scale = address(table, ROW_EXP_AVG_SCALE, n_tensors, t)
    variance = address(table, ROW_VARIANCE, n_tensors, t)
    row_var = address(table, ROW_ROW_VAR, n_tensors, t)
    col_var = address(table, ROW_COL_VAR, n_tensors, t)
    # the scalars in fp64 (f64_bits), rounded once, as csrc/cpu/adafactor.cpp
    _, decay = lr_and_decay(lr, lr_ptr, weight_decay, P_KIND, LR_IS_PTR)
    one_minus_beta1 = to_math(f64(one_minus_beta1), P_KIND)
    _, eps1_sq, inv_eps1 = _eps1_scalars(eps1, P_KIND)
    scale = tl.load(scale_ptr + t)
    R = tl.load(rows + t)
    C = tl.load(cols + t)
    slice0 = tl.load(slice_first + t)
    sr_key = launch_sr_key(sr_seed, t, SR)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        if FACTORED:
            u = _factored_u(grad, row_var, col_var, rmean, slice0, offs, mask, R, C, eps1_sq, inv_eps1, grad_mult_ptr,
                            P_KIND, S_KIND, W_KIND, GRAD_MULT, MAXIMIZE)
        else:
            u = _u(_grad(grad, offs, mask, grad_mult_ptr, P_KIND, GRAD_MULT, MAXIMIZE),
                   load_state(variance, offs, mask, S_KIND, P_KIND), eps1_sq, W_KIND)
        p = load_weight(param, work, offs, mask, W_KIND, REM) * decay
        if BETA1:
            # the step itself, alpha * u / denom = u * -scale, averaged (tensor2tensor, HF)
            m = lerp(load_any_state(exp_avg, exp_avg_scale, offs, mask, False, M_KIND, P_KIND),
                     u * (-scale).to(u.dtype), one_minus_beta1)
            m = store_any_state(exp_avg, exp_avg_scale, offs, m, mask, False, M_KIND, BLOCK)  # as stored
            p = p - m
        else:
            p = tl.fma(u, scale, p)
        store_weight(param, work, offs, p, mask, P_KIND, MASTER, REM, SR, sr_key)
