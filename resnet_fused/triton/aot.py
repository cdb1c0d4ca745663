"""Ahead-of-time compilation of every Triton kernel for a GPU target, on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` produces the PTX and cubin a
real launch would, provided the argument specialization matches: a launch marks 16-byte aligned
pointers and integers divisible by 16 (``tt.divisibility``), and a different kernel is built
where they are not (ResNeXt's ``cin_pg = 4``, an odd ``M``). So this module does not write
signatures by hand: it runs the package's own launchers (``bn_relu_conv``, ``conv_dgrad``, ...)
on small CPU tensors with ``launch`` replaced by a recorder, and hands each recorded call to
Triton's own launch-time specialization (the binder a ``kernel[grid](...)`` call uses, built for
the target instead of the current device). A kernel argument added later is picked up without
any change here; the shapes are chosen so that the integers a launch at real ResNet shapes marks
divisible by 16 are divisible here too (``divisible`` variants), or are not (``ragged``).

Registers and spills do not come from Triton's records (``n_regs`` / ``n_spills`` are filled only
when a kernel is loaded on a device): ``cuobjdump -res-usage`` on the cubin gives the registers
and the stack frame of the binary itself, ``ptxas -v`` on the PTX the spill stores and loads
(both the tools Triton bundles, so the same on triton 3.6 and 3.8).

Compiles run in a process pool (``RESNET_FUSED_AOT_JOBS`` workers, default: the usable cores);
Triton's on-disk cache makes a second run cheap. ``python -m resnet_fused.triton.aot`` prints the
records as JSON, ``{"triton", "entry_kernels", "records"}`` (``--jobs N``; ``--summary`` for a table
instead).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["HOPPER", "TRITON_DTYPES", "capture_launches", "launch_plan", "module_plan", "specialize",
           "compile_job", "resource_usage", "check_all", "entry_kernels", "summary", "plan_key", "RAGGED_DTYPES"]

HOPPER = GPUTarget("cuda", 90, 32)
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
#: The package's modules that launch kernels (each imports ``launch`` from ``launch.py``).
_KERNEL_MODULES = ("conv", "conv_backward", "stats", "elementwise", "bn_backward")
_PACKAGE = __name__.rsplit(".", 1)[0]


# ---- Recording the launches the package's launchers make -------------------------------------

@contextlib.contextmanager
def capture_launches() -> Iterator[list]:
    """Replace ``launch`` in every module of the package that uses it by a recorder: the block
    yields a list that fills with ``(kernel, grid, args, meta)``; nothing runs."""
    from . import launch as launch_module

    for name in _KERNEL_MODULES:
        importlib.import_module(f"{_PACKAGE}.{name}")
    calls: list = []

    def record(kernel, grid, guard, *args, **meta):
        calls.append((kernel, tuple(grid), args, dict(meta)))

    patched = [m for n, m in list(sys.modules.items())
               if n.startswith(_PACKAGE.split(".")[0] + ".") and getattr(m, "launch", None) is launch_module.launch]
    for m in patched:
        m.launch = record
    try:
        yield calls
    finally:
        for m in patched:
            m.launch = launch_module.launch


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor to hand a launcher (never read: the launch is only recorded); 4-d ones in
    channels_last, as the launchers would make them."""
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt)


# The shapes. ``divisible``: what a launch at real ResNet shapes marks (channels and M = N*H*W
# multiples of 16; spatial sizes 56/28/14/7 are not, nor are they here). ``ragged``: a batch of
# one at 7x7 (M = 49) and, for the 3x3, ResNeXt-50's grouped conv (128 channels, 32 groups:
# cin_pg = cout_pg = 4), as a real launch at batch 1 has them.
_N, _N_RAGGED = 16, 1


def _conv_launches(ksize: int, dtype: torch.dtype, config) -> list[tuple[str, Callable[[], Any]]]:
    """The forward conv's variants: ``train`` (prologue, projection K-loop, statistics epilogue,
    stride 2), ``eval`` (no prologue, residual add, folded BN+ReLU epilogue) and ``ragged`` (the
    train flags a real launch has at M = 49, grouped for the 3x3), each as the launcher calls it."""
    from .conv import SHORTCUT_ADD, SHORTCUT_NONE, SHORTCUT_PROJECTION, bn_relu_conv

    sd = torch.float64 if dtype == torch.float64 else torch.float32  # affines' dtype

    def vec(c: int) -> torch.Tensor:
        return torch.empty(c, dtype=sd)

    def train():
        c_in, c_out = 64, 128
        x = _t(_N, c_in, 14, 14, dtype=dtype)
        bn_relu_conv(x, _t(c_out, c_in, ksize, ksize, dtype=dtype), scale=vec(c_in), shift=vec(c_in), stride=2,
                     shortcut=x, shortcut_kind=SHORTCUT_PROJECTION, shortcut_stride=2,
                     proj_weight=_t(c_out, c_in, 1, 1, dtype=dtype), proj_scale=vec(c_in), proj_shift=vec(c_in),
                     emit_stats=True, config=config)

    def eval_():
        c = 128
        bn_relu_conv(_t(_N, c, 7, 7, dtype=dtype), _t(c, c, ksize, ksize, dtype=dtype),
                     shortcut=_t(_N, c, 7, 7, dtype=dtype), shortcut_kind=SHORTCUT_ADD,
                     post_scale=vec(c), post_shift=vec(c), config=config)

    def ragged():
        if ksize == 3:  # ResNeXt-50 conv2_x's grouped 3x3 (32 groups of 4 channels)
            c, groups = 128, 32
            bn_relu_conv(_t(_N_RAGGED, c, 7, 7, dtype=dtype), _t(c, c // groups, 3, 3, dtype=dtype),
                         scale=vec(c), shift=vec(c), groups=groups, shortcut_kind=SHORTCUT_NONE,
                         emit_stats=True, config=config)
        else:  # a bottleneck's last 1x1 with the identity added, at M = 49
            c_in, c_out = 64, 256
            bn_relu_conv(_t(_N_RAGGED, c_in, 7, 7, dtype=dtype), _t(c_out, c_in, 1, 1, dtype=dtype),
                         scale=vec(c_in), shift=vec(c_in), shortcut=_t(_N_RAGGED, c_out, 7, 7, dtype=dtype),
                         shortcut_kind=SHORTCUT_ADD, emit_stats=True, config=config)

    return [("train", train), ("eval", eval_), ("ragged", ragged)]


def _backward_launches(ksize: int, dtype: torch.dtype, cfg) -> list[tuple[str, Callable[[], Any]]]:
    """dgrad and wgrad as the block backward calls them: ``train`` (stride 2, BN-backward
    prologue, the projection's second K-loop on the 1x1 dgrad) and ``ragged`` (M = 49; grouped,
    cin_pg = 4, for the 3x3)."""
    from ..kernel_set import GradPrologue
    from .conv_backward import conv_dgrad, conv_wgrad

    sd = torch.float64 if dtype == torch.float64 else torch.float32
    dmeta = dict(block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    wmeta = dict(block_m=cfg.block_m, block_k=cfg.block_k, block_c=cfg.block_n,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def vec(c: int) -> torch.Tensor:
        return torch.empty(c, dtype=sd)

    def shapes(ragged: bool):
        if ragged:
            n, c_in, c_out, groups, stride = _N_RAGGED, (128 if ksize == 3 else 64), (128 if ksize == 3 else 256), \
                (32 if ksize == 3 else 1), 1
        else:
            n, c_in, c_out, groups, stride = _N, 64, 128, 1, 2
        h = 14 if stride == 2 else 7
        grad = _t(n, c_out, 7, 7, dtype=dtype)
        v = _t(n, c_in, h, h, dtype=dtype)
        return n, c_in, c_out, groups, stride, h, grad, v, GradPrologue(_t(n, c_out, 7, 7, dtype=dtype),
                                                                          vec(c_out), vec(c_out), vec(c_out))

    def dgrad(ragged: bool):
        n, c_in, c_out, groups, stride, h, grad, v, pro = shapes(ragged)
        extra = {}
        if ksize == 1 and not ragged:  # the projection's gradient joins the 1x1's (bn1's input)
            extra = dict(second_grad=_t(n, 256, 7, 7, dtype=dtype), second_weight=_t(256, c_in, 1, 1, dtype=dtype),
                         second_stride=2)
        conv_dgrad(grad, _t(c_out, c_in // groups, ksize, ksize, dtype=dtype), v, vec(c_in), vec(c_in), vec(c_in),
                   vec(c_in), stride=stride, groups=groups, prologue=pro, **extra, **dmeta)

    def wgrad(ragged: bool):
        n, c_in, c_out, groups, stride, h, grad, v, pro = shapes(ragged)
        conv_wgrad(grad, v, vec(c_in), vec(c_in), ksize=ksize, stride=stride, groups=groups, prologue=pro, **wmeta)

    return [("train", lambda: dgrad(False)), ("ragged", lambda: dgrad(True)),
            ("train", lambda: wgrad(False)), ("ragged", lambda: wgrad(True))]


def _small_launches(dtype: torch.dtype) -> list[tuple[str, Callable[[], Any]]]:
    """The statistics, BN-apply and BN-backward kernels at the GPU selector's block sizes."""
    from . import configs
    from .bn_backward import bn_backward_apply, bn_backward_coefficients, relu_grad_sums
    from .elementwise import bn_relu_apply
    from .stats import bn_finalize, channel_stats_partials
    from ..kernel_set import BNBackward

    sd = torch.float64 if dtype == torch.float64 else torch.float32
    stats = configs.stats_config(torch.device("cuda"))  # the GPU branch queries no device

    def vec(c: int) -> torch.Tensor:
        return torch.empty(c, dtype=sd)

    def x(ragged: bool, c: int = 256, hw: int = 7) -> torch.Tensor:
        return _t(_N_RAGGED if ragged else _N, c, hw, hw, dtype=dtype)

    out = []
    for ragged in (False, True):
        label = "ragged" if ragged else "divisible"
        c = 256
        out += [
            (label, lambda r=ragged: channel_stats_partials(x(r), stats.block_m, stats.block_c)),
            (label, lambda r=ragged: bn_relu_apply(x(r), vec(c), vec(c))),
            (label, lambda r=ragged: relu_grad_sums(x(r), x(r), vec(c), vec(c), vec(c), vec(c),
                                                    extra=None if r else x(r))),
            (label, lambda r=ragged: bn_backward_apply(
                x(r, hw=14 if not r else 7), x(r, hw=14 if not r else 7), BNBackward(*(vec(c) for _ in range(5))),
                shortcut_grad=None if r else x(r), shortcut_stride=2)),
        ]
        if dtype in (torch.float32, torch.float64):  # partials and coefficients are fp32 (fp64 for fp64)
            # P partial tiles: 98 (M = 12544 at BLOCK_M 128: the chunk pass runs first) and 1; an affine
            # norm, and one without.
            p = 1 if ragged else 98
            out += [
                (label, lambda r=ragged, p=p: bn_finalize(_t(3, p, c, dtype=dtype), None if r else vec(c),
                                                          None if r else vec(c), 1e-5,
                                                          block_p=stats.block_p, block_c=stats.block_c)),
                (label, lambda r=ragged, p=p: bn_backward_coefficients(_t(2, p, c, dtype=dtype), None if r else vec(c),
                                                                       vec(c), vec(c), 49 if r else 784,
                                                                       training=not r)),
            ]
    return out


#: The ragged variants are compiled for bf16 and not again for fp16: the two 16-bit kernels
#: differ only in their conversions (same tiles, same wgmma shapes), and a ragged compile of a
#: large GEMM costs as much as a divisible one.
RAGGED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def launch_plan() -> list[tuple[dict, Any, tuple, tuple, dict]]:
    """Every launch to compile: ``(info, kernel, grid, args, meta)``, info naming the variant,
    dtype, kernel size and config. Conv forward: every (ksize, dtype, config) the GPU selector
    can return (fp64 included) x train / eval, and ragged (:data:`RAGGED_DTYPES`); backward:
    dgrad and wgrad for every GPU backward config and dtype x 1x1 / 3x3 x train, and ragged;
    the statistics, BN-apply and BN-backward kernels per dtype, divisible and ragged."""
    from .configs import BACKWARD_GPU_CONFIGS, FP64_BACKWARD_CONFIG, all_conv_configs

    plan = []

    def run(info: dict, fn: Callable[[], Any], dtype: torch.dtype) -> None:
        if info["variant"] == "ragged" and dtype not in RAGGED_DTYPES:
            return
        with capture_launches() as calls:
            fn()
        if not calls:
            raise RuntimeError(f"launcher made no launch: {info}")
        for kernel, grid, args, meta in calls:
            plan.append((dict(info, kernel=_kernel_name(kernel)), kernel, grid, args, meta))

    for ksize, dtype, config in all_conv_configs():
        for variant, fn in _conv_launches(ksize, dtype, config):
            run(dict(variant=variant, ksize=ksize, dtype=TRITON_DTYPES[dtype], config=_config_dict(config)), fn, dtype)
    backward = [(d, cfg) for sixteen, cfg in BACKWARD_GPU_CONFIGS.items()
                for d in ((torch.bfloat16, torch.float16) if sixteen else (torch.float32,))]
    backward.append((torch.float64, FP64_BACKWARD_CONFIG))
    for dtype, cfg in backward:
        for ksize in (1, 3):
            for variant, fn in _backward_launches(ksize, dtype, cfg):
                run(dict(variant=variant, ksize=ksize, dtype=TRITON_DTYPES[dtype], config=_config_dict(cfg)), fn,
                    dtype)
    for dtype in TRITON_DTYPES:
        for variant, fn in _small_launches(dtype):
            run(dict(variant=variant, dtype=TRITON_DTYPES[dtype]), fn, dtype)
    return plan


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def _config_dict(config) -> dict:
    return {k: getattr(config, k) for k in ("block_m", "block_n", "block_k", "num_warps", "num_stages")}


# ---- The GPU run's launches, recorded from real module calls -----------------------------------

#: What :func:`module_plan` runs: the quick GPU run's block families (pre-activation ResNet-50 and
#: ResNeXt-50 units, torchvision's post-activation unit), at unit shapes whose launch flags and
#: selector configs differ (a stride-1 and a strided projection unit, a narrow and a wide identity
#: unit), batch 16 (the divisibility marks of batch 32 and 256), in bf16 and fp16, train (forward
#: + backward), eval and frozen (no parameter gradients), under both 3x3 strategies; and the AMP
#: stage chain (two chained blocks of conv3_x under autocast) in bf16 and fp16.
MODULE_PLAN_UNITS = {"bottleneck": ("conv2_x.first", "conv2_x.identity", "conv3_x.first", "conv4_x.identity"),
                     "resnext": ("conv2_x.first", "conv3_x.first", "conv4_x.identity"),
                     "postact": ("conv2_x.first", "conv2_x.identity", "conv3_x.first", "conv4_x.identity")}
MODULE_PLAN_BATCH = 16


def _module_plan_block(family: str, unit, backend: str) -> torch.nn.Module:
    import resnet_fused as rf

    if family == "postact":
        downsample = None
        if unit.stride != 1 or unit.in_chs != unit.out_chs:
            downsample = torch.nn.Sequential(torch.nn.Conv2d(unit.in_chs, unit.out_chs, 1, stride=unit.stride,
                                                             bias=False), torch.nn.BatchNorm2d(unit.out_chs))
        return rf.FusedPostActBottleneck(unit.in_chs, unit.mid_chs, stride=unit.stride, downsample=downsample,
                                         backend=backend)
    return rf.make_block(unit.block, backend=backend, **unit.block_kwargs())


def _stage_chain(unit) -> torch.nn.Module:
    import dataclasses

    import resnet_fused as rf

    config = dataclasses.replace(rf.MODEL_CONFIGS["resnet_v2_50"], layers=(1, 2, 1, 1),
                                 channels=(unit.in_chs, unit.out_chs, unit.out_chs, unit.out_chs))
    return rf.ResNetV2(config, backend="triton").stages[1].blocks


def module_plan(batch: int = MODULE_PLAN_BATCH) -> list[tuple[dict, Any, tuple, tuple, dict]]:
    """Every launch the GPU run's modules make (:data:`MODULE_PLAN_UNITS`), recorded from real
    module calls on CPU tensors: the selector answering as on sm_90 (``configs.selecting_for``),
    ``launch`` replaced by the recorder (nothing runs: outputs are uninitialised, which no
    launch decision reads). The kernels must have been decorated without the interpreter (this
    process's TRITON_INTERPRET unset at import), so that each recorded kernel compiles; the ops
    take the Triton path on CPU tensors while TRITON_INTERPRET=1, which is set for the recording
    only. Same tuples as :func:`launch_plan`."""
    from resnet_fused.configs import resnet50_stage_units

    from . import configs
    for name in _KERNEL_MODULES + ("postact_elementwise", "postact_wgrad"):
        importlib.import_module(f"{_PACKAGE}.{name}")
    plan: list = []
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"

    def record(info: dict, module: torch.nn.Module, x: torch.Tensor, mode: str, amp: Optional[torch.dtype]) -> None:
        with capture_launches() as calls, torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            if mode == "eval":
                module.eval()
                with torch.no_grad():
                    module(x)
            else:
                module.train()
                if mode == "frozen":
                    for p in module.parameters():
                        p.requires_grad_(False)
                xi = x.detach().requires_grad_(True)
                out = module(xi)
                out.float().sum().backward()
        if not calls:
            # The ops took the eager path for CPU tensors: the dispatch no longer follows
            # TRITON_INTERPRET per call, and this recording would silently cover nothing.
            raise RuntimeError(f"module_plan: no Triton launch recorded for {info} ({mode})")
        for kernel, grid, args, meta in calls:
            plan.append((dict(info, mode=mode, kernel=_kernel_name(kernel)), kernel, grid, args, meta))

    try:
        with configs.selecting_for((9, 0)), torch.random.fork_rng():
            torch.manual_seed(0)
            for family, names in MODULE_PLAN_UNITS.items():
                shapes = {u.name: u for u in resnet50_stage_units(
                    "resnext_v2_50_32x4d" if family == "resnext" else "resnet_v2_50")}
                for name in names:
                    unit = shapes[name]
                    for dtype in (torch.bfloat16, torch.float16):
                        for strategy in configs.STRATEGIES:
                            with configs.forced_configs(strategy=strategy):
                                for mode in ("train", "eval", "frozen"):
                                    block = _module_plan_block(family, unit, "triton").to(dtype)
                                    block = block.to(memory_format=torch.channels_last)
                                    x = torch.empty(unit.input_shape(batch), dtype=dtype).contiguous(
                                        memory_format=torch.channels_last).normal_()
                                    info = dict(variant="module", family=family, unit=name, dtype=TRITON_DTYPES[dtype],
                                                strategy=strategy)
                                    record(info, block, x, mode, None)
            unit = {u.name: u for u in resnet50_stage_units("resnet_v2_50")}["conv3_x.first"]
            for amp in (torch.bfloat16, torch.float16):
                for strategy in configs.STRATEGIES:
                    with configs.forced_configs(strategy=strategy):
                        chain = _stage_chain(unit).to(memory_format=torch.channels_last)
                        x = torch.empty(unit.input_shape(batch), dtype=amp).contiguous(
                            memory_format=torch.channels_last).normal_()
                        info = dict(variant="stage-amp", family="stage", unit=unit.name, dtype=TRITON_DTYPES[amp],
                                    strategy=strategy)
                        for mode in ("train", "eval"):
                            record(info, chain, x, mode, amp)
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
    return plan


def plan_key(job: dict) -> str:
    """What makes two specialized launches one compile (Triton's cache key inputs)."""
    return repr((job["name"], sorted(job["signature"].items()), sorted(job["constexprs"].items()),
                 sorted(job["attrs"].items()), sorted(job["options"].items())))


# ---- Specialization, compile, resource usage -------------------------------------------------

def specialize(kernel, args: tuple, meta: dict, target: GPUTarget = HOPPER) -> dict:
    """What ``kernel[grid](*args, **meta)`` would compile on ``target``: Triton's own binder
    and argument packing (triton 3.6-3.8: ``create_function_from_signature`` and
    ``JITFunction._pack_args``), for the target instead of the current device."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    meta = dict(meta)
    meta["debug"] = meta.get("debug", getattr(kernel, "debug", None)) or knobs.runtime.debug
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    divisible = sorted(n for (i, *_), a in attrs.items() for n in [kernel.arg_names[i]]
                       if ["tt.divisibility", 16] in a and not signature[n].startswith("*"))
    return dict(module=kernel.fn.__module__ if hasattr(kernel, "fn") else kernel.__module__,
                name=_kernel_name(kernel), signature=signature, constexprs=constexprs, attrs=attrs,
                options=dict(options.__dict__), target=target, divisible=divisible)


def compile_job(job: dict) -> dict:
    """Compile one specialized launch (in a pool worker); the record of what came out, with the
    CPU seconds it took (``cpu_s``: this process and its ptxas children)."""
    import resource
    import time

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, wall = cpu(), time.perf_counter()
    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
    try:
        compiled = triton.compile(src, target=job["target"], options=job["options"])
    except Exception as e:  # reported per kernel, so one failure does not hide the others
        return dict(job["info"], error=f"{type(e).__name__}: {str(e)[-2000:]}")
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    usage = resource_usage(compiled.asm["cubin"], ptx, job["target"].arch)
    return dict(job["info"], divisible=job["divisible"], wgmma="wgmma.mma_async" in ptx, shared=meta.shared,
                target=f"sm_{job['target'].arch}", triton=triton.__version__, **usage,
                cpu_s=round(cpu() - start, 2), wall_s=round(time.perf_counter() - wall, 2))


def _tool(name: str) -> str:
    from triton import knobs

    try:
        path = getattr(knobs.nvidia, name).path
        if path:
            return path
    except Exception:
        pass
    for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if d and os.path.exists(os.path.join(d, "bin", name)):
            return os.path.join(d, "bin", name)
    raise FileNotFoundError(f"{name}: neither Triton's bundled copy nor $CUDA_HOME/bin has it")


def resource_usage(cubin: bytes, ptx: str, arch: int) -> dict:
    """``registers`` and ``stack`` (bytes per thread) of the cubin itself, from
    ``cuobjdump -res-usage``; ``spill_stores`` / ``spill_loads`` (bytes) from ``ptxas -v`` on the
    PTX where the stack is not empty (spills live in the stack frame: an empty one has none, and
    ptxas is not run again for it). A value the tools did not print stays None (the tests
    require them)."""
    usage: dict[str, Any] = dict(registers=None, stack=None, spill_stores=None, spill_loads=None)
    with tempfile.TemporaryDirectory() as d:
        cubin_path, ptx_path = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True).stdout
        if m := re.search(r"REG:(\d+)\s+STACK:(\d+)", res):
            usage["registers"], usage["stack"] = int(m.group(1)), int(m.group(2))
        if usage["stack"] == 0:
            usage.update(spill_stores=0, spill_loads=0, spills_from="empty stack")
            return usage
        with open(ptx_path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name=sm_{arch}{suffix}", ptx_path, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True)
        text = log.stdout + log.stderr
        if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
            usage.update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)), spills_from="ptxas -v")
        if m := re.search(r"Used (\d+) registers", text):
            usage["ptxas_registers"] = int(m.group(1))
    return usage


def entry_kernels() -> set[str]:
    """The names of every launchable Triton kernel of the package (``*_kernel`` JIT functions in
    the kernel modules; the ``@triton.jit`` helpers they call are inlined, not launched)."""
    from triton.runtime.jit import JITFunction

    names = set()
    for mod_name in _KERNEL_MODULES:
        mod = importlib.import_module(f"{_PACKAGE}.{mod_name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                names.add(name)
    return names


def _default_jobs() -> int:
    env = os.environ.get("RESNET_FUSED_AOT_JOBS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def check_all(target: GPUTarget = HOPPER, jobs: Optional[int] = None, progress: bool = False,
              modules: bool = False) -> list[dict]:
    """Compile every launch of :func:`launch_plan` and (``modules``) of :func:`module_plan` for
    ``target``; one record per launch (a compile error is a record with ``error``). Identical
    specializations compile once; each record's ``key`` is its :func:`plan_key`."""
    plan = launch_plan() + (module_plan() if modules else [])
    unique: dict[str, dict] = {}
    order = []
    for info, kernel, grid, args, meta in plan:
        job = specialize(kernel, args, meta, target)
        key = plan_key(job)
        job["info"] = dict(info, grid=list(grid), key=key)
        unique.setdefault(key, job)
        order.append((key, job["info"]))
    # Largest first (the 16-bit GEMMs), so the pool ends evenly.
    keys = sorted(unique, key=lambda k: -_cost(unique[k]))
    jobs = jobs or _default_jobs()
    if jobs == 1:
        results = {k: compile_job(unique[k]) for k in keys}
    else:
        import concurrent.futures
        import multiprocessing

        results = {}
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(compile_job, unique[k]): k for k in keys}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                results[futures[future]] = r = future.result()
                if progress:
                    print(f"[aot {done}/{len(keys)}] {summary([r], header=False)} {r.get('cpu_s')} s",
                          file=sys.stderr, flush=True)
    records = []
    for key, info in order:  # every launch of the plan, duplicates sharing one compile
        rec = dict(results[key], **info)
        records.append(rec)
    return records


def _cost(job: dict) -> int:
    c = job["constexprs"]
    get = {job_name: v for (i,), v in c.items() for job_name in [list(job["signature"])[i]]}
    blocks = 1
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C"):
        blocks *= int(get.get(k, 1) or 1)
    return blocks * int(get.get("KSIZE", 1) or 1)


def summary(records: list[dict], header: bool = True) -> str:
    """One line per compiled variant: kernel, variant, dtype, ksize, tiles, registers, stack,
    spills, shared memory, wgmma."""
    lines = [f"{'kernel':34} {'variant':9} {'dtype':5} k {'tiles (MxNxK w s)':20} regs stack spill shared wgmma"
             ] if header else []
    for r in records:
        cfg = r.get("config")
        tiles = (f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']} {cfg['num_warps']} {cfg['num_stages']}"
                 if cfg else "-")
        if "error" in r:
            lines.append(f"{r['kernel']:34} {r['variant']:9} {r['dtype']:5} {r.get('ksize', '-')} {tiles:20} "
                         f"ERROR {r['error'][:80]}")
            continue
        lines.append(f"{r['kernel']:34} {r['variant']:9} {r['dtype']:5} {r.get('ksize', '-')} {tiles:20} "
                     f"{r['registers']!s:>4} {r['stack']!s:>5} {r['spill_stores']!s:>5} {r['shared']:>6} "
                     f"{'yes' if r['wgmma'] else 'no'}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("resnet_fused.triton.aot: unset TRITON_INTERPRET (interpreted kernels do not compile)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the usable cores)")
    parser.add_argument("--summary", action="store_true", help="a table instead of JSON")
    parser.add_argument("--modules", action="store_true",
                        help="also compile module_plan(): every variant the GPU run's modules launch")
    ns = parser.parse_args()
    # Through the package's module, not this __main__ copy: pool workers import it by name.
    from resnet_fused.triton import aot as _aot

    out = _aot.check_all(jobs=ns.jobs, progress=True, modules=ns.modules)
    if ns.summary:
        print(_aot.summary(out))
    else:
        print(json.dumps(dict(triton=triton.__version__, entry_kernels=sorted(_aot.entry_kernels()), records=out),
                         indent=1, default=str))
