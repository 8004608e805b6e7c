"""Muon's Newton-Schulz orthogonalisation, the spec FusedMuon's paths are tested against.

``newton_schulz`` is torch.optim.Muon's iteration, op for op (bf16 throughout:
the reference backend is bit for bit torch.optim.Muon, except that it never
writes into its input). ``newton_schulz_batched``
runs the same iteration on a stack of same-shape matrices with batched GEMMs:
in bf16 where the device has bf16 GEMMs (GPUs), and on CPUs as an emulation
with fp32 GEMMs whose inputs are bf16 values and whose results are rounded to
bf16 where torch's bf16 op rounds (each GEMM and each elementwise op): the same
arithmetic up to the GEMMs' accumulation order, at fp32 GEMM speed (a CPU's
bf16 GEMMs are ~50x slower). With ``dtype=torch.float32`` nothing is rounded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(grad: Tensor, ns_coefficients, ns_steps: int, eps: float) -> Tensor:
    """torch.optim.Muon's orthogonalisation of one matrix (bf16 result)."""
    a, b, c = ns_coefficients
    # a copy even when grad is bf16 already: torch's grad.bfloat16() is then grad itself, and its div_
    # below normalises a bf16 momentum buffer in place (nesterov=False); the spec leaves the buffer alone
    x = grad.to(torch.bfloat16, copy=True)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


def _rounder(dtype: torch.dtype, native: bool):
    """x -> x as `dtype` would store it (identity when the math already runs in it)."""
    if native or dtype == torch.float32:
        return lambda t: t
    return lambda t: t.to(dtype).float()


def newton_schulz_batched(x: Tensor, ns_coefficients, ns_steps: int, eps: float,
                          dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Orthogonalise each matrix of x [B, m, n] (m <= n: callers transpose tall
    ones); returns [B, m, n] in `dtype` (bf16: torch's rounding, see above)."""
    a, b, c = ns_coefficients
    native = x.device.type != "cpu" and dtype != torch.float32  # bf16 GEMMs with fp32 accumulation
    r = _rounder(dtype, native)
    work = dtype if native else torch.float32
    x = r(x.to(work))
    # per matrix: x / max(||x||_F, eps), the norm and the quotient each rounded as torch's bf16 ops round
    norm = r(torch.linalg.vector_norm(x.float(), dim=(-2, -1), keepdim=True).to(work))
    x = r(x / r(norm.clamp(min=eps)))
    for _ in range(ns_steps):
        gram = r(torch.bmm(x, x.transpose(-2, -1)))
        gram_update = r(torch.baddbmm(gram, gram, gram, beta=b, alpha=c))
        x = r(torch.baddbmm(x, gram_update, x, beta=a))
    return x.to(dtype)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's learning-rate adjustment for an rows x cols matrix."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio
