"""The optimizer-side cost of pipeline parallelism: PipelineOptimizer.step()
against the plain optimizer's step on the same params. Two pipeline stages
on 2 ranks (gloo on the CPU, NCCL when 2 GPUs exist), each holding half of a
model of 48 blocks of Linear(256, 256) + LayerNorm(256) (1.6M params a stage).

    python -m fusedopt bench --bench pipeline

Every rank times the optimizer step alone (the grads of one backward stay in
place), the contenders alternately (bench/harness.alternate); rank 0's times
are reported. Contenders, each with its own optimizer state over the stage's
params, FusedAdamW with max_grad_norm=1.0:

  plain          FusedAdamW on the stage's params: its norm is the stage's
                 own (what a pipeline must not clip by), no collective
  PipelineOptimizer  the norm of both stages: one all-reduce per step
  plain step + one all-reduce of 16 B  the floor of any pipeline optimizer:
                 the plain step and the one collective it cannot avoid
                 (on gloo its latency and the ranks' skew dominate)
  one all-reduce of 16 B alone  that collective's cost here

Mode "clip": max_grad_norm alone; mode "clip+scaler": with GradScaler's
flags as torch hands them (``grad_scale``/``found_inf`` attributes), OR-ed over
the stages in the same all-reduce. The collectives a step makes are counted
and printed. Bytes per param: AdamW's 28.
"""
from __future__ import annotations

import torch

from .harness import STREAM, Result, alternate, on_ranks, stream_op

BLOCKS, WIDTH, WORLD = 48, 256, 2
BYTES_PER_PARAM = 28
MODES = ("clip", "clip+scaler")
CASE = f"pp{WORLD}-{BLOCKS}blocks"
PLAIN = "fusedopt plain (this stage's norm)"
PIPELINE = "PipelineOptimizer (2 stages)"
FLOOR = "plain step + one all-reduce of 16 B"
ALONE = "one all-reduce of 16 B alone"


def _stage(rank: int, device):
    torch.manual_seed(0)
    layers = []
    for _ in range(BLOCKS // WORLD):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.LayerNorm(WIDTH)]
    stage = torch.nn.Sequential(*layers).to(device)
    x = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(rank)).to(device)
    stage(x).square().mean().backward()
    return stage


def count_collectives(fn) -> int:
    """How many torch.distributed collectives one call of fn makes."""
    import torch.distributed as dist

    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_to_all_single", "all_gather_object")
    saved = {name: getattr(dist, name) for name in names}
    calls = []

    def counting(original):
        def wrapper(*args, **kwargs):
            calls.append(original)
            return original(*args, **kwargs)
        return wrapper

    try:
        for name, original in saved.items():
            setattr(dist, name, counting(original))
        fn()
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
    return len(calls)


def _worker(rank: int, world: int, device_type: str, warmup: int, reps: int) -> list[dict]:
    import torch.distributed as dist

    import fusedopt
    from fusedopt.distributed import PipelineOptimizer

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    stage = _stage(rank, device)
    n = sum(p.numel() for p in stage.parameters())
    rows = []
    for mode in MODES:
        plain = fusedopt.FusedAdamW(stage.parameters(), lr=1e-4, max_grad_norm=1.0)
        pipeline = PipelineOptimizer(stage, fusedopt.FusedAdamW, pp_group=dist.group.WORLD, lr=1e-4,
                                     max_grad_norm=1.0)
        if mode == "clip+scaler":  # the flags GradScaler hands a fused optimizer
            for opt in (plain, pipeline):
                opt.grad_scale = torch.full((), 1024.0, device=device)
                opt.found_inf = torch.zeros((), device=device)
        packed = torch.zeros(2, dtype=torch.float64, device=device)

        def plain_then_all_reduce():  # the floor: the plain step and the one collective a pipeline needs
            plain.step()
            dist.all_reduce(packed, group=dist.group.WORLD)

        fns = {PLAIN: plain.step, PIPELINE: pipeline.step,
               FLOOR: plain_then_all_reduce,
               ALONE: lambda: dist.all_reduce(packed, group=dist.group.WORLD)}
        collectives = {name: count_collectives(fn) for name, fn in fns.items()}
        stream, stream_bytes = stream_op(device, 16 * n)
        fns[STREAM] = stream
        times = alternate(fns, device, warmup, reps)
        for name, ts in times.items():
            rows.append(dict(mode=mode, contender=name, times_ms=ts, params=n, collectives=collectives.get(name),
                             bytes_per_step=stream_bytes if name == STREAM else BYTES_PER_PARAM * n))
    return rows


def run(device: torch.device, case_names, warmup: int, reps: int, log=print):
    if case_names and CASE not in case_names:
        return [], {}
    if device.type == "cuda" and torch.cuda.device_count() < WORLD:
        log(f"pipeline: {WORLD} stages need {WORLD} GPUs for NCCL, this machine has "
            f"{torch.cuda.device_count()}: skipped")
        return [], {}
    log(f"pipeline {CASE}: {WORLD} stages of {BLOCKS // WORLD} x (Linear({WIDTH}, {WIDTH}) + LayerNorm({WIDTH}))")
    rows = on_ranks(_worker, WORLD, device.type, warmup, reps)
    results = [Result(CASE, r["mode"], r["contender"], r["times_ms"], r["bytes_per_step"], r["params"],
                      extra={"collectives_per_step": r["collectives"]} if r["collectives"] is not None else {})
               for r in rows]
    baselines = {(CASE, r.mode): PLAIN for r in results}
    return results, baselines


def targets(results, device) -> list[str]:
    """Issue 23's number: PipelineOptimizer.step() <= 1.1x the plain step on
    the same params, printed with its collectives per step."""
    lines = []
    for mode in MODES:
        ours = next((r for r in results if r.mode == mode and r.contender == PIPELINE), None)
        plain = next((r for r in results if r.mode == mode and r.contender == PLAIN), None)
        floor = next((r for r in results if r.mode == mode and r.contender == FLOOR), None)
        alone = next((r for r in results if r.mode == mode and r.contender == ALONE), None)
        if ours and plain:
            a = ours.median / plain.median
            lines.append(f"{'PASS' if a <= 1.1 else 'MISS'} pipeline {mode}: PipelineOptimizer / plain step = "
                         f"{a:.3f} (target <= 1.1), {ours.extra['collectives_per_step']} collective(s) a step "
                         f"(plain: {plain.extra['collectives_per_step']})"
                         + (f"; / (plain step + the all-reduce) = {ours.median / floor.median:.3f}, the all-reduce "
                            f"alone {alone.median:.2f} ms" if floor and alone else ""))
    return lines
