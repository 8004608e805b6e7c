"""Timing, bandwidth and reporting shared by the benchmarks.

Contenders of one case are timed alternately: every round times each once,
so slow drifts such as CPU frequency or a neighbour's load hit all alike (the
order rotates each round: see `alternate`), after `warmup` untimed calls each. GPU
timings use CUDA events; CPU timings perf_counter. The streaming bandwidth is
itself one contender: ``x.mul_(1.0)`` over a buffer as large as the case's
working set (capped), reading and writing every byte once.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STREAM = "stream (x.mul_(1.0))"


@dataclass
class Result:
    case: str
    mode: str
    contender: str
    times_ms: list[float]
    bytes_per_step: int
    params: int
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def spread(self) -> tuple[float, float]:
        """10th and 90th percentile."""
        ts = sorted(self.times_ms)
        return ts[len(ts) // 10], ts[(len(ts) * 9) // 10]

    @property
    def gbps(self) -> float:
        return self.bytes_per_step / (self.median * 1e-3) / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> float:
    """Milliseconds of one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def alternate(fns: dict, device: torch.device, warmup: int, reps: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        # rotate the order each round: every contender starts a round as often
        # as any other and none runs twice in a row (forward-then-reversed
        # rounds ran the first and last twice in a row every other round, with
        # their data still partly in cache: a bias for whichever came first)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(fns[name], device))
    return times


def stream_op(device: torch.device, working_set_bytes: int):
    """(fn, bytes moved per call) of the in-place streaming reference op."""
    cap = (2 << 30) if device.type == "cuda" else (512 << 20)
    n = max(1 << 20, min(working_set_bytes, cap) // 4)
    buf = torch.ones(n, dtype=torch.float32, device=device)
    return (lambda: buf.mul_(1.0)), 8 * n


def markdown(results: list[Result], baselines: dict[tuple[str, str], str]) -> str:
    """One table; `baselines` maps (case, mode) to the contender ratios are against."""
    lines = ["| case | mode | contender | median ms | p10-p90 ms | MB moved | GB/s | % of stream | vs baseline |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r.case, r.mode, r.contender): r for r in results}
    stream = {(r.case, r.mode): r for r in results if r.contender == STREAM}
    for r in results:
        lo, hi = r.spread
        s = stream.get((r.case, r.mode))
        pct = f"{100 * r.gbps / s.gbps:.0f}%" if s and r.contender != STREAM else ""
        base = by_key.get((r.case, r.mode, baselines.get((r.case, r.mode), "")))
        ratio = f"{r.median / base.median:.2f}x" if base and r.contender != STREAM else ""
        lines.append(f"| {r.case} | {r.mode} | {r.contender} | {r.median:.2f} | {lo:.2f}-{hi:.2f} | "
                     f"{r.bytes_per_step / 1e6:.0f} | {r.gbps:.1f} | {pct} | {ratio} |")
    return "\n".join(lines)


def write(results: list[Result], baselines: dict, meta: dict, table: str, out_dir: Path,
          stem: str) -> tuple[list[Path], str | None]:
    """`stem`.json (results, baselines, meta), .md (the table) and .png (the
    plot); the paths written and, when the plot was skipped, why."""
    from .report import plot

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    payload = {"meta": meta, "baselines": {f"{case}|{mode}": name for (case, mode), name in baselines.items()},
               "results": [dict(asdict(r), median_ms=r.median, gbps=r.gbps) for r in results]}
    json_path.write_text(json.dumps(payload, indent=1))
    md_path.write_text(f"{meta_line(meta)}\n\n{table}\n")
    skipped = plot(payload, png_path) if results else "no results"
    return [json_path, md_path] + ([] if skipped else [png_path]), skipped


def meta_line(meta: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in meta.items())


def _rank_entry(rank: int, world: int, port: int, out: str, worker, args) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    gpu = args[0] == "cuda"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    rows = worker(rank, world, *args)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def on_ranks(worker, world: int, device_type: str, *args) -> list:
    """worker(rank, world, device_type, *args) on `world` processes (gloo on
    the CPU with one thread each, NCCL with a GPU each); rank 0's return
    value (JSON-able) comes back."""
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        mp.spawn(_rank_entry, args=(world, port, out, worker, (device_type, *args)), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)
