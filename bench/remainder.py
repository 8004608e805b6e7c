"""Exact masters in 2 bytes: FusedAdamW on bf16 params with
master_weights="remainder" against master_weights=True (the same fp32
masters, kept whole), default (fp32) states.

Bytes per param: fp32 masters read master 4, grad 2, m, v and write master,
m, v and param 2: 28 B. Remainders read param 2, remainder 2, grad 2, m, v and
write param 2, remainder 2, m, v: 26 B (the param is read again, the master's
upper half is not). The baseline is the fp32-master step of the same run.
"""
from __future__ import annotations

import torch

import fusedopt

from .cases import kernel_backends, selected_params
from .harness import STREAM, Result, alternate, stream_op

BYTES_PER_PARAM = {True: 28, "remainder": 26}
CASES = ("1x10M", "gpt2-d256-L4", "gpt2-124M")
_NAMES = {True: "fp32 masters", "remainder": "remainders"}


def _label(backend: str, master) -> str:
    return f"fusedopt {backend} {_NAMES[master]}"


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    backends = [b for b in kernel_backends(device) if b != "reference"]
    for case, params, n in selected_params(device, case_names, CASES, torch.bfloat16):
        fns, nbytes = {}, {}
        for backend in backends:
            for master in BYTES_PER_PARAM:
                name = _label(backend, master)
                fns[name] = fusedopt.FusedAdamW(params, lr=1e-3, backend=backend, master_weights=master).step
                nbytes[name] = BYTES_PER_PARAM[master] * n
        fns[STREAM], nbytes[STREAM] = stream_op(device, 16 * n)
        log(f"remainder {case} bf16: {n / 1e6:.1f}M params in {len(params)} tensors, {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, "bf16", name, ts, nbytes[name], n))
        baselines[(case, "bf16")] = _label(backends[-1], True)
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, baselines


def targets(results, device) -> list[str]:
    """Issue 27: the remainder step at most 1.0x the fp32-master step."""
    med = {(r.case, r.contender): r.median for r in results}
    lines = []
    for backend in ("cpu",) if device.type == "cpu" else ("cuda", "triton"):
        for case in CASES:
            rem, full = med.get((case, _label(backend, "remainder"))), med.get((case, _label(backend, True)))
            if rem and full:
                r = rem / full
                lines.append(f"{'PASS' if r <= 1.0 else 'MISS'} {backend} bf16 {case}: remainders/fp32-masters time = "
                             f"{r:.3f} (target <= 1.0)")
    return lines
