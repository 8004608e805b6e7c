"""fusedopt's distributed layer, built on torch.distributed (NCCL on GPUs, gloo
on CPU): bucketed gradient all-reduce / reduce-scatter (GradBuckets) and ZeRO
stage 1/2 sharding of the optimizer state (ZeroOptimizer)."""
from .grad_buckets import GradBucket, GradBuckets
from .zero import ZeroOptimizer

__all__ = ["GradBucket", "GradBuckets", "ZeroOptimizer"]
