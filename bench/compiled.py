"""A torch.compile'd training step (forward, backward, optimizer step,
zero_grad) of a GPT-2-shaped model: FusedAdamW against torch's fused AdamW,
and the same compiled step without an optimizer, whose time the optimizer's
share is measured against: share = (step - forward/backward) / step.

torch's fused AdamW is traced into the compiled graph. fusedopt's step with a
float lr runs eagerly at a graph break (README: torch.compile), so that row
measures what the break costs a user; with a tensor lr ("traced") on a
backend whose ops are custom ops it is traced into the graph too. The model: GPT-2 with d=256 and 4 layers (the CPU case of
bench/cases.py: gpt2-d256-L4), one sequence of 32 tokens (a short forward, so
the optimizer's share stands out of the noise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fusedopt

from .cases import kernel_backends
from .harness import Result, alternate

CASES = ("gpt2-d256-L4",)
VOCAB, CTX, DIM, LAYERS, HEADS, BATCH, SEQ = 50257, 1024, 256, 4, 4, 1, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, DIM))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT2(nn.Module):
    """GPT-2's parameters (bench/cases.py: gpt2_shapes), the head tied to the token embedding."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(CTX, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(DIM)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.wte.weight.t()


def training_step(model, opt, idx, target):
    loss = F.cross_entropy(model(idx).flatten(0, 1), target.flatten())
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    else:
        model.zero_grad()
    return loss


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    if case_names and not set(case_names) & set(CASES):
        return [], {}
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(VOCAB, (BATCH, SEQ), generator=g, device=device)
    target = torch.randint(VOCAB, (BATCH, SEQ), generator=g, device=device)
    optimizers = {"torch AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)}
    for backend in [b for b in kernel_backends(device) if b != "reference"]:
        optimizers[f"fusedopt {backend} FusedAdamW"] = \
            (lambda be: lambda ps: fusedopt.FusedAdamW(ps, lr=1e-4, backend=be))(backend)
        if getattr(fusedopt.backends.get(backend), "TRACEABLE", False):
            optimizers[f"fusedopt {backend} FusedAdamW traced"] = \
                (lambda be: lambda ps: fusedopt.FusedAdamW(ps, lr=torch.tensor(1e-4), backend=be))(backend)
    fns, n = {}, 0
    for name, make in [*optimizers.items(), ("forward/backward only", None)]:
        torch.manual_seed(0)
        model = GPT2().to(device)
        n = sum(p.numel() for p in model.parameters())
        opt = make(list(model.parameters())) if make else None
        step = torch.compile(training_step)
        fns[name] = (lambda s, m, o: lambda: s(m, o, idx, target))(step, model, opt)
        log(f"compiled {name}: compiling")
        fns[name]()  # compile outside the timed rounds (a traced step: its first step, eager, creates the
        fns[name]()  # states; the second compiles the step into the graph)
    log(f"compiled step gpt2-d256-L4: {n / 1e6:.1f}M params, {len(fns)} contenders")
    results = []
    for name, ts in alternate(fns, device, warmup, reps).items():
        # AdamW's bytes (fp32: read p, g, m, v; write p, m, v): 28 per param; none without a step
        nbytes = 0 if name.startswith("forward") else 28 * n
        results.append(Result("gpt2-d256-L4", "compiled train step", name, ts, nbytes, n))
    return results, {("gpt2-d256-L4", "compiled train step"): "torch AdamW(fused=True)"}


def shares(results) -> dict[str, float]:
    """Each optimizer's share of its compiled step's time."""
    med = {r.contender: r.median for r in results}
    base = med.get("forward/backward only")
    return {name: (t - base) / t for name, t in med.items() if base and name != "forward/backward only"}


def targets(results, device) -> list[str]:
    """Issue #24: the optimizer's share of the compiled step no larger than torch's."""
    share = shares(results)
    theirs = share.get("torch AdamW(fused=True)")
    lines = [f"     {device.type} compiled step, optimizer's share: {name} {s:.1%}"
             for name, s in sorted(share.items())]
    for name, s in share.items():
        if name.startswith("fusedopt") and theirs is not None:
            lines.append(f"{'PASS' if s <= theirs else 'MISS'} {device.type} compiled step {name}: optimizer share "
                         f"{s:.1%} vs torch's {theirs:.1%} (target: no larger)")
    return lines
