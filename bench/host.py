"""The step's fixed cost: tiny tensors, where the host work per step (Python,
argument passing, thread start-up) is all there is to time.

Cases: one tensor of 64 elements, 20 of 64 clipped at 1.0, 1000 of 64.
Contenders: torch's fused AdamW (with ``torch.nn.utils.clip_grad_norm_``
first where clipped: what a user writes) and fusedopt's cpu/cuda backend
(``max_grad_norm=1.0``). One timed call runs STEPS steps; the table reports
milliseconds per call, so a step's microseconds are the median x 1000 /
STEPS. Bytes are negligible: no bandwidth column.
"""
from __future__ import annotations

import torch

import fusedopt

from .cases import make_params
from .harness import Result, alternate

#: steps per timed call (the per-step time is a few to a few thousand microseconds)
STEPS = 50
CASES = {"1x64": (1, False), "20x64-clipped": (20, True), "1000x64": (1000, False)}


def _repeat(step):
    def run():
        for _ in range(STEPS):
            step()
    return run


def contenders(params, clip: bool, device):
    torch_opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def torch_step():
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch_opt.step()

    backend = "cuda" if device.type == "cuda" else "cpu"
    ours = fusedopt.FusedAdamW(params, lr=1e-3, backend=backend, max_grad_norm=1.0 if clip else None)
    baseline = "torch clip_grad_norm_ + fused AdamW" if clip else "torch fused AdamW"
    return {baseline: _repeat(torch_step), f"fusedopt {backend} FusedAdamW": _repeat(ours.step)}, baseline


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    for case, (count, clip) in CASES.items():
        if case_names and case not in case_names:
            continue
        params = make_params([(64,)] * count, torch.float32, device)
        fns, baseline = contenders(params, clip, device)
        mode = f"fp32, {STEPS} steps a call"
        log(f"host {case}: {count} tensors of 64, {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, mode, name, ts, 0, 64 * count))
        baselines[(case, mode)] = baseline
    return results, baselines


def targets(results, device) -> list[str]:
    """Issue 28's CPU targets: fusedopt's step time / torch's, same run."""
    if device.type != "cpu":
        return []
    med = {(r.case, r.contender): r.median for r in results}
    lines = []
    for case, bound in (("1x64", 0.8), ("20x64-clipped", 0.5), ("1000x64", 0.25)):
        _, clip = CASES[case]
        base = med.get((case, "torch clip_grad_norm_ + fused AdamW" if clip else "torch fused AdamW"))
        ours = med.get((case, "fusedopt cpu FusedAdamW"))
        if base and ours:
            r = ours / base
            lines.append(f"{'PASS' if r <= bound else 'MISS'} host {case}: fusedopt/torch time = {r:.2f} "
                         f"(target <= {bound}; {1e3 * ours / STEPS:.0f} vs {1e3 * base / STEPS:.0f} us a step)")
    return lines
