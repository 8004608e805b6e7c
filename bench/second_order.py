"""Adafactor and Sophia: fusedopt against what a user runs instead.

Adafactor: torch.optim.Adafactor (which reads RMS(p), RMS(u) and the step to
the host for every param, every step), and torch's fused AdamW on the same
params for scale: Adafactor moves fewer bytes (no full-size second moment).
Sophia: the authors' per-tensor SophiaG in plain torch (github.com/Liuhong99/
Sophia, _single_tensor_sophiag), step only.

Bytes per param counted (fp32): FusedAdafactor on a matrix reads g and p for
the statistics and RMS(u) (8: csrc/cpu/adafactor.cpp forms sum(u*u) from the
rows it reads there), and g and p and writes p for the update (12): 20 B
(vectors: 32 B with their full variance). That is the count for every backend;
the Triton kernels read g twice more (column sums, sum(u*u)): 28 B.
(The cpu backend takes the matrices in waves of about 8 MB, each through
every pass before the next: a wave's second read of g and p comes from
cache, so for the smaller matrices less than these bytes cross the memory
bus. The count stays the algorithm's.)
torch's fused AdamW reads 16 and writes 12: on a machine whose reads are the
limit (the CPUs here: writes back to lines just read are nearly free) the two
move the same 16 B of reads per param. (What puts the cpu backend ahead there:
its read-only first pass asks for its lines ahead, csrc/cpu/prefetch.h, and
the smaller matrices' second read comes from cache.) Sophia's step reads p, g, m, h and
writes p, m: 24 B.
"""
from __future__ import annotations

import torch

import fusedopt

from .cases import kernel_backends, selected_params
from .harness import STREAM, Result, alternate, stream_op

CASES = ("gpt2-124M", "gpt2-d256-L4")  # the targets are on GPT-2-like shapes


class TorchSophiaG:
    """SophiaG per tensor in plain torch, as the authors' reference writes it."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, bs=5120):
        self.params, self.lr, self.beta1, self.rho, self.wd, self.bs = params, lr, betas[0], rho, weight_decay, bs
        self.state = [(torch.zeros_like(p), torch.rand_like(p)) for p in params]
        self.steps = [torch.tensor(0.0) for _ in params]

    @torch.no_grad()
    def step(self):
        for p, step, (m, h) in zip(self.params, self.steps, self.state):
            step += 1
            p.mul_(1 - self.lr * self.wd)
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            ratio = (m.abs() / (self.rho * self.bs * h + 1e-15)).clamp(None, 1)
            p.addcmul_(m.sign(), ratio, value=-self.lr)


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    results, baselines = [], {}
    for case, params, n in selected_params(device, case_names, CASES, torch.float32):
        matrix = sum(p.numel() for p in params if p.dim() > 1)
        adafactor_bytes = 20 * matrix + 32 * (n - matrix)
        stream, stream_bytes = stream_op(device, 16 * n)

        fns = {"torch Adafactor": torch.optim.Adafactor(params, lr=1e-3).step,
               "torch fused AdamW": torch.optim.AdamW(params, lr=1e-3, fused=True).step, STREAM: stream}
        nbytes = {"torch Adafactor": adafactor_bytes, "torch fused AdamW": 28 * n, STREAM: stream_bytes}
        for backend in kernel_backends(device):
            if backend == "reference":
                continue  # torch's own Adafactor is the per-tensor version
            name = f"fusedopt {backend} Adafactor"
            fns[name] = fusedopt.FusedAdafactor(params, lr=1e-3, backend=backend).step
            nbytes[name] = adafactor_bytes
        log(f"adafactor {case}: {n / 1e6:.1f}M params in {len(params)} tensors, {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, "adafactor", name, ts, nbytes[name], n))
        baselines[(case, "adafactor")] = "torch Adafactor"

        fns = {"torch per-tensor SophiaG": TorchSophiaG(params).step, STREAM: stream}
        for backend in kernel_backends(device):
            if backend == "reference":
                continue
            opt = fusedopt.FusedSophia(params, backend=backend)
            opt.update_hessian()  # a Hessian estimate, so the ratio is not all 1
            fns[f"fusedopt {backend} Sophia"] = opt.step
        log(f"sophia {case}: {len(fns)} contenders")
        for name, ts in alternate(fns, device, warmup, reps).items():
            results.append(Result(case, "sophia", name, ts, stream_bytes if name == STREAM else 24 * n, n))
        baselines[(case, "sophia")] = "torch per-tensor SophiaG"
        del fns
    return results, baselines


def targets(results, device) -> list[str]:
    med = {(r.case, r.mode, r.contender): r.median for r in results}
    backend = "cpu" if device.type == "cpu" else "triton"
    lines = []
    for case in sorted({r.case for r in results}):
        ours = med.get((case, "adafactor", f"fusedopt {backend} Adafactor"))
        torch_af = med.get((case, "adafactor", "torch Adafactor"))
        adamw = med.get((case, "adafactor", "torch fused AdamW"))
        if ours and torch_af:
            ratio = ours / torch_af
            lines.append(f"{'PASS' if ratio <= 0.2 else 'MISS'} {device.type} FusedAdafactor {case}: time vs "
                         f"torch Adafactor = {ratio:.3f} (target <= 0.2)")
        if ours and adamw:
            ratio = ours / adamw
            lines.append(f"{'PASS' if ratio <= 1.0 else 'MISS'} {device.type} FusedAdafactor {case}: time vs "
                         f"torch fused AdamW = {ratio:.3f} (target <= 1)")
        ours = med.get((case, "sophia", f"fusedopt {'cpu' if device.type == 'cpu' else 'cuda'} Sophia"))
        base = med.get((case, "sophia", "torch per-tensor SophiaG"))
        if ours and base:
            ratio = ours / base
            lines.append(f"{'PASS' if ratio <= 0.25 else 'MISS'} {device.type} FusedSophia {case}: time vs "
                         f"per-tensor torch = {ratio:.3f} (target <= 0.25)")
    return lines
