"""ZeroOptimizer's memory and communication volume, counted (issue 6):

    python -m fusedopt._bench.zero            (or python bench/zero.py)
    python -m fusedopt._bench.zero --time [N] (step time: stage 2 against DDP)

For N = 1, 2, 4 gloo ranks on this machine and stages 1 and 2, on a small MLP
(~0.4M params, fp32, FusedAdamW): the optimizer-state bytes each rank holds
(exp_avg + exp_avg_sq, from the tensors) against the single-process total / N,
and the bytes each rank sends in one step, counted from the collectives the
step issues with the usual ring volumes per rank: all-reduce of B bytes
2B(N-1)/N, reduce-scatter and all-gather B(N-1)/N (the size of a 0-d flag or
norm counts too). The baseline is what plain data parallelism sends: an
all-reduce of the grads plus an all-gather of the params.

``--time [N]`` (default N = 2): time per training step (forward, backward,
optimizer step) of ZeroOptimizer(stage=2) against torch DDP + FusedAdamW on
the same model and batch, alternating the two after a warm-up, median of 20
steps each. On N GPUs (NCCL; one process per GPU) the model is an 8-layer MLP
of width 4096 (134M params); without N GPUs it runs on gloo and the CPU with a
small MLP, which shows that the code runs, not how fast ZeRO is.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(301, 512), torch.nn.GELU(), torch.nn.Linear(512, 511),
                               torch.nn.GELU(), torch.nn.Linear(511, 7))


def _counting(sent: list):
    """Wrap fusedopt.distributed._collectives so each call adds its per-rank ring volume to `sent`."""
    from fusedopt.distributed import _collectives as comm

    world = dist.get_world_size()
    share = (world - 1) / world
    factors = {"all_reduce": 2 * share, "reduce_scatter": share, "all_gather": share, "all_to_all": share}
    for name, factor in factors.items():
        original = getattr(comm, name)

        def counted(*args, _original=original, _factor=factor, _name=name, **kwargs):
            big = max((a for a in args if isinstance(a, torch.Tensor)), key=lambda t: t.numel())
            sent.append((_name, big.numel() * big.element_size() * _factor))
            return _original(*args, **kwargs)
        setattr(comm, name, counted)


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from fusedopt.distributed import ZeroOptimizer

    sent: list = []
    _counting(sent)
    rows = []
    n = sum(p.numel() for p in model().parameters())
    grad_bytes = n * 4
    baseline = 2 * (world - 1) / world * grad_bytes + (world - 1) / world * grad_bytes
    for stage in (1, 2):
        net = model()
        opt = ZeroOptimizer(net.parameters(), stage=stage, max_grad_norm=1.0)
        x = torch.randn(16, 301, generator=torch.Generator().manual_seed(rank))
        net(x).square().mean().backward()
        opt.step()  # warm-up (state exists from construction)
        opt.zero_grad()
        sent.clear()
        net(x).square().mean().backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
        rows.append((world, stage, state, 2 * grad_bytes / world, sum(b for _, b in sent), baseline,
                     sorted({name for name, _ in sent})))
    if rank == 0:
        with open(out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    dist.barrier()  # tearing gloo down while a peer still talks to it can abort the process
    dist.destroy_process_group()


def _mlp(width: int, depth: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).to(device)


def _time_worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from fusedopt import FusedAdamW
    from fusedopt.distributed import ZeroOptimizer

    width, depth, batch = (4096, 8, 64) if gpu else (512, 4, 32)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank)).to(device)
    ddp_net = DistributedDataParallel(_mlp(width, depth, device), device_ids=[rank] if gpu else None)
    ddp_opt = FusedAdamW(ddp_net.parameters(), lr=1e-4)
    zero_net = _mlp(width, depth, device)
    zero_opt = ZeroOptimizer(zero_net.parameters(), stage=2, lr=1e-4)

    def step(net, opt):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    times = {"ddp": [], "zero2": []}
    for i in range(25):  # 5 warm-up rounds, then 20 timed, alternating
        for name, net, opt in (("ddp", ddp_net, ddp_opt), ("zero2", zero_net, zero_opt)):
            if gpu:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            step(net, opt)
            if gpu:
                torch.cuda.synchronize()
            if i >= 5:
                times[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in zero_net.parameters())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(rank) if gpu else "cpu (gloo)", "world": world,
                       "params": params, **{k: statistics.median(v) for k, v in times.items()}}, f)
    dist.barrier()
    dist.destroy_process_group()


def time_steps(world: int) -> None:
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_time_worker, args=(world, _port(), out), nprocs=world, join=True)
    with open(out) as f:
        r = json.load(f)
    os.unlink(out)
    print(f"{r['world']} ranks on {r['device']}, {r['params'] / 1e6:.1f}M params, median of 20 steps:")
    print(f"  DDP + FusedAdamW        {r['ddp'] * 1e3:8.2f} ms/step")
    print(f"  ZeroOptimizer stage 2   {r['zero2'] * 1e3:8.2f} ms/step  ({r['zero2'] / r['ddp']:.2f}x DDP)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    out = tempfile.mktemp(suffix=".txt")
    for world in (1, 2, 4):
        mp.spawn(_worker, args=(world, _port(), out), nprocs=world, join=True)
    print("ranks stage  state B/rank  total/N B  padding B  sent B/rank/step  all-reduce+all-gather B  collectives")
    with open(out) as f:
        for line in f:
            world, stage, state, ideal, sent, baseline, names = json.loads(line)
            print(f"{world:5d} {stage:5d}  {state:12.0f}  {ideal:9.0f}  {state - ideal:9.0f}  {sent:16.0f}  "
                  f"{baseline:23.0f}  {','.join(names)}")
    os.unlink(out)


if __name__ == "__main__":
    if "--time" in sys.argv:
        rest = sys.argv[sys.argv.index("--time") + 1:]
        time_steps(int(rest[0]) if rest else 2)
    else:
        main()
