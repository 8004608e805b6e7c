"""Train a small MLP classifier with FusedSophia and the Gauss-Newton-Bartlett
Hessian estimate, the loop the Sophia paper uses:

    python -m fusedopt._bench.examples.sophia_gnb          (or python bench/examples/sophia_gnb.py)

Every step: loss.backward(); opt.step(); opt.zero_grad(). Every `k` steps,
also: gnb_hessian_loss(model(x)).backward(); opt.update_hessian();
opt.zero_grad(). Prints the loss every 25 steps and returns the losses.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedopt


def train(steps: int = 200, k: int = 10, backend: str | None = None, seed: int = 0, log=print) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 20, generator=g)
    teacher = torch.randn(20, 5, generator=g)
    y = (x @ teacher).argmax(-1)  # a learnable labelling
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 5))
    opt = fusedopt.FusedSophia(model.parameters(), lr=2e-3, rho=0.05, weight_decay=1e-4, bs=x.shape[0],
                               backend=backend)
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % k == k - 1:
            fusedopt.gnb_hessian_loss(model(x), generator=g).backward()
            opt.update_hessian()
            opt.zero_grad()
        if step % 25 == 0 and log:
            log(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--k", type=int, default=10, help="Hessian update interval")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    losses = train(args.steps, args.k, args.backend)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
