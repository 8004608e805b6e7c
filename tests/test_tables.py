"""The GPU backends' launch tables (fusedopt/backends/_tables.py): what their
cache keeps for CUDA graphs. Capture itself needs a GPU (tests/test_gpu.py);
here the capture test is patched so that the cache's rules run on the CPU."""
from __future__ import annotations

import pytest
import torch

from fusedopt.backends import _adafactor_tables, _tables

CPU = torch.device("cpu")


def tables_for(n: int):
    tensors = [torch.zeros(n + 1)]
    return tensors, _tables.launch_tables([tensors], CPU, 64)


def test_same_tensors_reuse_their_tables():
    tensors, first = tables_for(5)
    assert _tables.launch_tables([tensors], CPU, 64) is first
    assert first.numel.tolist() == [6] and first.n_chunks == 1


def test_a_table_used_during_a_capture_outlives_the_cache(monkeypatch):
    """A captured graph keeps the tables' addresses and never asks again:
    however many other launches follow, the table must not be dropped."""
    tensors, captured = tables_for(7)
    monkeypatch.setattr(_tables, "_capturing", lambda device: True)
    assert _tables.launch_tables([tensors], CPU, 64) is captured  # used by the capture
    monkeypatch.setattr(_tables, "_capturing", lambda device: False)
    others = [tables_for(100 + i) for i in range(_tables._CACHE_SIZE + 5)]  # noqa: F841 (kept alive)
    assert _tables.launch_tables([tensors], CPU, 64) is captured
    # one that was not captured is dropped and rebuilt after as many launches
    tensors2, plain = tables_for(9)
    more = [tables_for(300 + i) for i in range(_tables._CACHE_SIZE + 5)]  # noqa: F841
    assert _tables.launch_tables([tensors2], CPU, 64) is not plain


def test_new_tensors_during_a_capture_are_refused(monkeypatch):
    monkeypatch.setattr(_tables, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="while a CUDA graph was being captured"):
        _tables.launch_tables([[torch.zeros(11)]], CPU, 64)
    with pytest.raises(RuntimeError, match="while a CUDA graph was being captured"):
        _adafactor_tables.factored_tasks([torch.Size([3, 5])], CPU)
    with pytest.raises(RuntimeError, match="while a CUDA graph was being captured"):
        _adafactor_tables.factored_tables([torch.Size([3, 5])], CPU, 4, 4)
