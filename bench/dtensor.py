"""FusedAdamW on DTensor params: FSDP2 over 2 ranks (gloo on the CPU, NCCL
when 2 GPUs exist), a model of 48 blocks of Linear(256, 256) + LayerNorm(256)
(3.2M params, 1.6M on each rank).

    python -m fusedopt bench --bench dtensor

Every rank times the optimizer step alone (the grads of one backward stay in
place), its contenders alternately (bench/harness.alternate); rank 0's times
are reported. Contenders, each with its own optimizer state over the same
params:

  plain         FusedAdamW on plain tensors that are the local shards
                (``p._local_tensor``, the grads' too): the same kernel work
                with no DTensor in sight, the floor
  fused (DTensor params)  FusedAdamW(model.parameters()) on FSDP2's DTensors
  torch fused (DTensor params)  torch.optim.AdamW(fused=True) on them, which
                pays DTensor dispatch

Mode "clip" adds max_grad_norm=1.0 (a global norm over the mesh: one
all-reduce per step) against torch's clip_grad_norm_ + fused AdamW on the
DTensors. Bytes per param: AdamW's 28 (fp32 p, g, m, v read, p, m, v
written), of the local shard.

Mode "adafactor": FusedAdafactor on the DTensors (their sharded path: torch
ops on the local shards with the statistics reduced between its phases)
against torch.optim.Adafactor on them, and for scale FusedAdafactor's kernels
on the plain local shards (statistics of the shards alone: what the kernels
cost, not a result a sharded model may use). Bytes: 20 per param
(bench/second_order.py's count).

Mode "muon": FusedMuon on the DTensors (each matrix orthogonalised on one
owner rank, which gathers its shards and scatters the result's) against FusedMuon on plain whole copies
of the params on every rank (every rank orthogonalising every matrix, no
communication: what the owner scheme divides). Newton-Schulz is compute,
not bytes: no bandwidth column.
"""
from __future__ import annotations

import torch

from .harness import STREAM, Result, alternate, on_ranks, stream_op

BLOCKS, WIDTH, WORLD = 48, 256, 2
BYTES_PER_PARAM = 28
MODES = ("step", "clip", "adafactor", "muon")
CASE = f"fsdp2-{WORLD}x-{BLOCKS}blocks"


def _model(device):
    torch.manual_seed(0)
    layers = []
    for _ in range(BLOCKS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.LayerNorm(WIDTH)]
    return torch.nn.Sequential(*layers).to(device)


def _contenders(mode: str, model, device):
    import fusedopt

    params = list(model.parameters())
    local = [p._local_tensor.detach().requires_grad_() for p in params]  # views of the same shards
    for q, p in zip(local, params):
        q.grad = p.grad._local_tensor
    n = sum(q.numel() for q in local)
    if mode == "muon":
        whole = [p.full_tensor().detach().requires_grad_() for p in params]
        for q, p in zip(whole, params):
            q.grad = p.grad.full_tensor()
        return {"fusedopt FusedMuon plain (whole matrices on every rank)": fusedopt.FusedMuon(whole, lr=1e-4).step,
                "fusedopt (DTensor params)": fusedopt.FusedMuon(params, lr=1e-4).step}, n
    if mode == "adafactor":
        fns = {"fusedopt kernels on plain local shards (local statistics)":
               fusedopt.FusedAdafactor(local, lr=1e-4).step,
               "fusedopt (DTensor params)": fusedopt.FusedAdafactor(params, lr=1e-4).step}
        try:  # torch 2.13's raises on FSDP2 params (an in-place square of a norm DTensor dispatch refuses)
            theirs = torch.optim.Adafactor(params, lr=1e-4)
            theirs.step()
            fns["torch Adafactor (DTensor params)"] = theirs.step
        except RuntimeError as e:
            print(f"dtensor adafactor: torch.optim.Adafactor on the DTensor params raises: {str(e)[:160]}")
        return fns, n
    clip = mode == "clip"
    kw = {"max_grad_norm": 1.0} if clip else {}
    fns = {"fusedopt cpu plain (local shards)" if device.type == "cpu" else "fusedopt plain (local shards)":
           fusedopt.FusedAdamW(local, lr=1e-4, **kw).step,
           "fusedopt (DTensor params)": fusedopt.FusedAdamW(params, lr=1e-4, **kw).step}
    torch_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    if clip:
        def torch_step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            torch_opt.step()
        fns["torch clip + fused (DTensor params)"] = torch_step
    else:
        fns["torch fused (DTensor params)"] = torch_opt.step
    return fns, n


def _worker(rank: int, world: int, device_type: str, warmup: int, reps: int) -> list[dict]:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    model = _model(device)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(rank)).to(device)
    model(x).square().mean().backward()
    rows = []
    for mode in MODES:
        fns, n = _contenders(mode, model, device)
        stream, stream_bytes = stream_op(device, 16 * n)
        fns[STREAM] = stream
        times = alternate(fns, device, warmup, reps)
        for name, ts in times.items():
            per_param = {"adafactor": 20, "muon": 0}.get(mode, BYTES_PER_PARAM)  # (second_order.py's count)
            rows.append(dict(mode=mode, contender=name, times_ms=ts, params=n,
                             bytes_per_step=stream_bytes if name == STREAM else per_param * n))
    return rows


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    if case_names and CASE not in case_names:
        return [], {}
    if device.type == "cuda" and torch.cuda.device_count() < WORLD:
        log(f"dtensor: FSDP2 over {WORLD} ranks needs {WORLD} GPUs for NCCL, this machine has "
            f"{torch.cuda.device_count()}: skipped")
        return [], {}
    log(f"dtensor {CASE}: {WORLD} ranks, {BLOCKS} x (Linear({WIDTH}, {WIDTH}) + LayerNorm({WIDTH}))")
    rows = on_ranks(_worker, WORLD, device.type, warmup, reps)
    results = [Result(CASE, r["mode"], r["contender"], r["times_ms"], r["bytes_per_step"], r["params"])
               for r in rows]
    # step: against the same step on plain tensors (the bound); clip: against torch, as the plain
    # contender's norm is local (no collective), which a sharded model cannot do
    baselines = {(CASE, r.mode): r.contender for r in results
                 if ("plain" in r.contender if r.mode != "clip" else r.contender.startswith("torch"))}
    return results, baselines


def targets(results, device) -> list[str]:
    """Issue 22's numbers: the DTensor step <= 1.25x the plain one on the same
    shards, and <= 0.8x torch's fused AdamW on the DTensors."""
    by = {(r.mode, r.contender): r for r in results}
    lines = []
    for mode in MODES:
        ours = by.get((mode, "fusedopt (DTensor params)"))
        plain = next((r for (m, c), r in by.items() if m == mode and "plain" in c), None)
        theirs = next((r for (m, c), r in by.items() if m == mode and c.startswith("torch")), None)
        if mode == "muon" and ours and plain:  # no target: the owner scheme's gain over every rank computing all
            lines.append(f"dtensor muon: FusedMuon on the DTensors (one owner per matrix) / on whole copies on "
                         f"every rank = {ours.median / plain.median:.2f}")
            continue
        if mode == "adafactor" and ours and plain:  # no target: how far the phased path is from the kernels
            lines.append(f"dtensor adafactor: fusedopt on the DTensors / its kernels on the plain local shards = "
                         f"{ours.median / plain.median:.2f}" + (f", / {theirs.contender} = "
                                                                f"{ours.median / theirs.median:.3f}" if theirs else ""))
            continue
        if not (ours and plain and theirs):
            continue
        if mode == "step":
            a = ours.median / plain.median
            lines.append(f"{'PASS' if a <= 1.25 else 'MISS'} dtensor step: DTensor / plain local shards = {a:.3f} "
                         f"(target <= 1.25)")
        b = ours.median / theirs.median
        lines.append(f"{'PASS' if b <= 0.8 else 'MISS'} dtensor {mode}: fusedopt / {theirs.contender} = {b:.3f} "
                     f"(target <= 0.8)")
    return lines
