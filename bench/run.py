"""Entry point of ``python -m fusedopt bench``."""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import fusedopt

from . import adamw, clip, compiled, dtensor, fp8, lamb, pipeline, second_order, states
from .harness import markdown, meta_line, write

BENCHMARKS = {"adamw": adamw, "clip": clip, "compiled": compiled, "dtensor": dtensor, "fp8": fp8, "lamb": lamb, "pipeline": pipeline,
              "second_order": second_order, "states": states}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt bench",
                                     description="fusedopt benchmarks: same-run ratios against torch")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--bench", nargs="*", default=["adamw"], choices=[*BENCHMARKS, "all"],
                        help="which benchmarks (default: adamw, under a minute on a CPU; 'all' for every one)")
    parser.add_argument("--case", nargs="*", default=None, help="only these cases (e.g. 1x10M 200x50K)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 15 on CPU, 30 on GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where JSON and Markdown go")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (30 if device.type == "cuda" else 15)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"device": card, "torch": torch.__version__, "fusedopt": fusedopt.__version__,
            "threads": torch.get_num_threads(), "reps": reps, "warmup": args.warmup}
    summary = []
    for name in (list(BENCHMARKS) if "all" in args.bench else args.bench):
        results, baselines = BENCHMARKS[name].run(device, args.case, args.warmup, reps)
        table = markdown(results, baselines)
        json_path, md_path = write(results, meta, table, args.out, f"{name}_{device.type}")
        print(f"\n## {name} ({meta_line(meta)})\n\n{table}\n\nwritten: {json_path}, {md_path}")
        summary += BENCHMARKS[name].targets(results, device)
    if summary:
        print("\n" + "\n".join(summary))
    return 0
