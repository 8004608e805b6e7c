"""Entry point of ``python -m fusedopt bench``."""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import fusedopt

from . import adamw, clip, compiled, dtensor, fp8, host, lamb, muon, pipeline, remainder, second_order, states
from .harness import markdown, meta_line, write

BENCHMARKS = {"adamw": adamw, "clip": clip, "compiled": compiled, "dtensor": dtensor, "fp8": fp8, "host": host,
              "lamb": lamb, "muon": muon, "pipeline": pipeline, "remainder": remainder, "second_order": second_order,
              "states": states}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt bench",
                                     description="fusedopt benchmarks: same-run ratios against torch")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--bench", nargs="*", default=["adamw"], choices=[*BENCHMARKS, "all"],
                        help="which benchmarks (default: adamw, under a minute on a CPU; 'all' for every one)")
    parser.add_argument("--case", nargs="*", default=None, help="only these cases (e.g. 1x10M 200x50K)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 15 on CPU, 30 on GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="where the JSON, Markdown and PNG go (bench/results/ holds the README's)")
    parser.add_argument("--check", action="store_true", help="also print the project's PASS/MISS targets")
    parser.add_argument("--readme", type=Path, default=None, metavar="README.md",
                        help="only rewrite that file's benchmark table from bench/results/, then exit")
    args = parser.parse_args(argv)
    if args.readme is not None:
        from .report import update_readme

        changed = update_readme(args.readme, args.device.split(":")[0])
        print(f"{args.readme}: table {'rewritten' if changed else 'already current'}")
        return 0
    device = torch.device(args.device)
    reps = args.reps or (30 if device.type == "cuda" else 15)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"device": card, "torch": torch.__version__, "fusedopt": fusedopt.__version__,
            "threads": torch.get_num_threads(), "reps": reps, "warmup": args.warmup}
    summary = []
    for name in (list(BENCHMARKS) if "all" in args.bench else args.bench):
        results, baselines = BENCHMARKS[name].run(device, args.case, args.warmup, reps)
        table = markdown(results, baselines)
        paths, skipped = write(results, baselines, meta, table, args.out, f"{name}_{device.type}")
        print(f"\n## {name} ({meta_line(meta)})\n\n{table}\n\nwritten: {', '.join(map(str, paths))}")
        if skipped:
            print(f"plot skipped: {skipped}")
        if args.check:
            summary += BENCHMARKS[name].targets(results, device)
    if summary:
        print("\n" + "\n".join(summary))
    return 0
