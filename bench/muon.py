"""Muon step: FusedMuon against torch.optim.Muon on a GPT-2's matrices.

torch.optim.Muon orthogonalises one matrix at a time in bf16 (on a CPU its
bf16 GEMMs are slow); FusedMuon batches the matrices of one shape and, on a
CPU, runs the same bf16 iteration as fp32 GEMMs on bf16-rounded values. The
step is GEMM-bound, not memory-bound: the table's "MB moved" counts only the
elementwise traffic (read p, g, buf; write p, buf: 20 B per fp32 param), so
its GB/s column means little here; time is the number. The Newton-Schulz
share is timed separately (newton_schulz_batched on the same matrices).
"""
from __future__ import annotations

import torch

import fusedopt
from fusedopt.reference.muon import DEFAULT_NS_COEFFICIENTS, newton_schulz_batched

from .cases import kernel_backends, make_params
from .harness import Result, alternate


def matrix_shapes(n_layer: int, d: int) -> list[tuple[int, int]]:
    """A GPT-2's hidden matrices (HF layout), the ones Muon steps."""
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * n_layer


def cases(device: torch.device) -> dict[str, list[tuple[int, int]]]:
    return {"gpt2-124M-matrices": matrix_shapes(12, 768)} if device.type == "cuda" else \
        {"gpt2-d256-L2-matrices": matrix_shapes(2, 256)}


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    for case, shapes in cases(device).items():
        if case_names and case not in case_names:
            continue
        params = make_params(shapes, torch.float32, device)
        n = sum(p.numel() for p in params)
        fns = {"torch.optim.Muon": torch.optim.Muon(params).step}
        for backend in [b for b in kernel_backends(device) if b != "reference"]:
            fns[f"fusedopt {backend} FusedMuon"] = fusedopt.FusedMuon(params, backend=backend).step
            fns[f"fusedopt {backend} FusedMuon ns_dtype=fp32"] = \
                fusedopt.FusedMuon(params, backend=backend, ns_dtype=torch.float32).step
        by_shape: dict[tuple, list] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p.detach())
        stacks = [torch.stack(ps) if ps[0].shape[0] <= ps[0].shape[1] else torch.stack(ps).transpose(-2, -1)
                  for ps in by_shape.values()]
        fns["Newton-Schulz alone (batched, bf16)"] = \
            lambda: [newton_schulz_batched(s, DEFAULT_NS_COEFFICIENTS, 5, 1e-7) for s in stacks]
        # torch's step is ~50x slower on a CPU: fewer rounds keep the run short
        rounds = reps if device.type == "cuda" else max(3, reps // 5)
        log(f"muon {case}: {n / 1e6:.1f}M params in {len(shapes)} matrices, {len(fns)} contenders, {rounds} rounds")
        for name, ts in alternate(fns, device, min(warmup, 1), rounds).items():
            results.append(Result(case, "fp32", name, ts, 0 if name.startswith("Newton") else 20 * n, n))
        baselines[(case, "fp32")] = "torch.optim.Muon"
    return results, baselines


def targets(results, device) -> list[str]:
    """Issue #26: FusedMuon <= 0.1x torch.optim.Muon on CPU (0.5x on a GPU), and the Newton-Schulz share."""
    med = {r.contender: r.median for r in results}
    base, lines = med.get("torch.optim.Muon"), []
    bound = 0.1 if device.type == "cpu" else 0.5
    ns = med.get("Newton-Schulz alone (batched, bf16)")
    for name, t in sorted(med.items()):
        if name.startswith("fusedopt") and base and "fp32" not in name:
            share = f", Newton-Schulz {ns / t:.0%} of it" if ns else ""
            lines.append(f"{'PASS' if t / base <= bound else 'MISS'} {device.type} {name}: {t / base:.3f}x "
                         f"torch.optim.Muon (target <= {bound}){share}")
    return lines
