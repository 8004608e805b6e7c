"""Train a tiny GPT-like model with FusedMuon and with AdamW at its best lr.

    python -m fusedopt._bench.examples.muon_gpt [--steps 300] [--out muon_gpt.png]

The data: sequences of a fixed random Markov chain over 64 tokens (a
learnable next-token law with a known floor, its entropy). The model: the
TinyGPT of the 3-D example (embedding, MLP blocks, norm, head). FusedMuon
steps the blocks' matrices and AdamW (inside the same optimizer) the
embedding, head, norms and biases, as Muon's authors advise; AdamW alone is
swept over a few learning rates and its best run is the comparison. Prints
both curves' last losses and writes them as a PNG when matplotlib is there.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedopt

from .pipeline_3d import TinyGPT

VOCAB, SEQ, BATCH, LAYERS, DIM, HIDDEN = 64, 16, 32, 2, 64, 256
ADAMW_LRS = (1e-3, 3e-3, 1e-2)


def chain(seed: int = 0) -> torch.Tensor:
    """A sparse random transition matrix: each token has 4 likely successors."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g) * 3.0
    return torch.softmax(logits, dim=-1)


def batch(transitions: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(VOCAB, (BATCH,), generator=g)
    for t in range(SEQ):
        x[:, t + 1] = torch.multinomial(transitions[x[:, t]], 1, generator=g).squeeze(1)
    return x[:, :-1], x[:, 1:]


def train(make_optimizer, steps: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = TinyGPT(LAYERS, vocab=VOCAB, dim=DIM, hidden=HIDDEN)
    opt = make_optimizer(model)
    transitions, losses = chain(), []
    for step in range(steps):
        x, y = batch(transitions, step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def muon(model, lr: float = 0.05, adamw_lr: float = 3e-3):
    blocks = [p for p in model.layers.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if all(p is not q for q in blocks)]
    return fusedopt.FusedMuon([{"params": blocks}, {"params": rest, "use_muon": False, "lr": adamw_lr}], lr=lr,
                              weight_decay=0.0, adamw_betas=(0.9, 0.95))


def adamw(lr: float):
    return lambda model: fusedopt.FusedAdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def floor() -> float:
    """The chain's entropy rate under its stationary start: no model beats it (nats)."""
    p = chain()
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def compare(steps: int) -> dict:
    """{'muon': losses, 'adamw': best AdamW run's losses, 'adamw_lr': its lr, 'floor': entropy}."""
    tail = max(1, steps // 10)
    runs = {lr: train(adamw(lr), steps) for lr in ADAMW_LRS}
    best = min(runs, key=lambda lr: sum(runs[lr][-tail:]))
    return {"muon": train(lambda m: muon(m, adamw_lr=best), steps), "adamw": runs[best], "adamw_lr": best,
            "floor": floor()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="muon_gpt.png")
    args = parser.parse_args(argv)
    result = compare(args.steps)
    tail = max(1, args.steps // 10)
    for name in ("muon", "adamw"):
        last = sum(result[name][-tail:]) / tail
        print(f"{name}: mean loss of the last {tail} steps {last:.4f}")
    print(f"AdamW's best lr {result['adamw_lr']}; the chain's entropy (the floor) {result['floor']:.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install fusedopt[bench])")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["muon"], label="FusedMuon (lr 0.05; the best AdamW lr for the rest)")
    ax.plot(result["adamw"], label=f"FusedAdamW (best lr {result['adamw_lr']})")
    ax.axhline(result["floor"], color="gray", linestyle=":", label="entropy of the data (floor)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
