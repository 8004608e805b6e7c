"""Gradient clipping: fusedopt.clip_grad_norm_ against torch's (foreach and
for-loop), and FusedAdamW(max_grad_norm) against clip_grad_norm_ followed by
torch's fused AdamW.

Bytes per param (fp32): clip_grad_norm_ reads every grad for the norm (4) and
reads and writes it to scale (8): 12 B. Clip-then-step moves 12 + 28 = 40 B;
the fused step reads the grads once for the norm and applies the coefficient
inside the update: 4 + 28 = 32 B.
"""
from __future__ import annotations

import torch

import fusedopt

from .cases import kernel_backends, selected_params
from .harness import STREAM, Result, alternate, stream_op

CASES = ("1x10M", "gpt2-124M", "gpt2-d256-L4")
MAX_NORM = 1.0


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    for case, params, n in selected_params(device, case_names, CASES, torch.float32, grad_scale=1.0):
        stream, stream_bytes = stream_op(device, 16 * n)

        fns, nbytes = {}, {}
        for name, foreach in (("torch clip_grad_norm_ foreach", True), ("torch clip_grad_norm_ for-loop", False)):
            fns[name] = (lambda fe: lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=fe))(foreach)
            nbytes[name] = 12 * n
        for backend in kernel_backends(device):
            fns[f"fusedopt clip_grad_norm_ {backend}"] = \
                (lambda be: lambda: fusedopt.clip_grad_norm_(params, MAX_NORM, backend=be))(backend)
            nbytes[f"fusedopt clip_grad_norm_ {backend}"] = 12 * n
        fns[STREAM], nbytes[STREAM] = stream, stream_bytes
        log(f"clip {case}: {n / 1e6:.1f}M params in {len(params)} tensors, {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, "clip_grad_norm_", name, ts, nbytes[name], n))
        baselines[(case, "clip_grad_norm_")] = "torch clip_grad_norm_ foreach"

        # clipping inside the step (grads stay as they are, so every step clips)
        torch_opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

        def torch_clip_then_step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            torch_opt.step()

        fns = {"torch clip_grad_norm_ + fused AdamW": torch_clip_then_step}
        nbytes = {"torch clip_grad_norm_ + fused AdamW": 40 * n}
        for backend in kernel_backends(device):
            name = f"fusedopt {backend} AdamW(max_grad_norm)"
            fns[name] = fusedopt.FusedAdamW(params, lr=1e-3, backend=backend, max_grad_norm=MAX_NORM).step
            nbytes[name] = 32 * n
        fns[STREAM], nbytes[STREAM] = stream, stream_bytes
        log(f"clip+step {case}: {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, "adamw+clip", name, ts, nbytes[name], n))
        baselines[(case, "adamw+clip")] = "torch clip_grad_norm_ + fused AdamW"
        fns = torch_opt = None  # (the optimizers and their states go before the next case)
    return results, baselines


def targets(results, device) -> list[str]:
    """Issue #3's numbers, checked against this run (CPU)."""
    med = {(r.case, r.mode, r.contender): r.median for r in results}
    lines = []
    backend = "cpu" if device.type == "cpu" else "cuda"
    checks = [  # (mode, baseline, ours, what, target)
        ("clip_grad_norm_", "torch clip_grad_norm_ foreach", f"fusedopt clip_grad_norm_ {backend}",
         "clip_grad_norm_ {case}: fusedopt/torch-foreach time", 1.05),
        ("adamw+clip", "torch clip_grad_norm_ + fused AdamW", f"fusedopt {backend} AdamW(max_grad_norm)",
         "AdamW(max_grad_norm) {case}: time vs clip_grad_norm_ + fused AdamW", 0.87),
    ]
    for case in {r.case for r in results}:
        for mode, baseline, contender, what, target in checks:
            base, ours = med.get((case, mode, baseline)), med.get((case, mode, contender))
            if base and ours:
                ratio = ours / base
                lines.append(f"{'PASS' if ratio <= target else 'MISS'} {device.type} {what.format(case=case)} = "
                             f"{ratio:.3f} (target <= {target})")
    return sorted(lines)
