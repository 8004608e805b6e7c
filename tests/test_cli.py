"""The command line (info, build) and the benchmark harness on tiny cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fusedopt._resources import shipped_module

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fusedopt", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_info_lists_every_backend_for_every_device_type():
    out = cli("info")
    assert out.returncode == 0, out.stderr
    for needle in ("fusedopt 0.1.0", "torch", "JIT cache:", "backends for cpu tensors:", "backends for cuda tensors:"):
        assert needle in out.stdout
    cpu_section = out.stdout.split("backends for cpu tensors:")[1].split("backends for cuda tensors:")[0]
    assert "reference  available" in cpu_section
    assert "cuda       unavailable: runs on cuda tensors, not cpu" in cpu_section


def test_build_reports_each_backend():
    out = cli("build", "cpu", "cuda")
    assert "cpu: built in" in out.stdout
    if not torch.cuda.is_available():
        assert "cuda: skipped" in out.stdout
        assert out.returncode == 0, out.stdout + out.stderr


def test_build_without_arguments_builds_every_backend():
    out = cli("build")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("cpu", "cuda", "triton"):
        assert f"{name}:" in out.stdout


def test_build_rejects_an_unknown_backend():
    out = cli("build", "cpu", "tpu")
    assert out.returncode == 2
    assert "unknown backend(s) tpu" in out.stderr


def test_bench_harness_on_tiny_cases(monkeypatch, tmp_path, capsys):
    """JSON, Markdown and (with matplotlib) a PNG; the targets only with --check."""
    cases = shipped_module("bench", "cases")
    run = shipped_module("bench", "run")
    monkeypatch.setattr(cases, "cases", lambda device: {"tiny": [(1000,), (7, 3)]})
    assert run.main(["--reps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "adamw_cpu.json").read_text())
    contenders = {r["contender"] for r in payload["results"]}
    assert {"torch fused", "fusedopt cpu", "fusedopt reference", "stream (x.mul_(1.0))",
            "torch fused + fp32 master (3 passes)", "fusedopt cpu master"} <= contenders
    assert all(len(r["times_ms"]) == 2 and r["median_ms"] > 0 for r in payload["results"])
    assert payload["baselines"]["tiny|fp32"] == "torch fused"
    assert "| tiny | fp32 | fusedopt cpu |" in (tmp_path / "adamw_cpu.md").read_text()
    assert "PASS" not in printed and "MISS" not in printed
    try:
        import matplotlib  # noqa: F401

        png = (tmp_path / "adamw_cpu.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in printed
    assert run.main(["--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--check"]) == 0
    assert "(target >= 2)" in capsys.readouterr().out


def test_plot_is_skipped_with_its_reason_without_matplotlib(monkeypatch, tmp_path):
    report = shipped_module("bench", "report")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert "matplotlib is not installed" in report.plot({"results": []}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_readme_table_is_generated_from_the_committed_results():
    """README.md's CPU table is bench/results/ as `--readme` writes it: what
    the README cites is what was measured (rerun `python -m fusedopt bench
    --readme README.md` after committing new results)."""
    report = shipped_module("bench", "report")
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- bench-table:cpu -->\n", "\n<!-- /bench-table:cpu -->"
    assert start in text and end in text
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == report.readme_table("cpu", ROOT / "bench" / "results")
    assert "| adamw | 1x10M | fp32 | fusedopt cpu |" in table
