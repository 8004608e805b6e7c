"""AdamW step: fusedopt's backends against torch.optim.AdamW.

Modes:
  fp32          fp32 params. Contenders: torch AdamW for-loop, foreach and
                fused; every fusedopt backend that runs on the device.
  bf16+master   bf16 params with fp32 master weights. The torch equivalent is
                what a user writes without fusedopt: copy the bf16 grads into
                fp32 master grads, torch's fused AdamW on the fp32 masters,
                copy the masters back into the bf16 params. fusedopt does all
                of it in one pass (master_weights=True).

Bytes per param that an AdamW step must move (what GB/s counts): fp32 reads
p, g, m, v and writes p, m, v: 28 B. bf16+master reads master (4), grad (2),
m, v and writes master, m, v and the bf16 param (2): 28 B as well (the torch
equivalent moves 40: +6 for the grad copy, +6 for the copy back; it is still
counted at 28, the work done). torch's fused AdamW straight on bf16 params,
with bf16 states, is another algorithm and is counted at its own 14 B.

Params and grads are shared by the contenders of a case (each has its own
optimizer state); grads stay fixed, so every step does the same work.
"""
from __future__ import annotations

import torch

import fusedopt

from .cases import kernel_backends, make_params, selected
from .harness import STREAM, Result, alternate, stream_op

BYTES_PER_PARAM = 28
#: contenders that run a different algorithm move a different number of bytes
BYTES_OVERRIDE = {"torch fused on bf16 (no master)": 14}  # bf16 p, g, m, v: read 8, write 6


def contenders(mode: str, params, device):
    """{name: step function} for one mode, and the baseline's name."""
    fns = {}
    if mode == "fp32":
        for name, kw in [("torch for-loop", {"foreach": False}), ("torch foreach", {"foreach": True}),
                         ("torch fused", {"fused": True})]:
            fns[name] = torch.optim.AdamW(params, lr=1e-3, **kw).step
        for backend in kernel_backends(device):
            fns[f"fusedopt {backend}"] = fusedopt.FusedAdamW(params, lr=1e-3, backend=backend).step
        return fns, "torch fused"
    # bf16 + fp32 master weights
    masters = [p.detach().float().requires_grad_() for p in params]
    for m in masters:
        m.grad = torch.zeros_like(m)
    master_opt = torch.optim.AdamW(masters, lr=1e-3, fused=True)
    grads = [p.grad for p in params]
    master_grads = [m.grad for m in masters]

    def torch_master_step():
        torch._foreach_copy_(master_grads, grads)
        master_opt.step()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)

    fns["torch fused + fp32 master (3 passes)"] = torch_master_step
    fns["torch fused on bf16 (no master)"] = torch.optim.AdamW(params, lr=1e-3, fused=True).step
    for backend in kernel_backends(device):
        fns[f"fusedopt {backend} master"] = fusedopt.FusedAdamW(params, lr=1e-3, backend=backend,
                                                                master_weights=True).step
    return fns, "torch fused + fp32 master (3 passes)"


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    for case, shapes in selected(device, case_names):
        for mode, dtype in (("fp32", torch.float32), ("bf16+master", torch.bfloat16)):
            params = make_params(shapes, dtype, device)
            n = sum(p.numel() for p in params)
            fns, baseline = contenders(mode, params, device)
            stream, stream_bytes = stream_op(device, 16 * n)
            fns[STREAM] = stream
            log(f"adamw {case} {mode}: {n / 1e6:.1f}M params in {len(shapes)} tensors, {len(fns)} contenders")
            times = alternate(fns, device, warmup, reps)
            for name, ts in times.items():
                nbytes = stream_bytes if name == STREAM else BYTES_OVERRIDE.get(name, BYTES_PER_PARAM) * n
                results.append(Result(case, mode, name, ts, nbytes, n))
            baselines[(case, mode)] = baseline
            del fns, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results, baselines


def targets(results, device) -> list[str]:
    """The numbers issue #2 asks for, checked against this run."""
    med = {(r.case, r.mode, r.contender): r for r in results}
    lines = []

    def ratio(case, mode, a, b):
        ra, rb = med.get((case, mode, a)), med.get((case, mode, b))
        return None if ra is None or rb is None else ra.median / rb.median

    if device.type == "cpu":
        for case in ("1x10M", "200x50K"):
            r = ratio(case, "fp32", "fusedopt cpu", "torch fused")
            if r is not None:
                lines.append(f"{'PASS' if r <= 1.05 else 'MISS'} cpu fp32 {case}: fusedopt/torch-fused time = {r:.3f} "
                             f"(target <= 1.05)")
        for case in {c for c, _, _ in med}:
            r = ratio(case, "bf16+master", "torch fused + fp32 master (3 passes)", "fusedopt cpu master")
            if r is not None:
                lines.append(f"{'PASS' if r >= 2 else 'MISS'} cpu bf16+master {case}: speed-up over the torch "
                             f"equivalent = {r:.2f}x (target >= 2)")
    else:
        for backend in ("cuda", "triton"):
            r = med.get(("1B", "fp32", f"fusedopt {backend}"))
            s = med.get(("1B", "fp32", STREAM))
            f = med.get(("1B", "fp32", "torch fused"))
            if r and s and f:
                pct = 100 * r.gbps / s.gbps
                lines.append(f"{'PASS' if pct >= 85 and r.median < f.median else 'MISS'} gpu fp32 1B "
                             f"{backend}: {pct:.0f}% of stream bandwidth (target >= 85%), "
                             f"{f.median / r.median:.2f}x torch fused speed (target > 1)")
    return lines
