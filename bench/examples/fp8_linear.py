"""Train a small MLP whose linear layers run their forward on the FP8 weight
copies FusedAdamW writes in its step:

    python -m fusedopt._bench.examples.fp8_linear      (or python bench/examples/fp8_linear.py)

bf16 params with fp32 master weights and ``fp8=fusedopt.Float8Recipe()``: each
step updates the masters, the bf16 params and the FP8 copies in one pass.
The forward multiplies FP8 activations (cast with their own absmax, by
fusedopt.cast_to_fp8) by the FP8 weights with ``torch._scaled_mm`` on a GPU
that has FP8 (compute capability 8.9+); elsewhere it computes the same
product from the dequantized FP8 values (so the example runs anywhere). The
backward uses the bf16 weights. Prints the loss every 25 steps and returns
the losses.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedopt

E4M3_MAX = 448.0


def has_fp8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, use_scaled_mm: bool) -> torch.Tensor:
    """x @ W.t() with W given as its FP8 copy and 1/scale; x (M, K) is cast to
    e4m3 with the scale from its own absmax. Result in x's dtype."""
    amax = x.detach().abs().amax().float().reshape(1)
    x_scale = torch.where(amax > 0, torch.full_like(amax, E4M3_MAX) / amax, torch.ones_like(amax))
    (x_fp8,), _ = fusedopt.cast_to_fp8([x.detach()], x_scale)
    x_scale_inv = x_scale.reciprocal().reshape(())
    if use_scaled_mm:
        return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale_inv, scale_b=w_scale_inv, out_dtype=x.dtype)
    return ((x_fp8.float() * x_scale_inv) @ (w_fp8.float() * w_scale_inv).t()).to(x.dtype)


class _Fp8Linear(torch.autograd.Function):
    """Forward on the FP8 copies, backward on the bf16 weight."""

    @staticmethod
    def forward(ctx, x, weight, w_fp8, w_scale_inv, use_scaled_mm):
        ctx.save_for_backward(x, weight)
        return fp8_matmul(x, w_fp8, w_scale_inv, use_scaled_mm)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        return grad_out @ weight, grad_out.t() @ x, None, None, None


class Fp8MLP(torch.nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d_hidden, d_in) / d_in**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(d_out, d_hidden) / d_hidden**0.5)

    def forward(self, x, opt: fusedopt.FusedAdamW, use_scaled_mm: bool):
        h = _Fp8Linear.apply(x, self.w1, *opt.fp8_weight(self.w1), use_scaled_mm)
        return _Fp8Linear.apply(F.gelu(h), self.w2, *opt.fp8_weight(self.w2), use_scaled_mm)


def train(steps: int = 200, device: str = "cpu", backend: str | None = None, seed: int = 0,
          use_scaled_mm: bool | None = None, log=print) -> list[float]:
    device = torch.device(device)
    use_scaled_mm = has_fp8_matmul(device) if use_scaled_mm is None else use_scaled_mm
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    y = torch.tanh(x @ torch.randn(64, 32, generator=g) / 8)  # a learnable target
    x, y = x.to(device, torch.bfloat16), y.to(device, torch.bfloat16)
    torch.manual_seed(seed)
    model = Fp8MLP(64, 128, 32).to(device, torch.bfloat16)  # all dims multiples of 16 (_scaled_mm)
    opt = fusedopt.FusedAdamW(model.parameters(), lr=3e-3, master_weights=True, backend=backend,
                              fp8=fusedopt.Float8Recipe())
    losses = []
    for step in range(steps):
        loss = F.mse_loss(model(x, opt, use_scaled_mm).float(), y.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0 and log:
            log(f"step {step:4d}  loss {loss.item():.5f}")
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    mm = "torch._scaled_mm" if has_fp8_matmul(torch.device(args.device)) else "dequantized FP8 (no FP8 matmul here)"
    print(f"forward: {mm}")
    losses = train(args.steps, args.device, args.backend)
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}")


if __name__ == "__main__":
    main()
