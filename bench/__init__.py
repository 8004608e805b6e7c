"""fusedopt benchmarks (shipped in the wheel as ``fusedopt._bench``).

Run with ``python -m fusedopt bench [--device cuda] [--case ...]``. Each
benchmark times fusedopt against what a user would run instead, alternating
the contenders round by round after a warm-up, and reports medians, spread,
bytes moved and the share of a streaming bandwidth measured in the same rounds.
"""
