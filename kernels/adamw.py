"""AdamW as one Triton launch per (device, dtype) bucket.

The launch covers every tensor of the bucket: ``table`` holds the tensors'
addresses (one row per list, fusedopt/backends/_tables.py), and each program
updates one fixed-size chunk of one tensor, so work is balanced by elements.
The per-element operations are those of csrc/include/fusedopt/adamw.h, in the
same order:

    g     = grad * grad_mult, negated when maximize      (1/GradScaler scale x clip coefficient)
    p     = p * (1 - lr * weight_decay)
    m     = lerp(m, g, 1 - beta1)                         (one FMA, as torch rounds it)
    v     = v * beta2 + (1 - beta2) * g * g               (one FMA, as torch rounds it)
    vmax  = max(vmax, v)                                  (amsgrad)
    p     = p - (lr / (1 - beta1^step)) * m / (sqrt(v or vmax) / sqrt(1 - beta2^step) + eps)

Per-tensor scalars (bias corrections from the tensor's own step, lr from a
device tensor when lr is a Tensor) are computed in the kernel, so nothing is
baked into the launch and nothing waits on the host: the step can be captured
in a CUDA graph. GradScaler's found_inf empties every program's loop.
"""
import math

import triton
import triton.language as tl

from ._numeric import (EXACT, F32, F64, FP8_BLOCKED, bias_correction, div_ieee, f64, f64_bits, launch_sr_key, lerp,
                       load_math, load_state, load_weight, lr_and_decay, sqrt_ieee, store_math, store_weight, to_math)
from ._table import (ROW_EXP_AVG, ROW_EXP_AVG_SCALE, ROW_EXP_AVG_SQ, ROW_EXP_AVG_SQ_SCALE, ROW_FP8, ROW_FP8_SCALE,
                     ROW_GRAD, ROW_MASTER, ROW_MAX_EXP_AVG_SQ, ROW_MAX_EXP_AVG_SQ_SCALE, ROW_PARAM, ROW_STEP, address,
                     chunk_block, program_chunk, table_args)
from .fp8 import cast_fp8
from .fp8_states import load_fp8_state, store_fp8_state
from .norms import _combine_kernel


@triton.jit(do_not_specialize=["lr", "weight_decay", "lerp_w", "beta2", "one_minus_beta2", "eps", "log_beta1",
                               "log_beta2"])
def _adamw_kernel(
    table, numels, chunk_tensor, chunk_start, n_tensors,
    lr: tl.int64, lr_ptr, weight_decay: tl.int64, lerp_w: tl.int64, beta2: tl.int64, one_minus_beta2: tl.int64,
    eps: tl.int64, log_beta1: tl.int64, log_beta2: tl.int64,
    grad_mult_ptr, found_inf_ptr, sr_seed, fp8_partials,
    P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, HAS_GRAD_MULT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SR: tl.constexpr,
    FP8: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)

    # The update reads and writes the fp32 master with master weights, else
    # the param (W_KIND); with REM the master row holds int16 remainders of
    # bf16 params, joined with them into the master and split back. The
    # moments are stored in S_KIND.
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND
    param = address(table, ROW_PARAM, n_tensors, t)
    grad = address(table, ROW_GRAD, n_tensors, t)
    exp_avg = address(table, ROW_EXP_AVG, n_tensors, t)
    exp_avg_sq = address(table, ROW_EXP_AVG_SQ, n_tensors, t)
    work = param
    if MASTER:
        work = address(table, ROW_MASTER, n_tensors, t)
    m_scales = exp_avg
    v_scales = exp_avg_sq
    if S_KIND == FP8_BLOCKED:
        m_scales = address(table, ROW_EXP_AVG_SCALE, n_tensors, t)
        v_scales = address(table, ROW_EXP_AVG_SQ_SCALE, n_tensors, t)
    step_addr = address(table, ROW_STEP, n_tensors, t)
    step = tl.load(step_addr.to(tl.pointer_type(tl.float32)))

    # Per-tensor scalars, as adamw_scalars() in adamw.h: in fp64 from the
    # hyperparameters' fp64 bits (f64_bits), each rounded once to the math precision.
    lr64, decay = lr_and_decay(lr, lr_ptr, weight_decay, P_KIND, LR_IS_PTR)
    lerp_w = to_math(f64(lerp_w), P_KIND)
    beta2 = to_math(f64(beta2), P_KIND)
    one_minus_beta2 = to_math(f64(one_minus_beta2), P_KIND)
    eps = to_math(f64(eps), P_KIND)
    step_size = to_math(lr64 / bias_correction(step, f64(log_beta1)), P_KIND)
    bc2_sqrt = to_math(tl.sqrt(bias_correction(step, f64(log_beta2))), P_KIND)  # fp64 sqrt is IEEE on GPUs

    sr_key = launch_sr_key(sr_seed, t, SR)
    # FP8 copies (FP8 = 1 + format): the copy is cast with the tensor's scale; the chunk's absmax is kept
    fp8_scale = 0.0
    fp8_copy = param
    if FP8 != 0:
        fp8_copy = address(table, ROW_FP8, n_tensors, t)
        fp8_scale = tl.load(address(table, ROW_FP8_SCALE, n_tensors, t).to(tl.pointer_type(tl.float32)))
    amax = tl.zeros([BLOCK], tl.float32)
    nans = tl.zeros([BLOCK], tl.int32)

    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        p = load_weight(param, work, offs, mask, W_KIND, REM)
        g = load_math(grad, offs, mask, P_KIND)
        if S_KIND == FP8_BLOCKED:  # block-scaled FP8: decoded to fp32 (v from its stored sqrt)
            m = _widen(load_fp8_state(exp_avg, m_scales, offs, mask, False), P_KIND)
            v = _widen(load_fp8_state(exp_avg_sq, v_scales, offs, mask, True), P_KIND)
        else:
            m = load_state(exp_avg, offs, mask, S_KIND, P_KIND)
            v = load_state(exp_avg_sq, offs, mask, S_KIND, P_KIND)

        if HAS_GRAD_MULT:
            g = g * to_math(tl.load(grad_mult_ptr), P_KIND)  # fp64, rounded once
        if MAXIMIZE:
            g = -g
        p = p * decay
        # lerp and the second-moment update as one FMA each, as torch rounds them
        m = lerp(m, g, lerp_w)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        vhat = v
        if AMSGRAD:
            max_exp_avg_sq = address(table, ROW_MAX_EXP_AVG_SQ, n_tensors, t)
            if S_KIND == FP8_BLOCKED:
                vmax_scales = address(table, ROW_MAX_EXP_AVG_SQ_SCALE, n_tensors, t)
                vmax = tl.maximum(_widen(load_fp8_state(max_exp_avg_sq, vmax_scales, offs, mask, True), P_KIND), v,
                                  propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum (the default drops NaN)
                store_fp8_state(max_exp_avg_sq, vmax_scales, offs, vmax, mask, True, BLOCK)
            else:
                vmax = tl.maximum(load_state(max_exp_avg_sq, offs, mask, S_KIND, P_KIND), v,
                                  propagate_nan=tl.PropagateNan.ALL)
                store_math(max_exp_avg_sq, offs, vmax, mask, S_KIND)
            vhat = vmax
        denom = div_ieee(sqrt_ieee(vhat, P_KIND), bc2_sqrt, P_KIND) + eps
        p = p - div_ieee(step_size * m, denom, P_KIND)

        store_weight(param, work, offs, p, mask, P_KIND, MASTER, REM, SR, sr_key)
        if FP8 != 0:
            w = p.to(tl.float32)
            tl.store(fp8_copy.to(tl.pointer_type(tl.int8)) + offs, cast_fp8(w, fp8_scale, FP8 - 1).to(tl.int8),
                     mask=mask)
            amax = tl.maximum(amax, tl.where(mask, tl.abs(w), 0.0))
            nans += (mask & (w != w)).to(tl.int32)
        if S_KIND == FP8_BLOCKED:
            store_fp8_state(exp_avg, m_scales, offs, m, mask, False, BLOCK)
            store_fp8_state(exp_avg_sq, v_scales, offs, v, mask, True, BLOCK)
        else:
            store_math(exp_avg, offs, m, mask, S_KIND)
            store_math(exp_avg_sq, offs, v, mask, S_KIND)
    if FP8 != 0:
        r = tl.max(amax, axis=0).to(tl.float64)
        tl.store(fp8_partials + tl.program_id(0), tl.where(tl.sum(nans, axis=0) > 0, float("nan"), r))


@triton.jit
def _widen(x, P_KIND: tl.constexpr):
    """fp32 state values in the math precision of P_KIND params."""
    if P_KIND == F64:
        x = x.to(tl.float64)
    return x


def launch_adamw(tables, *, p_kind, s_kind, master, remainders, amsgrad, maximize, lr, lr_tensor, beta1, beta2, eps,
                 weight_decay, grad_mult, found_inf, sr_seed, block, num_warps, fp8_format=None, fp8_amax=None):
    """Launch the update over `tables` (fusedopt.backends._tables.LaunchTables).

    `remainders`: the master row holds int16 remainders of bf16 params. `lr_tensor`, `grad_mult` (fp64) and `found_inf` are 1-element tensors on
    the tables' device, or None; the other scalars are Python numbers. With `fp8_format` (0 e4m3fn, 1 e5m2) the tables'
    fp8 rows are written and each new weight's absmax goes to `fp8_amax` (fp64).
    """
    import torch

    fp8_partials = tables.numel if fp8_format is None else \
        torch.empty(tables.n_chunks, dtype=torch.float64, device=fp8_amax.device)
    dummy = tables.numel  # any tensor: stands in for absent pointer arguments
    _adamw_kernel[(tables.n_chunks,)](
        **table_args(tables), lr=f64_bits(0.0 if lr_tensor is not None else lr),
        lr_ptr=dummy if lr_tensor is None else lr_tensor, weight_decay=f64_bits(weight_decay),
        lerp_w=f64_bits(1.0 - beta1), beta2=f64_bits(beta2), one_minus_beta2=f64_bits(1.0 - beta2), eps=f64_bits(eps),
        log_beta1=f64_bits(math.log(beta1) if beta1 > 0 else -math.inf),
        log_beta2=f64_bits(math.log(beta2) if beta2 > 0 else -math.inf),
        grad_mult_ptr=dummy if grad_mult is None else grad_mult,
        found_inf_ptr=dummy if found_inf is None else found_inf,
        sr_seed=0 if sr_seed is None else sr_seed, fp8_partials=fp8_partials,
        P_KIND=p_kind, S_KIND=s_kind, MASTER=master, REM=remainders, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        LR_IS_PTR=lr_tensor is not None, HAS_GRAD_MULT=grad_mult is not None,
        HAS_FOUND_INF=found_inf is not None, SR=sr_seed is not None,
        FP8=0 if fp8_format is None else 1 + fp8_format, CHUNK=tables.chunk_size, BLOCK=block,
        num_warps=num_warps, **EXACT,
    )
    if fp8_format is not None:
        _combine_kernel[(tables.n_tensors,)](partials=fp8_partials, chunk_first=tables.chunk_first, out=fp8_amax,
                                             IS_MAX=True, BLOCK=256, num_warps=num_warps, **EXACT)
