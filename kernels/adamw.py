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

from ._numeric import (F32, F64, div_ieee, lerp, load_math, load_state, one_minus_exp, sqrt_ieee, sr_tensor_key,
                       store_math, store_param)
from ._table import (ROW_EXP_AVG, ROW_EXP_AVG_SQ, ROW_GRAD, ROW_MASTER, ROW_MAX_EXP_AVG_SQ, ROW_PARAM, ROW_STEP,
                     address, program_chunk)


@triton.jit
def _adamw_kernel(
    table, numels, chunk_tensor, chunk_start, n_tensors,
    lr, lr_ptr, weight_decay, lerp_w, beta2, one_minus_beta2, eps, log_beta1, log_beta2,
    grad_mult_ptr, found_inf_ptr, sr_seed,
    P_KIND: tl.constexpr, S_KIND: tl.constexpr, MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, HAS_GRAD_MULT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SR: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, found_inf_ptr, CHUNK, HAS_FOUND_INF)

    # The update reads and writes the fp32 master with master weights, else
    # the param (W_KIND); the moments are stored in S_KIND.
    W_KIND: tl.constexpr = F32 if MASTER else P_KIND
    param = address(table, ROW_PARAM, n_tensors, t)
    grad = address(table, ROW_GRAD, n_tensors, t)
    exp_avg = address(table, ROW_EXP_AVG, n_tensors, t)
    exp_avg_sq = address(table, ROW_EXP_AVG_SQ, n_tensors, t)
    work = param
    if MASTER:
        work = address(table, ROW_MASTER, n_tensors, t)
    step_addr = address(table, ROW_STEP, n_tensors, t)
    step = tl.load(step_addr.to(tl.pointer_type(tl.float32)))

    # Per-tensor scalars, as adamw_scalars() in adamw.h.
    if LR_IS_PTR:
        lr = tl.load(lr_ptr)
    bc1 = one_minus_exp(step * log_beta1)
    bc2 = one_minus_exp(step * log_beta2)
    step_size = div_ieee(lr, bc1, F32)
    bc2_sqrt = sqrt_ieee(bc2, F32)
    if P_KIND == F64:
        # fp64 params: the decay factor multiplies p itself, so it is formed in
        # fp64 (the bias corrections only scale the update: fp32 is plenty).
        decay = 1.0 - tl.cast(lr, tl.float64) * tl.cast(weight_decay, tl.float64)
        step_size = step_size.to(tl.float64)
        bc2_sqrt = bc2_sqrt.to(tl.float64)
    else:
        decay = 1.0 - lr * weight_decay

    sr_key = 0
    if SR:  # the stochastic-rounding key of this tensor
        sr_key = sr_tensor_key(sr_seed, t)

    for off in range(0, end, BLOCK):
        in_chunk = off + tl.arange(0, BLOCK)
        offs = start + in_chunk
        mask = in_chunk < end
        p = load_math(work, offs, mask, W_KIND)
        g = load_math(grad, offs, mask, P_KIND)
        m = load_state(exp_avg, offs, mask, S_KIND, P_KIND)
        v = load_state(exp_avg_sq, offs, mask, S_KIND, P_KIND)

        if HAS_GRAD_MULT:
            g = g * tl.load(grad_mult_ptr)
        if MAXIMIZE:
            g = -g
        p = p * decay
        # lerp and the second-moment update as one FMA each, as torch rounds them
        m = lerp(m, g, lerp_w)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        vhat = v
        if AMSGRAD:
            max_exp_avg_sq = address(table, ROW_MAX_EXP_AVG_SQ, n_tensors, t)
            vmax = tl.maximum(load_state(max_exp_avg_sq, offs, mask, S_KIND, P_KIND), v)
            store_math(max_exp_avg_sq, offs, vmax, mask, S_KIND)
            vhat = vmax
        denom = div_ieee(sqrt_ieee(vhat, P_KIND), bc2_sqrt, P_KIND) + eps
        p = p - div_ieee(step_size * m, denom, P_KIND)

        if MASTER:
            store_math(work, offs, p, mask, W_KIND)
        store_param(param, offs, p, mask, P_KIND, SR, sr_key)
        store_math(exp_avg, offs, m, mask, S_KIND)
        store_math(exp_avg_sq, offs, v, mask, S_KIND)


def launch_adamw(tables, *, p_kind, s_kind, master, amsgrad, maximize, lr, lr_tensor, beta1, beta2, eps,
                 weight_decay, grad_mult, found_inf, sr_seed, block, num_warps):
    """Launch the update over `tables` (fusedopt.backends._tables.LaunchTables).

    `lr_tensor`, `grad_mult` and `found_inf` are 1-element fp32 tensors on the
    tables' device, or None.
    """
    dummy = tables.numel  # any tensor: stands in for absent pointer arguments
    _adamw_kernel[(tables.n_chunks,)](
        tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start, tables.n_tensors,
        float(lr), dummy if lr_tensor is None else lr_tensor, float(weight_decay),
        1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), math.log(beta1) if beta1 > 0 else -math.inf,
        math.log(beta2) if beta2 > 0 else -math.inf,
        dummy if grad_mult is None else grad_mult, dummy if found_inf is None else found_inf,
        0 if sr_seed is None else sr_seed,
        P_KIND=p_kind, S_KIND=s_kind, MASTER=master, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        LR_IS_PTR=lr_tensor is not None, HAS_GRAD_MULT=grad_mult is not None,
        HAS_FOUND_INF=found_inf is not None, SR=sr_seed is not None, CHUNK=tables.chunk_size, BLOCK=block,
        num_warps=num_warps,
    )
