"""Benchmark results as pictures and as the README's table.

``plot`` draws one run's results (a JSON payload of harness.write) as a PNG:
per case and mode, each contender's median time per step (p10-p90 whiskers)
and its share of the streaming bandwidth measured in the same run.
matplotlib is optional (``pip install fusedopt[bench]``): without it the plot
is skipped and the reason returned.

``readme_table`` turns the committed results in bench/results/ into the
README's benchmark table (``python -m fusedopt bench --readme README.md``
rewrites it between its markers), so the README cites exactly what was measured.
"""
from __future__ import annotations

import json
from pathlib import Path

from .harness import STREAM

RESULTS = Path(__file__).resolve().parent / "results"


def plot(payload: dict, path: Path) -> str | None:
    """Write the PNG; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install fusedopt[bench])"
    results = payload["results"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["case"], r["mode"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 1.2 + 0.42 * max(len(g) for g in groups.values()) *
                                                     len(groups)), squeeze=False)
    for row, ((case, mode), rs) in enumerate(groups.items()):
        stream = next((r for r in rs if r["contender"] == STREAM), None)
        names = [r["contender"] for r in rs]
        med = [r["median_ms"] for r in rs]
        lo = [m - sorted(r["times_ms"])[len(r["times_ms"]) // 10] for m, r in zip(med, rs)]
        hi = [sorted(r["times_ms"])[(len(r["times_ms"]) * 9) // 10] - m for m, r in zip(med, rs)]
        colors = ["tab:orange" if n.startswith("fusedopt") else "tab:gray" if n == STREAM else "tab:blue"
                  for n in names]
        ax = axes[row][0]
        ax.barh(names, med, xerr=[lo, hi], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (median, p10-p90)")
        ax.set_title(f"{case} / {mode}", fontsize=10)
        ax = axes[row][1]
        if stream is not None and stream["gbps"] > 0:
            pct = [100 * r["gbps"] / stream["gbps"] if r["contender"] != STREAM else 100.0 for r in rs]
            ax.barh(names, pct, color=colors)
            ax.invert_yaxis()
            ax.set_xlabel("% of the stream bandwidth measured in the same run")
            ax.set_yticklabels([])
        else:
            ax.set_axis_off()
    meta = payload.get("meta", {})
    fig.suptitle(", ".join(f"{k}: {v}" for k, v in meta.items() if k in ("device", "torch", "threads")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _rows(payload: dict, bench: str) -> list[str]:
    results = payload["results"]
    by_key = {(r["case"], r["mode"], r["contender"]): r for r in results}
    stream = {(r["case"], r["mode"]): r for r in results if r["contender"] == STREAM}
    rows = []
    for key, baseline in payload.get("baselines", {}).items():
        case, mode = key.split("|")
        base = by_key.get((case, mode, baseline))
        for r in results:
            ours = r["contender"]
            if (r["case"], r["mode"]) != (case, mode) or not ours.startswith("fusedopt") or "reference" in ours \
                    or ours == baseline:  # (a ratio of 1 to itself says nothing)
                continue
            s = stream.get((case, mode))
            pct = f"{100 * r['gbps'] / s['gbps']:.0f}%" if s and r["bytes_per_step"] else ""
            ratio = f"{r['median_ms'] / base['median_ms']:.2f}x" if base else ""
            rows.append(f"| {bench} | {case} | {mode} | {ours} | {r['median_ms']:.2f} | {baseline} | {ratio} | {pct} |")
    return rows


def readme_table(device_type: str = "cpu", directory: Path = RESULTS) -> str:
    """The table of every committed `<bench>_<device>.json`: each fusedopt
    contender's time, its ratio to the run's baseline and its % of stream."""
    files = sorted(directory.glob(f"*_{device_type}.json"))
    lines = ["| bench | case | mode | fusedopt | ms | vs | time ratio | % of stream |",
             "|---|---|---|---|---:|---|---:|---:|"]
    machines = set()
    for f in files:
        payload = json.loads(f.read_text())
        meta = payload.get("meta", {})
        machines.add(f"{meta.get('device')}, {meta.get('threads')} threads, torch {meta.get('torch')}")
        lines += _rows(payload, f.name[: -len(f"_{device_type}.json")])
    return "\n".join(lines) + f"\n\nMeasured on: {'; '.join(sorted(machines))}."


def update_readme(readme: Path, device_type: str = "cpu") -> bool:
    """Rewrite the table between `<!-- bench-table:cpu -->` and its closing
    marker; True when the file changed."""
    text = readme.read_text()
    start, end = f"<!-- bench-table:{device_type} -->", f"<!-- /bench-table:{device_type} -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{readme_table(device_type)}\n{end}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
