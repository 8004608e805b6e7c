"""fusedopt's distributed layer, built on torch.distributed (NCCL on GPUs, gloo
on CPU): bucketed gradient all-reduce / reduce-scatter (GradBuckets), ZeRO
stage 1/2 sharding of the optimizer state (ZeroOptimizer), and the optimizer
side of pipeline parallelism (PipelineOptimizer, clip_grad_norm_ over the
stages, mark_shared)."""
from .grad_buckets import GradBucket, GradBuckets
from .pipeline import PipelineOptimizer, clip_grad_norm_, mark_shared
from .zero import ZeroOptimizer

__all__ = ["GradBucket", "GradBuckets", "PipelineOptimizer", "ZeroOptimizer", "clip_grad_norm_", "mark_shared"]
