"""The production tile configs, checked numerically (not only compiled).

Every other Triton parity test forces 16x16x16 tiles. Here each kernel (the forward conv 1x1 and
3x3, dgrad and wgrad 1x1 and 3x3) runs with the GPU selector's own configs, at shapes that fill
them: M, N and K each span two tiles, the second one partial, so that the tile loops, the masks
of partial tiles and the cross-tile statistics all run at the real block sizes.

* On the CPU the selector returns the interpreter's config, so every config of the GPU table
  (``configs.all_conv_configs()``, ``configs.BACKWARD_GPU_CONFIGS``) is forced explicitly and run
  through the interpreter in fp32 and fp16 (num_stages means nothing to the interpreter; the
  block sizes are what is checked).
* On a GPU the same forced cases run in bf16 too, and ``test_selector_choice`` runs the same
  shapes unforced: the selector's own choice, asserted to span two tiles in M, N and K. fp32 runs
  with TF32 off in both implementations there (the 2x-eager rule would otherwise compare two
  different TF32 roundings).

Each result is compared with ATen (same dtype: "eager"; float64 of the same rounded inputs:
"exact") by the suite's rule (helpers.assert_parity), and the Triton kernels are asserted to
have launched.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, assert_parity, requires_triton
from resnet_fused.kernel_set import GradPrologue
from resnet_fused.triton import configs
from resnet_fused.triton.conv import SHORTCUT_PROJECTION, ConvConfig
from resnet_fused.triton.kernel_set import TRITON
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

pytestmark = requires_triton

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNELS = ("fwd1x1", "fwd3x3", "dgrad1x1", "dgrad3x3", "wgrad1x1", "wgrad3x3")


@dataclass(frozen=True)
class Tiles:
    """The GEMM tiles of a kernel: rows (M), columns (N) and the reduction step (K)."""

    m: int
    n: int
    k: int


def _span(tile: int) -> int:
    """Two tiles, the second partial."""
    return tile + tile // 2 + 1


def _forward_tiles(c: ConvConfig) -> Tiles:
    return Tiles(c.block_m, c.block_n, c.block_k)


def _backward_tiles(c: configs.BackwardConfig) -> Tiles:
    """dgrad: [block_m input positions x block_n input channels] tiles, K step block_k over the
    output channels. wgrad: [block_k output channels x block_n input channels] tiles, block_m
    rows per step of the reduction over the output positions (M)."""
    return Tiles(c.block_m, c.block_n, c.block_k)


def _sixteen(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _table(kernel: str, dtype: torch.dtype) -> list:
    """The GPU configs of ``kernel`` for ``dtype``, distinct tile shapes, table order."""
    if kernel.startswith("fwd"):
        ksize = int(kernel[3])
        table_dtype = torch.float16 if _sixteen(dtype) else torch.float32
        found = [c for k, d, c in configs.all_conv_configs() if k == ksize and d == table_dtype]
    else:
        found = [configs.BACKWARD_GPU_CONFIGS[_sixteen(dtype)]]
    out, seen = [], set()
    for c in found:
        key = (c.block_m, c.block_n, c.block_k)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _forced_params():
    params = []
    for kernel in KERNELS:
        for dtype in DTYPES:
            for c in _table(kernel, dtype):
                params.append(pytest.param(kernel, dtype, c, id=f"{kernel}-{DTYPE_IDS[dtype]}-"
                                                               f"{c.block_m}x{c.block_n}x{c.block_k}"))
    return params


@contextlib.contextmanager
def _ieee_fp32():
    """fp32 in full precision in both implementations (Triton's dot_precision follows cuDNN's
    flag); a no-op on the CPU, where neither uses TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- Problems -------------------------------------------------------------------------------
#
# Shapes: M = N * H_out * W_out with 7x7 outputs (the 3x3 stride 2 from 13x13 inputs, the 1x1
# stride 1 at 7x7), as many images as two M tiles need; channel counts from the other tiles.

def _images(tile_m: int, positions: int) -> int:
    return math.ceil(_span(tile_m) / positions)


def _rand(gen, *shape, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset


def _uniform(gen, n, lo, hi):
    return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def _activate(v: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(v * scale + shift) in fp32, as the kernels' prologue computes it (then rounded to
    v's dtype for the GEMM): the 16-bit operand the fused kernel multiplies, bit for bit."""
    return torch.relu(v.float() * scale[None, :, None, None] + shift[None, :, None, None])


def _stats_from_partials(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance from partials [3, P, C] (count, mean, M2), merged in float64."""
    n, mean, m2 = part.double().unbind(0)
    total = n.sum(0)
    grand = (n * mean).sum(0) / total
    return grand, (m2 + n * (mean - grand) ** 2).sum(0) / total


def _run_forward(kernel: str, dtype: torch.dtype, tiles: Tiles, gen) -> dict:
    """conv(relu(bn(x))) with the statistics epilogue; the 1x1 adds the projection shortcut's
    K-loop (stride 2 over a 14x14 input), the 3x3 has stride 2."""
    ksize = int(kernel[3])
    c_in, c_out = _span(tiles.k), _span(tiles.n)
    n = _images(tiles.m, 49)
    h_in = 13 if ksize == 3 else 7
    x = _rand(gen, n, c_in, h_in, h_in).to(DEVICE, dtype)
    w = (_rand(gen, c_out, c_in, ksize, ksize) / math.sqrt(c_in * ksize * ksize)).to(DEVICE, dtype)
    scale = _uniform(gen, c_in, 0.5, 1.5).float().to(DEVICE)
    shift = _rand(gen, c_in, scale=0.5).float().to(DEVICE)
    kwargs = dict(scale=scale, shift=shift, stride=2 if ksize == 3 else 1, emit_stats=True)
    if ksize == 1:
        c_sc = _span(tiles.k)
        sc = _rand(gen, n, c_sc, 14, 14).to(DEVICE, dtype)
        ws = (_rand(gen, c_out, c_sc, 1, 1) / math.sqrt(c_sc)).to(DEVICE, dtype)
        sc_scale = _uniform(gen, c_sc, 0.5, 1.5).float().to(DEVICE)
        sc_shift = _rand(gen, c_sc, scale=0.5).float().to(DEVICE)
        kwargs.update(shortcut=sc, shortcut_kind=SHORTCUT_PROJECTION, shortcut_stride=2, proj_weight=ws,
                      proj_scale=sc_scale, proj_shift=sc_shift)
    out, part = TRITON.conv(x, w, **kwargs)

    def reference(work: torch.dtype) -> torch.Tensor:
        a = _activate(x, scale, shift).to(dtype).to(work)
        y = F.conv2d(a, w.to(work), stride=kwargs["stride"], padding=ksize // 2)
        if ksize == 1:
            a_sc = _activate(sc, sc_scale, sc_shift).to(dtype).to(work)
            y = y + F.conv2d(a_sc, ws.to(work), stride=2)
        return y.to(work)

    eager, exact = reference(dtype), reference(torch.float64)
    mean, var = _stats_from_partials(part)
    eager_f = eager.float()
    results = {
        "output": (out, eager, exact),
        "mean": (mean, eager_f.mean((0, 2, 3)), exact.mean((0, 2, 3))),
        "var": (var, eager_f.var((0, 2, 3), unbiased=False), exact.var((0, 2, 3), unbiased=False)),
    }
    gemm = dict(m=out.shape[0] * out.shape[2] * out.shape[3], n=c_out, k=c_in)
    return dict(results=results, gemm=gemm, launched={"_bn_relu_conv_kernel": 1})


def _grad_problem(kernel: str, dtype: torch.dtype, tiles: Tiles, gen):
    """A conv's backward operands: input v (the previous norm's input: scale, shift, mean,
    invstd), output gradient g', the next norm's saved input y and BN-backward coefficients."""
    ksize = int(kernel[-3])
    stride = 2 if ksize == 3 else 1
    if kernel.startswith("dgrad"):  # rows: input positions; columns: input channels; K: output channels
        c_in, c_out = _span(tiles.n), _span(tiles.k)
        h = 13 if ksize == 3 else 7
        n = _images(tiles.m, h * h)
    else:  # wgrad: [output channels x input channels] tiles, reduction over the output rows
        c_in, c_out = _span(tiles.n), _span(tiles.k)
        h = 13 if ksize == 3 else 7
        n = _images(tiles.m, 49)
    h_out = (h + 2 * (ksize // 2) - ksize) // stride + 1
    p = dict(ksize=ksize, stride=stride, c_in=c_in, c_out=c_out, n=n, h=h, h_out=h_out)
    p["v"] = _rand(gen, n, c_in, h, h).to(DEVICE, dtype)
    p["grad"] = _rand(gen, n, c_out, h_out, h_out).to(DEVICE, dtype)
    p["y"] = _rand(gen, n, c_out, h_out, h_out).to(DEVICE, dtype)
    p["w"] = (_rand(gen, c_out, c_in, ksize, ksize) / math.sqrt(c_in * ksize * ksize)).to(DEVICE, dtype)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    p["scale"] = _uniform(gen, c_in, 0.5, 1.5).to(**f32)
    p["shift"] = _rand(gen, c_in, scale=0.5).to(**f32)
    p["mean"] = _rand(gen, c_in, scale=0.2).to(**f32)
    p["invstd"] = _uniform(gen, c_in, 0.8, 1.2).to(**f32)
    p["a"] = _uniform(gen, c_out, 0.5, 1.5).to(**f32)
    p["b"] = _rand(gen, c_out, scale=0.1).to(**f32)
    p["c"] = _rand(gen, c_out, scale=0.1).to(**f32)
    return p


def _dy(p, work: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The BN-backward apply on the output gradient, A g' + B y + C in fp32 (as the kernels'
    prologue), rounded to the data dtype (the GEMM operand), then in ``work``."""
    def ch(t):
        return t[None, :, None, None]
    dy = ch(p["a"]) * p["grad"].float() + ch(p["b"]) * p["y"].float() + ch(p["c"])
    return dy.to(dtype).to(work)


def _run_dgrad(kernel: str, dtype: torch.dtype, tiles: Tiles, gen) -> dict:
    """dgrad with the BN-backward prologue and the ReLU-mask + sums epilogue; the 1x1 adds the
    projection's second K-loop (stride 2), the 3x3 has stride 2."""
    p = _grad_problem(kernel, dtype, tiles, gen)
    ksize, stride = p["ksize"], p["stride"]
    extra = {}
    if ksize == 1:
        k2 = _span(tiles.k)
        h2 = (p["h"] - 1) // 2 + 1
        g2 = _rand(gen, p["n"], k2, h2, h2).to(DEVICE, dtype)
        w2 = (_rand(gen, k2, p["c_in"], 1, 1) / math.sqrt(p["c_in"])).to(DEVICE, dtype)
        extra = dict(second_grad=g2, second_weight=w2, second_stride=2)
    pro = GradPrologue(p["y"], p["a"], p["b"], p["c"])
    out, part = TRITON.conv_dgrad(p["grad"], p["w"], p["v"], p["scale"], p["shift"], p["mean"], p["invstd"],
                                  stride=stride, prologue=pro, **extra)
    pre = p["v"].float() * p["scale"][None, :, None, None] + p["shift"][None, :, None, None]
    mask = pre > 0  # the same fp32 test the kernel makes: one mask for all three results
    xhat = (p["v"].double() - p["mean"].double()[None, :, None, None]) * p["invstd"].double()[None, :, None, None]

    def reference(work: torch.dtype):
        d_a = torch.nn.grad.conv2d_input(p["v"].shape, p["w"].to(work), _dy(p, work, dtype), stride=stride,
                                         padding=ksize // 2)
        if ksize == 1:
            d_a = d_a + torch.nn.grad.conv2d_input(p["v"].shape, extra["second_weight"].to(work),
                                                   extra["second_grad"].to(work), stride=2)
        g = (d_a * mask).to(work)
        # The sums are of the value as stored (rounded to the data dtype), in fp32 / float64.
        stored = g.to(dtype).double() if work != torch.float64 else g
        return g, stored.sum((0, 2, 3)), (stored * xhat).sum((0, 2, 3))

    eager, exact = reference(dtype), reference(torch.float64)
    dbeta, dgamma = part.double().sum(1).unbind(0)
    results = {
        "masked dgrad": (out, eager[0], exact[0]),
        "sum g'": (dbeta, eager[1], exact[1]),
        "sum g' xhat": (dgamma, eager[2], exact[2]),
    }
    gemm = dict(m=p["n"] * p["h"] * p["h"], n=p["c_in"], k=p["c_out"])
    return dict(results=results, gemm=gemm, launched={"_conv_dgrad_kernel": 1})


def _run_wgrad(kernel: str, dtype: torch.dtype, tiles: Tiles, gen) -> dict:
    """wgrad with the BN-backward prologue on the gradient and relu(bn(v)) recomputed."""
    p = _grad_problem(kernel, dtype, tiles, gen)
    ksize, stride = p["ksize"], p["stride"]
    pro = GradPrologue(p["y"], p["a"], p["b"], p["c"])
    d_w = TRITON.conv_wgrad(p["grad"], p["v"], p["scale"], p["shift"], ksize=ksize, stride=stride, prologue=pro)

    def reference(work: torch.dtype):
        a = _activate(p["v"], p["scale"], p["shift"]).to(dtype).to(work)
        return torch.nn.grad.conv2d_weight(a, p["w"].shape, _dy(p, work, dtype), stride=stride, padding=ksize // 2)

    results = {"weight gradient": (d_w, reference(dtype), reference(torch.float64))}
    gemm = dict(m=p["n"] * p["h_out"] * p["h_out"], n=p["c_in"], k=p["c_out"])
    return dict(results=results, gemm=gemm, launched={"_conv_wgrad_kernel": 1})


_RUNNERS = {"fwd": _run_forward, "dgrad": _run_dgrad, "wgrad": _run_wgrad}


@contextlib.contextmanager
def _launched_tiles():
    """Record the tiles each conv kernel launches with (the launchers' ``launch`` wrapped, and
    still called): the list fills with ``(kernel name, Tiles)``."""
    from resnet_fused.triton import conv as conv_module, conv_backward as backward_module

    seen: list = []
    originals = {m: m.launch for m in (conv_module, backward_module)}

    def wrap(launch):
        def recording(kernel, grid, guard, *args, **meta):
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            n = meta.get("BLOCK_C", meta.get("BLOCK_N"))  # wgrad's input-channel tile is BLOCK_C
            seen.append((name, Tiles(meta["BLOCK_M"], n, meta["BLOCK_K"])))
            return launch(kernel, grid, guard, *args, **meta)
        return recording

    for m, launch in originals.items():
        m.launch = wrap(launch)
    try:
        yield seen
    finally:
        for m, launch in originals.items():
            m.launch = launch


def _check(kernel: str, dtype: torch.dtype, tiles: Tiles, gen) -> dict:
    """Run one problem, assert the launches and the 2x-eager rule on every result; the run's
    GEMM sizes and the tiles it launched with."""
    reset_launch_counts()
    with (_ieee_fp32() if dtype == torch.float32 else contextlib.nullcontext()), _launched_tiles() as seen:
        run = _RUNNERS[kernel[:-3]](kernel, dtype, tiles, gen)
    counts = launch_counts()
    for name, count in run["launched"].items():
        assert counts[name] == count, counts
    assert len(seen) == 1 and seen[0][0] in run["launched"], seen
    run["tiles"] = seen[0][1]
    for what, (fused, eager, exact) in run["results"].items():
        assert_parity(fused, eager, exact, dtype, f"{kernel} {what}")
    return run


def _assert_fills(gemm: dict, tiles: Tiles) -> None:
    """M, N and K each span at least two tiles and end in a partial one."""
    for dim, tile in (("m", tiles.m), ("n", tiles.n), ("k", tiles.k)):
        size = gemm[dim]
        assert size > tile and size % tile != 0, f"{dim} = {size} does not fill two {tile}-tiles ({gemm}, {tiles})"


@pytest.mark.parametrize("kernel,dtype,config", _forced_params())
def test_gpu_table_config(kernel, dtype, config, gen):
    """Each GPU-table config, forced, at a shape that fills it: parity with ATen."""
    if kernel.startswith("fwd"):
        tiles, force = _forward_tiles(config), dict(conv=config)
    else:
        tiles, force = _backward_tiles(config), dict(backward=config)
    with configs.forced_configs(**force):
        run = _check(kernel, dtype, tiles, gen)
    assert run["tiles"] == tiles, (run["tiles"], tiles)
    _assert_fills(run["gemm"], tiles)


@pytest.mark.skipif(not ON_GPU, reason="on the CPU the selector returns the interpreter's config; "
                                       "test_gpu_table_config runs the GPU table's configs there")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_selector_choice(kernel, dtype, gen):
    """Unforced: the selector's own config, at a shape that fills the largest tiles of the table;
    the tiles it launched with span at least two tiles in M, N and K."""
    table = _table(kernel, dtype)
    if kernel.startswith("fwd"):
        biggest = Tiles(*(max(getattr(c, f) for c in table) for f in ("block_m", "block_n", "block_k")))
    else:
        biggest = _backward_tiles(table[0])
    run = _check(kernel, dtype, biggest, gen)
    g, tiles = run["gemm"], run["tiles"]
    assert g["m"] > tiles.m and g["n"] > tiles.n and g["k"] > tiles.k, (g, tiles)
