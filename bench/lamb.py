"""LAMB: FusedLAMB against the same algorithm written per tensor in plain
torch (what a user without a fused LAMB writes; apex's non-fused style).

Bytes per param (fp32): the global grad norm reads g (4); the moments pass
reads p, g, m, v and writes m, v (24); the apply pass reads p, m, v and
writes p (16): 44 B.
"""
from __future__ import annotations

import torch

import fusedopt

from .cases import kernel_backends, selected_params
from .harness import STREAM, Result, alternate, stream_op

CASES = ("1x10M", "gpt2-124M", "gpt2-d256-L4")
BYTES_PER_PARAM = 44
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)


class TorchLamb:
    """LAMB per tensor in plain torch ops (adam_w_mode, bias correction, grad averaging)."""

    def __init__(self, params, lr, betas, eps, weight_decay, max_grad_norm):
        self.params, self.lr, self.betas, self.eps, self.wd, self.max_norm = params, lr, betas, eps, weight_decay, \
            max_grad_norm
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        self.steps += 1
        bc1, bc2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        grads = [p.grad for p in self.params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip = torch.where(total > self.max_norm, self.max_norm / total, torch.ones_like(total))
        for p, g, (m, v) in zip(self.params, grads, self.state):
            g = g * clip
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            u = (m / bc1) / (v / bc2).sqrt_().add_(self.eps)
            u.add_(p, alpha=self.wd)
            pn, un = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
            ratio = torch.where((pn > 0) & (un > 0), self.lr * pn / un, torch.full_like(pn, self.lr))
            p.sub_(u * ratio)


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    for case, params, n in selected_params(device, case_names, CASES, torch.float32):
        fns = {"torch per-tensor LAMB": TorchLamb(params, **HYPER).step}
        for backend in kernel_backends(device):
            fns[f"fusedopt {backend}"] = fusedopt.FusedLAMB(params, backend=backend, **HYPER).step
        stream, stream_bytes = stream_op(device, 16 * n)
        fns[STREAM] = stream
        log(f"lamb {case}: {n / 1e6:.1f}M params in {len(params)} tensors, {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, "fp32", name, ts, stream_bytes if name == STREAM else BYTES_PER_PARAM * n, n))
        baselines[(case, "fp32")] = "torch per-tensor LAMB"
        del fns
    return results, baselines


def targets(results, device) -> list[str]:
    med = {(r.case, r.contender): r.median for r in results}
    backend = "cpu" if device.type == "cpu" else "cuda"
    lines = []
    for case in sorted({r.case for r in results}):
        base, ours = med.get((case, "torch per-tensor LAMB")), med.get((case, f"fusedopt {backend}"))
        if base and ours:
            ratio = ours / base
            lines.append(f"{'PASS' if ratio <= 0.33 else 'MISS'} {device.type} FusedLAMB {case}: time vs per-tensor "
                         f"torch = {ratio:.3f} (target <= 0.33)")
    return lines
