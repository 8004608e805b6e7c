"""fusedopt.GradScaler on plain models: torch.amp.GradScaler's results, step
for step (its DTensor side: tests/test_dtensor.py)."""
from __future__ import annotations

import torch
from helpers import grads_for, make_params

import fusedopt


def test_grad_scaler_matches_torch_on_plain_params():
    results = []
    for scaler_class in (torch.amp.GradScaler, fusedopt.GradScaler):
        params = make_params([(7, 5), (5,), (0,), (3, 1)])
        opt = fusedopt.FusedAdamW(params, lr=0.05)
        scaler = scaler_class("cpu", init_scale=2.0**10, growth_interval=2)
        scales = []
        for step in range(6):
            scaler.scale(torch.ones(()))  # (the scale tensor exists from the first scale())
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g * scaler.get_scale()
            if step == 3:
                params[0].grad[1, 2] = float("inf")
            if step == 4:
                scaler.unscale_(opt)  # the explicit path too
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        results.append(([p.detach().clone() for p in params], scales))
    (a, scales_a), (b, scales_b) = results
    assert scales_a == scales_b and scales_a[3] < scales_a[2]
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
