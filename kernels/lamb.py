"""LAMB as Triton launches: the moments pass and the apply pass of
csrc/include/fusedopt/lamb.h (same operations, same order):

    g  = grad * grad_mult, negated when maximize;  g = g + wd * p   (unless adam_w_mode)
    m  = m * beta1 + g * beta3;   v = v * beta2 + g * (1 - beta2) * g
    u  = (m / bc1) / (sqrt(v / bc2) + eps);   u = u + wd * p        (adam_w_mode)
    p  = p - u * ratio[t]

The moments pass writes m and v and one partial of sum(p^2) and of sum(u^2)
per chunk (u from the moments as stored), combined per tensor in chunk order
by kernels/norms.py's combine kernel; the trust ratios are formed on the
device (fusedopt/reference/lamb.py: trust_ratio); the apply pass recomputes u.
With block-scaled FP8 states (kernels/fp8_states.py) m and v (as sqrt) are
decoded with their block scales and re-encoded with fresh ones.
"""
import math

import triton
import triton.language as tl

from ._numeric import (EXACT, F32, F64, bias_correction, div_ieee, f64, f64_bits, launch_sr_key, load_math,
                       load_weight, sqrt_ieee, store_weight, to_math)
from ._table import ROW_STEP, address, chunk_block, moment_addresses, program_chunk, table_args
from .fp8_states import load_any_state, store_any_state
from .norms import _combine_kernel


@triton.jit
def _bias_corrections(table, n_tensors, t, log_beta1, log_beta2, P_KIND: tl.constexpr,
                      BIAS_CORRECTION: tl.constexpr):
    """1 - beta1^step and 1 - beta2^step (or 1 and 1) in the math precision,
    as lamb_scalars() in lamb.h; log_beta*: f64_bits."""
    step = tl.load(address(table, ROW_STEP, n_tensors, t).to(tl.pointer_type(tl.float32)))
    if BIAS_CORRECTION:
        bc1 = bias_correction(step, f64(log_beta1))
        bc2 = bias_correction(step, f64(log_beta2))
    else:
        bc1 = step.to(tl.float64) * 0.0 + 1.0
        bc2 = bc1
    return to_math(bc1, P_KIND), to_math(bc2, P_KIND)


@triton.jit
def _direction(p, m, v, bc1, bc2, eps, weight_decay, ADAM_W: tl.constexpr, KIND: tl.constexpr):
    u = div_ieee(div_ieee(m, bc1, KIND), sqrt_ieee(div_ieee(v, bc2, KIND), KIND) + eps, KIND)
    if ADAM_W:
        u = u + weight_decay * p
    return u


@triton.jit(do_not_specialize=["beta1", "beta3", "beta2", "one_minus_beta2", "log_beta1", "log_beta2", "eps",
                               "weight_decay"])
def _lamb_moments_kernel(
    table, numels, chunk_tensor, chunk_start, n_tensors, n_chunks,
    beta1: tl.int64, beta3: tl.int64, beta2: tl.int64, one_minus_beta2: tl.int64, log_beta1: tl.int64,
    log_beta2: tl.int64, eps: tl.int64, weight_decay: tl.int64, grad_mult_ptr, found_inf_ptr, partials,
    P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr, GRAD_MULT: tl.constexpr,
    ADAM_W: tl.constexpr,
    MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND  # the working copy's: the master's, or the param's
    param, work, grad, exp_avg, exp_avg_sq, m_scales, v_scales = moment_addresses(table, n_tensors, t, MASTER)
    bc1, bc2 = _bias_corrections(table, n_tensors, t, log_beta1, log_beta2, P_KIND, BIAS_CORRECTION)
    beta1 = to_math(f64(beta1), P_KIND)  # the scalars of lamb_scalars() in lamb.h
    beta3 = to_math(f64(beta3), P_KIND)
    beta2 = to_math(f64(beta2), P_KIND)
    one_minus_beta2 = to_math(f64(one_minus_beta2), P_KIND)
    eps = to_math(f64(eps), P_KIND)
    weight_decay = to_math(f64(weight_decay), P_KIND)
    ACC: tl.constexpr = tl.float64 if P_KIND == F64 else tl.float32
    p_acc = tl.zeros([BLOCK], ACC)
    u_acc = tl.zeros([BLOCK], ACC)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)  # masked lanes read 0 and add 0 to the sums
        p = load_weight(param, work, offs, mask, W_KIND, REM)
        g = load_math(grad, offs, mask, P_KIND)
        m = load_any_state(exp_avg, m_scales, offs, mask, False, S_KIND, P_KIND)
        v = load_any_state(exp_avg_sq, v_scales, offs, mask, True, S_KIND, P_KIND)
        if GRAD_MULT:
            g = g * to_math(tl.load(grad_mult_ptr), P_KIND)  # fp64, rounded once
        if MAXIMIZE:
            g = -g
        if not ADAM_W:
            g = g + weight_decay * p
        m = m * beta1 + g * beta3
        v = v * beta2 + g * one_minus_beta2 * g
        m_stored = store_any_state(exp_avg, m_scales, offs, m, mask, False, S_KIND, BLOCK)
        v_stored = store_any_state(exp_avg_sq, v_scales, offs, v, mask, True, S_KIND, BLOCK)
        u = _direction(p, m_stored, v_stored, bc1, bc2, eps, weight_decay, ADAM_W, W_KIND)
        p_acc += p * p
        u_acc += tl.where(mask, u * u, 0.0)  # u of a masked lane is 0/eps = 0, but keep it explicit
    c = tl.program_id(0)
    tl.store(partials + c, tl.sum(p_acc, axis=0).to(tl.float64))
    tl.store(partials + n_chunks + c, tl.sum(u_acc, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["log_beta1", "log_beta2", "eps", "weight_decay"])
def _lamb_apply_kernel(
    table, numels, chunk_tensor, chunk_start, n_tensors,
    log_beta1: tl.int64, log_beta2: tl.int64, eps: tl.int64, weight_decay: tl.int64, ratio_ptr, found_inf_ptr,
    sr_seed,
    P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr, ADAM_W: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, SR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND
    param, work, _, exp_avg, exp_avg_sq, m_scales, v_scales = moment_addresses(table, n_tensors, t, MASTER)
    bc1, bc2 = _bias_corrections(table, n_tensors, t, log_beta1, log_beta2, P_KIND, BIAS_CORRECTION)
    eps = to_math(f64(eps), P_KIND)
    weight_decay = to_math(f64(weight_decay), P_KIND)
    ratio = tl.load(ratio_ptr + t)
    sr_key = launch_sr_key(sr_seed, t, SR)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        p = load_weight(param, work, offs, mask, W_KIND, REM)
        m = load_any_state(exp_avg, m_scales, offs, mask, False, S_KIND, P_KIND)
        v = load_any_state(exp_avg_sq, v_scales, offs, mask, True, S_KIND, P_KIND)
        u = _direction(p, m, v, bc1, bc2, eps, weight_decay, ADAM_W, W_KIND)
        p = p - u * ratio
        store_weight(param, work, offs, p, mask, P_KIND, MASTER, REM, SR, sr_key)


def _log(beta):
    """log(beta) as f64_bits."""
    return f64_bits(math.log(beta) if beta > 0 else -math.inf)


def launch_lamb_moments(tables, p_sums, u_sums, *, p_kind, s_kind, master, remainders, beta1, beta2, eps, weight_decay,
                        bias_correction, adam_w_mode, grad_averaging, maximize, grad_mult, found_inf, block,
                        num_warps):
    """m, v updated; per-tensor sum(p^2) into p_sums and sum(u^2) into u_sums (fp64)."""
    import torch

    partials = torch.empty(2 * tables.n_chunks, dtype=torch.float64, device=p_sums.device)
    dummy = tables.numel
    _lamb_moments_kernel[(tables.n_chunks,)](
        **table_args(tables), n_chunks=tables.n_chunks, beta1=f64_bits(beta1),
        beta3=f64_bits(1.0 - beta1 if grad_averaging else 1.0), beta2=f64_bits(beta2),
        one_minus_beta2=f64_bits(1.0 - beta2), log_beta1=_log(beta1), log_beta2=_log(beta2), eps=f64_bits(eps),
        weight_decay=f64_bits(weight_decay), grad_mult_ptr=dummy if grad_mult is None else grad_mult,
        found_inf_ptr=dummy if found_inf is None else found_inf, partials=partials,
        P_KIND=p_kind, S_KIND=s_kind, MASTER=master, REM=remainders, GRAD_MULT=grad_mult is not None,
        ADAM_W=adam_w_mode,
        MAXIMIZE=maximize, BIAS_CORRECTION=bias_correction, HAS_FOUND_INF=found_inf is not None,
        CHUNK=tables.chunk_size, BLOCK=block, num_warps=num_warps, **EXACT,
    )
    for i, out in enumerate((p_sums, u_sums)):
        _combine_kernel[(tables.n_tensors,)](partials=partials[i * tables.n_chunks:], chunk_first=tables.chunk_first,
                                             out=out, IS_MAX=False, BLOCK=256, num_warps=num_warps, **EXACT)


def launch_lamb_apply(tables, ratio, *, p_kind, s_kind, master, remainders, beta1, beta2, eps, weight_decay, bias_correction,
                      adam_w_mode, found_inf, block, num_warps, sr_seed=None):
    """p = p - u * ratio[t], u recomputed from the stored moments."""
    dummy = tables.numel
    _lamb_apply_kernel[(tables.n_chunks,)](
        **table_args(tables), log_beta1=_log(beta1), log_beta2=_log(beta2), eps=f64_bits(eps),
        weight_decay=f64_bits(weight_decay), ratio_ptr=ratio, found_inf_ptr=dummy if found_inf is None else found_inf,
        sr_seed=0 if sr_seed is None else sr_seed,
        P_KIND=p_kind, S_KIND=s_kind, MASTER=master, REM=remainders, ADAM_W=adam_w_mode,
        BIAS_CORRECTION=bias_correction,
        SR=sr_seed is not None,
        HAS_FOUND_INF=found_inf is not None, CHUNK=tables.chunk_size, BLOCK=block, num_warps=num_warps, **EXACT,
    )
