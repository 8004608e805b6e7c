"""Parameter layouts shared by the benchmarks."""
from __future__ import annotations

import torch


def gpt2_shapes(n_layer: int, d: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (HF layout: Conv1D weights are (in, out))."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def cases(device: torch.device) -> dict[str, list[tuple[int, ...]]]:
    """One 10M tensor, 200 x 50K, a GPT-2 (small on GPUs; on CPUs narrower and
    shallower so a run stays short) and, on GPUs, 1B parameters."""
    out = {"1x10M": [(10_000_000,)], "200x50K": [(50_000,)] * 200}
    if device.type == "cuda":
        out["gpt2-124M"] = gpt2_shapes(12, 768)
        out["1B"] = [(1_000_000_000,)]
    else:
        out["gpt2-d256-L4"] = gpt2_shapes(4, 256)
    return out


def make_params(shapes, dtype, device, grad_scale: float = 1e-2):
    """Params with fixed grads (every step then does the same work), drawn on
    `device` itself (1B normals take seconds on a CPU, milliseconds on a GPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g, device=device).to(dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=g, device=device) * grad_scale).to(dtype)
        params.append(p)
    return params


def kernel_backends(device) -> list[str]:
    """fusedopt backends worth timing on `device` (the Triton interpreter is a
    correctness tool, not a contender)."""
    import fusedopt

    names = fusedopt.available_backends(device)
    return [n for n in names if not (device.type == "cpu" and n == "triton")]


def selected(device, case_names, allowed=None):
    """(case, shapes) of the cases to run: those in `allowed` (all if None)
    and, when the user named some, those named."""
    for case, shapes in cases(device).items():
        if (allowed is None or case in allowed) and (not case_names or case in case_names):
            yield case, shapes


def selected_params(device, case_names, allowed, dtype, **kwargs):
    """(case, params, their numel) of the cases to run (as `selected`), the
    params made by make_params(shapes, dtype, device, **kwargs). The list is
    emptied when the loop moves on: a case's tensors are freed (once the
    caller drops its optimizers) before the next case's are made."""
    for case, shapes in selected(device, case_names, allowed):
        params = make_params(shapes, dtype, device, **kwargs)
        yield case, params, sum(p.numel() for p in params)
        params.clear()
