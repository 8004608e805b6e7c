"""The CUDA backend's binding compiles against torch's headers on a machine
without CUDA (it includes no CUDA header), and every .cu compiles with nvcc
when nvcc is present (.ci/run also checks sm_80 and sm_90); the standalone
bench loops (bench/native/) compile against the current headers."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def test_cuda_binding_compiles_without_cuda_headers():
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH")
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC / 'include'}"]
    out = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", *flags, str(CSRC / "bindings_cuda.cpp")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.skipif(os.environ.get("FUSEDOPT_NVCC_CHECKED") == "1",
                    reason=".ci/run compiled every .cu (sm_80, sm_90) and linked them with the binding before the suite")
@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_cuda_sources_compile(source, tmp_path):
    out = subprocess.run(["nvcc", "-c", "-std=c++17", "--fmad=false", "-gencode=arch=compute_90,code=sm_90",
                          f"-I{CSRC / 'include'}", str(CSRC / "cuda" / source), "-o", str(tmp_path / "x.o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "bench" / "native").glob("*.cpp")))
def test_native_bench_loops_compile(source):
    """bench/native/*.cpp include the kernels' headers: keep them building as those change."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH")
    # -march=native: a loop behind an instruction-set test (#if __AVX512BF16__) is checked where the CPU has it
    out = subprocess.run([cxx, "-std=c++17", "-fopenmp", "-march=native", "-fsyntax-only", f"-I{CSRC / 'include'}",
                          str(ROOT / "bench" / "native" / source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_every_source_is_built(monkeypatch, tmp_path):
    """The extensions build their binding and every kernel file of their
    folder, a new one included, and no header (a file left out would leave
    its launcher undefined until the library is loaded)."""
    from fusedopt import _jit

    assert "cpu/adamw.cpp" in _jit.SPECS["cpu"].sources and "cuda/adamw.cu" in _jit.SPECS["cuda"].sources
    for name in ("cpu/new_op.cpp", "cpu/new_op.h", "cuda/new_op.cu", "cuda/new_op.cuh", "include/x.h"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    monkeypatch.setattr(_jit, "csrc_dir", lambda: tmp_path)
    assert _jit.SPECS["cpu"].sources == ("bindings_cpu.cpp", "cpu/new_op.cpp")
    assert _jit.SPECS["cuda"].sources == ("bindings_cuda.cpp", "cuda/new_op.cu")


def _header(name: str) -> str:
    return (CSRC / "include" / "fusedopt" / name).read_text()


def test_adafactor_tables_agree_with_the_header():
    """The Python side builds what csrc/include/fusedopt/adafactor.h reads:
    as many table rows as AdafactorRow has (Triton's ROW_* numbered the same),
    the CUDA task layout's parts in AdafactorLayout's field order, and the
    same rows per task and columns per column program (a mismatch would make
    the kernels skip rows silently)."""
    import re

    from fusedopt.backends import _adafactor_tables

    header = _header("adafactor.h")
    enum = header[header.index("enum AdafactorRow"):]
    rows = dict(re.findall(r"(kAf\w+) = (\d+)", enum[:enum.index("};")]))
    assert int(re.search(r"kAdafactorRows = (\d+)", header).group(1)) == len(_adafactor_tables.ADAFACTOR_ROWS)
    assert sorted(int(v) for v in rows.values()) == list(range(len(_adafactor_tables.ADAFACTOR_ROWS)))
    triton = dict(re.findall(r"^(ROW_\w+) = tl\.constexpr\((\d+)\)", (ROOT / "kernels" / "adafactor.py").read_text(),
                             re.M))
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k[3:]).lower(): int(v) for k, v in rows.items()}  # kAfRowVar: row_var
    assert {k[4:].lower(): int(v) for k, v in triton.items()} == snake
    layout = header[header.index("struct AdafactorLayout"):]
    fields = re.findall(r"const int64_t\* (\w+);", layout[:layout.index("};")])
    assert tuple(fields) == _adafactor_tables.FACTORED_TASK_PARTS
    assert int(re.search(r"kAfTaskRows = (\d+)", header).group(1)) == _adafactor_tables.TASK_ROWS
    assert int(re.search(r"kAfColBlock = (\d+)", header).group(1)) == _adafactor_tables.COL_BLOCK


def test_moment_rows_agree_with_the_header():
    """The Adam-family table rows (AdamW, LAMB, Sophia) are numbered the same
    in csrc/include/fusedopt/multi_tensor.h, kernels/_table.py and
    MOMENT_ROWS, the order the Python side fills them in."""
    import re

    from fusedopt.backends import _tables

    header = _header("multi_tensor.h")
    enum = header[header.index("enum MomentRow"):]
    rows = {k: int(v) for k, v in re.findall(r"kRow(\w+) = (\d+)", enum[:enum.index("};")])}
    cpp = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in rows.items()}  # kRowExpAvgSq: exp_avg_sq
    triton = {k[4:].lower(): int(v) for k, v in
              re.findall(r"^(ROW_\w+) = tl\.constexpr\((\d+)\)", (ROOT / "kernels" / "_table.py").read_text(), re.M)}
    assert triton == cpp
    assert int(re.search(r"kMomentRows = (\d+)", enum).group(1)) == len(_tables.MOMENT_ROWS)
    # MOMENT_ROWS names the lists (plural); the FP8 weight copies' row is kRowFp8
    python = {name.removesuffix("s").replace("fp8_weight", "fp8"): i for i, name in enumerate(_tables.MOMENT_ROWS)}
    assert python == cpp


def _cpp_parameters(text: str, function: str) -> list[str]:
    """The parameter names of `function`'s definition in `text`, in order."""
    import re

    from cuda_emu.translate import split_top_level

    match = re.search(rf"^[A-Za-z_][\w:<>, ]*?[\s&*]{function}\(", text, re.M)
    assert match, function
    start = end = match.end()
    depth = 1
    while depth:
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    return [re.findall(r"\w+", p)[-1] for p in split_top_level(text[start:end - 1])]


@pytest.mark.parametrize("bindings", ["bindings_cpu.cpp", "bindings_cuda.cpp"])
def test_schemas_name_the_binding_parameters_in_order(bindings):
    """torch passes an op's arguments to its C++ function by position: the
    schema (what the backends call by name) and the function's parameters must
    list the same names in the same order, or two arguments of one type would
    swap silently."""
    import re

    from cuda_emu.translate import split_top_level

    text = (CSRC / bindings).read_text()
    impls = dict(re.findall(r'm\.impl\("(\w+)",\s*&(\w+)\)', text))
    checked = set()
    for match in re.finditer(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)(?:,\s*&(\w+))?\)', text):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(1)))
        name = schema[:schema.index("(")]
        arguments = [a.split("=")[0].split()[-1] for a in split_top_level(schema[len(name) + 1:schema.rindex(") ->")])]
        assert _cpp_parameters(text, match.group(2) or impls[name]) == arguments, name
        checked.add(name)
    assert len(checked) >= 10 and (not impls or checked == set(impls)), checked


def test_emulator_translates_every_launch():
    """tests/cuda_emu rewrites each `kernel<...><<<grid, threads, smem, stream>>>(args)`
    (the one piece of CUDA syntax C++ cannot parse) into a call of its launcher,
    and leaves none behind in any .cu."""
    from cuda_emu.translate import translate

    src = ("  if (x) combine_kernel<true><<<grid, kThreads, 0, stream>>>(partials, f(a, b), out);\n"
           "  ns::k<P, S, (N > 2)><<<dim3(unsigned(n)), 256>>>(tt, h);\n#include <cuda_runtime.h>\n")
    assert translate(src) == (
        "  if (x) ::emu::launch(grid, kThreads, [&] { combine_kernel<true>(partials, f(a, b), out); });\n"
        "  ::emu::launch(dim3(unsigned(n)), 256, [&] { ns::k<P, S, (N > 2)>(tt, h); });\n#include \"cuda_emu.h\"\n")
    for source in (CSRC / "cuda").glob("*.cu"):
        assert "<<<" not in translate(source.read_text()), source.name
