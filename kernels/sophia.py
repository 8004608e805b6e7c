"""SophiaG as Triton launches: the step and the Hessian update, each one
launch per bucket over the Adam-family tables (the Hessian estimate in the
second-moment row). Same operations, same order as
csrc/include/fusedopt/sophia.h:

    g = grad * grad_mult, negated when maximize;  p = p * (1 - lr * wd)
    m = m * beta1 + (1 - beta1) * g                (one FMA)
    ratio = min(|m| / (h * (rho * bs) + 1e-15), 1)
    p = p + (-lr * sign(m)) * ratio                (one FMA)
    update_hessian: h = h * beta2 + (1 - beta2) * grad * grad   (one FMA)

With block-scaled FP8 states (S_KIND == FP8_BLOCKED, kernels/fp8_states.py)
exp_avg and the hessian (as sqrt) are decoded with their block scales and
re-encoded with fresh ones.
"""
import triton
import triton.language as tl

from ._numeric import (EXACT, F32, div_ieee, f64, f64_bits, launch_sr_key, load_math, load_weight, lr_and_decay,
                       store_weight, to_math)
from ._table import (ROW_EXP_AVG_SQ, ROW_EXP_AVG_SQ_SCALE, ROW_GRAD, address, chunk_block, moment_addresses,
                     program_chunk, table_args)
from .fp8_states import load_any_state as _load
from .fp8_states import store_any_state as _store


@triton.jit(do_not_specialize=["lr", "beta1", "one_minus_beta1", "rho_bs", "weight_decay"])
def _step_kernel(table, numels, chunk_tensor, chunk_start, n_tensors, lr: tl.int64, lr_ptr, beta1: tl.int64,
                 one_minus_beta1: tl.int64, rho_bs: tl.int64, weight_decay: tl.int64, grad_mult_ptr, found_inf_ptr,
                 sr_seed,
                 P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
                 GRAD_MULT: tl.constexpr,
                 MAXIMIZE: tl.constexpr, SR: tl.constexpr, LR_IS_PTR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND  # the working copy's: the master's, or the param's
    # (the hessian in the second moment's row)
    param, work, grad, exp_avg, hessian, m_scales, h_scales = moment_addresses(table, n_tensors, t, MASTER)
    # the scalars of sophia_scalars() in sophia.h: fp64 (f64_bits), rounded once
    lr64, decay = lr_and_decay(lr, lr_ptr, weight_decay, P_KIND, LR_IS_PTR)
    neg_lr = to_math(-lr64, P_KIND)
    beta1 = to_math(f64(beta1), P_KIND)
    one_minus_beta1 = to_math(f64(one_minus_beta1), P_KIND)
    rho_bs = to_math(f64(rho_bs), P_KIND)
    sr_key = launch_sr_key(sr_seed, t, SR)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        g = load_math(grad, offs, mask, P_KIND)
        if GRAD_MULT:
            g = g * to_math(tl.load(grad_mult_ptr), P_KIND)  # fp64, rounded once
        if MAXIMIZE:
            g = -g
        p = load_weight(param, work, offs, mask, W_KIND, REM) * decay
        m = tl.fma(g, one_minus_beta1, _load(exp_avg, m_scales, offs, mask, False, S_KIND, P_KIND) * beta1)
        ratio = div_ieee(tl.abs(m), _load(hessian, h_scales, offs, mask, True, S_KIND, P_KIND) * rho_bs + 1e-15,
                         W_KIND)
        ratio = tl.where(ratio > 1.0, 1.0, ratio)  # NaN stays NaN, as torch.clamp
        sign_m = (m > 0).to(m.dtype) - (m < 0).to(m.dtype)
        p = tl.fma(neg_lr * sign_m, ratio, p)
        _store(exp_avg, m_scales, offs, m, mask, False, S_KIND, BLOCK)
        store_weight(param, work, offs, p, mask, P_KIND, MASTER, REM, SR, sr_key)


@triton.jit(do_not_specialize=["beta2", "one_minus_beta2"])
def _hessian_kernel(table, numels, chunk_tensor, chunk_start, n_tensors, beta2: tl.int64, one_minus_beta2: tl.int64,
                    P_KIND: tl.constexpr, S_KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, numels, CHUNK, False)
    beta2 = to_math(f64(beta2), P_KIND)
    one_minus_beta2 = to_math(f64(one_minus_beta2), P_KIND)
    grad = address(table, ROW_GRAD, n_tensors, t)
    hessian = address(table, ROW_EXP_AVG_SQ, n_tensors, t)
    h_scales = address(table, ROW_EXP_AVG_SQ_SCALE, n_tensors, t)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        g = load_math(grad, offs, mask, P_KIND)
        h = tl.fma(one_minus_beta2 * g, g, _load(hessian, h_scales, offs, mask, True, S_KIND, P_KIND) * beta2)
        _store(hessian, h_scales, offs, h, mask, True, S_KIND, BLOCK)


def launch_sophia(tables, *, p_kind, s_kind, master, remainders, lr, lr_tensor, beta1, rho_bs, weight_decay, maximize,
                  grad_mult, found_inf, block, num_warps, sr_seed=None):
    dummy = tables.numel
    _step_kernel[(tables.n_chunks,)](
        **table_args(tables), lr=f64_bits(0.0 if lr_tensor is not None else lr),
        lr_ptr=dummy if lr_tensor is None else lr_tensor, beta1=f64_bits(beta1), one_minus_beta1=f64_bits(1.0 - beta1),
        rho_bs=f64_bits(rho_bs), weight_decay=f64_bits(weight_decay),
        grad_mult_ptr=dummy if grad_mult is None else grad_mult,
        found_inf_ptr=dummy if found_inf is None else found_inf,
        sr_seed=0 if sr_seed is None else sr_seed,
        P_KIND=p_kind, S_KIND=s_kind, MASTER=master, REM=remainders, GRAD_MULT=grad_mult is not None,
        MAXIMIZE=maximize, SR=sr_seed is not None,
        LR_IS_PTR=lr_tensor is not None, HAS_FOUND_INF=found_inf is not None, CHUNK=tables.chunk_size, BLOCK=block,
        num_warps=num_warps, **EXACT)


def launch_hessian(tables, *, p_kind, s_kind, beta2, block, num_warps):
    _hessian_kernel[(tables.n_chunks,)](
        **table_args(tables), beta2=f64_bits(beta2), one_minus_beta2=f64_bits(1.0 - beta2), P_KIND=p_kind,
        S_KIND=s_kind, CHUNK=tables.chunk_size, BLOCK=block, num_warps=num_warps, **EXACT)
