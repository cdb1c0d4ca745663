"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` produces the PTX and cubin
a real launch would, provided the argument attributes match: a real launch marks 16-byte
aligned pointers and integers divisible by 16 (``tt.divisibility``), and without those marks
Triton builds a different, unpipelined kernel. Used by the tests to prove that every config the
selector can return compiles for sm_90 (wgmma for 16-bit operands, shared memory in budget).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["compile_kernel", "TRITON_DTYPES", "HOPPER"]

HOPPER = GPUTarget("cuda", 90, 32)
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def compile_kernel(kernel: Any, pointer_dtypes: dict[str, str], constexprs: dict[str, Any],
                   divisible_by_16: Iterable[str] = (), target: GPUTarget = HOPPER,
                   num_warps: int = 4, num_stages: int = 2):
    """Compile ``kernel`` for ``target``; returns Triton's CompiledKernel (``.asm``, ``.metadata``).

    ``pointer_dtypes`` names each pointer argument's element type ("bf16", "fp32", ...); other
    non-constexpr arguments are i32. Pointers are taken 16-byte aligned, as the caching
    allocator gives them; integers in ``divisible_by_16`` are marked as a launch would mark them.
    """
    names = kernel.arg_names
    signature, attrs = {}, {}
    divisible = set(divisible_by_16)
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_dtypes:
            signature[name] = "*" + pointer_dtypes[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"no signature for arguments {missing}")
    const = {(names.index(n),): v for n, v in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(source, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


# ---- The sm_90 check of every config the selector can return --------------------------

# Integer arguments that a launch at real ResNet shapes has divisible by 16 (channel counts;
# M = N*H*W at batch 256); spatial sizes (56, 28, 14, 7) are not all, so they stay unmarked.
_CONV_DIVISIBLE = ("M", "C_in", "C_out", "cin_pg", "cout_pg", "C_sc")
_CONV_DATA_POINTERS = ("x_ptr", "w_ptr", "out_ptr", "sc_ptr", "sc_w_ptr")


def conv_variants() -> dict[str, dict]:
    """Two variants cover every constexpr branch the block forward uses: train (prologue,
    statistics epilogue, projection K-loop, stride 2) and eval (no prologue, folded BN+ReLU
    epilogue, residual add, stride 1)."""
    from .conv import SHORTCUT_ADD, SHORTCUT_PROJECTION

    return {
        "train": dict(STRIDE=2, SC_STRIDE=2, PROLOGUE=True, SHORTCUT=SHORTCUT_PROJECTION,
                      SC_PROLOGUE=True, EMIT_STATS=True, POST_BN_RELU=False),
        "eval": dict(STRIDE=1, SC_STRIDE=1, PROLOGUE=False, SHORTCUT=SHORTCUT_ADD,
                     SC_PROLOGUE=False, EMIT_STATS=False, POST_BN_RELU=True),
    }


def check_all(target: GPUTarget = HOPPER) -> list[dict]:
    """Compile every (config, variant) of the fused conv and the statistics kernels.

    Returns one record per kernel: name, config, whether the PTX uses wgmma, shared memory,
    registers and spills (from the cubin's metadata where Triton reports them).
    """
    from . import conv, stats
    from .configs import all_conv_configs

    records = []
    kernel = conv._bn_relu_conv_kernel
    for ksize, dtype, config in all_conv_configs():
        pointers = {n: (TRITON_DTYPES[dtype] if n in _CONV_DATA_POINTERS else "fp32")
                    for n in kernel.arg_names if n.endswith("_ptr")}
        for variant, flags in conv_variants().items():
            constexprs = dict(KSIZE=ksize, DOT_PRECISION=conv.dot_precision(dtype), BLOCK_M=config.block_m,
                              BLOCK_N=config.block_n, BLOCK_K=config.block_k, **flags)
            compiled = compile_kernel(kernel, pointers, constexprs, _CONV_DIVISIBLE, target,
                                      config.num_warps, config.num_stages)
            records.append(_record("_bn_relu_conv_kernel", compiled, ksize=ksize, dtype=TRITON_DTYPES[dtype],
                                   variant=variant, config=config.__dict__))
    records += _backward_records(target)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        compiled = compile_kernel(stats._channel_stats_partial_kernel,
                                  {"x_ptr": TRITON_DTYPES[dtype], "part_ptr": "fp32"},
                                  dict(BLOCK_M=128, BLOCK_C=64), ("C", "stride_m"), target)
        records.append(_record("_channel_stats_partial_kernel", compiled, dtype=TRITON_DTYPES[dtype]))
    finalize = stats._bn_finalize_kernel
    compiled = compile_kernel(finalize, {n: "fp32" for n in finalize.arg_names if n.endswith("_ptr")},
                              dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_P=64, BLOCK_C=64), ("C",), target)
    records.append(_record("_bn_finalize_kernel", compiled, dtype="fp32"))
    return records


def _backward_records(target: GPUTarget) -> list[dict]:
    """The fused dgrad (with the BN-backward prologue and the projection K-loop) and wgrad
    kernels, 1x1 and 3x3 (stride 2), for every GPU backward config and dtype."""
    from . import conv_backward as bw
    from .configs import BACKWARD_GPU_CONFIGS
    from .conv import dot_precision

    records = []
    for sixteen, cfg in BACKWARD_GPU_CONFIGS.items():
        for dtype in ((torch.bfloat16, torch.float16) if sixteen else (torch.float32,)):
            data = TRITON_DTYPES[dtype]
            for ksize in (1, 3):
                kernels = {
                    "_conv_dgrad_kernel": (bw._conv_dgrad_kernel, ("g_ptr", "gy_ptr", "w_ptr", "g2_ptr", "w2_ptr", "v_ptr", "out_ptr"),
                                           dict(STRIDE=2, STRIDE2=2, PROLOGUE=True, SECOND=ksize == 1, BLOCK_M=cfg.block_m,
                                                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
                                           ("M", "C_in", "C_out", "cin_pg", "cout_pg", "K2")),
                    "_conv_wgrad_kernel": (bw._conv_wgrad_kernel, ("g_ptr", "gy_ptr", "v_ptr"),
                                           dict(STRIDE=2, PROLOGUE=True, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                                                BLOCK_C=cfg.block_n),
                                           ("M", "C_out", "C_in", "cin_pg", "cout_pg", "rows_per_split")),
                }
                for name, (kernel, data_ptrs, flags, divisible) in kernels.items():
                    pointers = {n: (data if n in data_ptrs else "fp32") for n in kernel.arg_names if n.endswith("_ptr")}
                    constexprs = dict(KSIZE=ksize, DOT_PRECISION=dot_precision(dtype), **flags)
                    compiled = compile_kernel(kernel, pointers, constexprs, divisible, target,
                                              cfg.num_warps, cfg.num_stages)
                    records.append(_record(name, compiled, ksize=ksize, dtype=data, config=cfg.__dict__))
    return records


def _record(name: str, compiled, **info) -> dict:
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    return dict(kernel=name, **info, wgmma="wgmma.mma_async" in ptx, shared=meta.shared,
                target=f"sm_{meta.target.arch}" if hasattr(meta, "target") else "sm_90",
                registers=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None))


if __name__ == "__main__":
    import json
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("resnet_fused.triton.aot: unset TRITON_INTERPRET (interpreted kernels do not compile)")
    print(json.dumps(check_all(), indent=1))
