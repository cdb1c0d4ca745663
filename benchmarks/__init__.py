"""Benchmarks of resnet_fused: the block and model benchmarks, their shared harness, and the
roofline floors of the fusion plan.

    python benchmarks/bench_blocks.py --help      # eager vs torch.compile vs fused backends, per block
    python benchmarks/bench_models.py --help      # whole models: training and inference images/s
    python -m benchmarks.roofline                 # the per-kernel floors of docs/design.md section 7

A package so that tests can import ``benchmarks.roofline`` (and call its ``self_check()``) on a
machine without a GPU.
"""
