"""fusedopt's distributed layer, built on torch.distributed (NCCL on GPUs, gloo
on CPU): bucketed gradient all-reduce / reduce-scatter (GradBuckets)."""
from .grad_buckets import GradBucket, GradBuckets

__all__ = ["GradBucket", "GradBuckets"]
