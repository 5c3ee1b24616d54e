"""The merge engine: plan, task vectors, per-tensor schedule, streaming loop, CPU kernels."""
