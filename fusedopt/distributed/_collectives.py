"""The torch.distributed collectives fusedopt uses, under one name each: the
newer single-tensor names where this torch has them (torch 2.13:
``reduce_scatter_single`` / ``all_gather_single``), the older ones otherwise."""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def reduce_scatter(output: Tensor, input: Tensor, group=None, async_op: bool = False):
    """output (input.numel() / world elements) = this rank's chunk of the SUM over ranks of input."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_gather(output: Tensor, input: Tensor, group=None, async_op: bool = False):
    """output (world x input.numel() elements) = every rank's input, in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def all_reduce(tensor: Tensor, group=None, async_op: bool = False):
    """tensor = the SUM over ranks (averaging is a separate scale: gloo has no PREMUL_SUM)."""
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_to_all(output: Tensor, input: Tensor, group=None, async_op: bool = False, output_split_sizes=None,
               input_split_sizes=None):
    """Chunk r of input goes to rank r; chunk r of output comes from rank r
    (equal chunks, or the given split sizes)."""
    return dist.all_to_all_single(output, input, output_split_sizes=output_split_sizes,
                                  input_split_sizes=input_split_sizes, group=group, async_op=async_op)
