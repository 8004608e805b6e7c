"""Rewrite CUDA launches `kernel<...><<<grid, threads, smem, stream>>>(args)`
as `::emu::launch(grid, threads, [&] { kernel<...>(args); })`, the one piece of
CUDA syntax that C++ cannot parse (tests/cuda_emu/cuda_emu.h runs the rest)."""
from __future__ import annotations

import re


def split_top_level(text: str) -> list[str]:
    """Split a launch configuration at the commas outside parentheses and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _callee_start(src: str, end: int) -> int:
    """Where the kernel expression ending at `end` (just before <<<) begins:
    an identifier, maybe qualified, maybe with template arguments."""
    i = end
    if src[i - 1] == ">":  # template arguments, balanced (angle brackets inside parentheses do not count)
        depth = parens = 0
        while True:
            i -= 1
            if src[i] == ")":
                parens += 1
            elif src[i] == "(":
                parens -= 1
            elif src[i] == ">" and parens == 0:
                depth += 1
            elif src[i] == "<" and parens == 0:
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def _matching_paren(src: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses after a launch")


def translate(src: str) -> str:
    out = src
    while (at := out.find("<<<")) >= 0:
        close = out.index(">>>", at)
        config = split_top_level(out[at + 3:close])
        args_open = close + 3
        while out[args_open].isspace():
            args_open += 1
        if out[args_open] != "(":
            raise ValueError(f"a launch without arguments near: {out[at - 60:at + 60]!r}")
        args_close = _matching_paren(out, args_open)
        start = _callee_start(out, at)
        callee = out[start:at]
        call = f"::emu::launch({config[0]}, {config[1]}, [&] {{ {callee}{out[args_open:args_close + 1]}; }})"
        out = out[:start] + call + out[args_close + 1:]
    return re.sub(r"#include <cuda_runtime.h>", '#include "cuda_emu.h"', out)
