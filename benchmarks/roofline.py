"""The per-kernel floor of the fusion plan (docs/design.md sections 3, 4 and 7).

    floor = sum over the plan's kernels of max(FLOPs / peak, bytes / bandwidth)

with the peak matrix rate and the copy bandwidth measured on the device (the bench scripts
measure them at the start of a GPU run). A kernel cannot finish before both its arithmetic
and its compulsory memory traffic are done, and the plan's kernels run one after another, so
no implementation of the plan beats the floor; "% of floor" in the benchmarks is floor/time.

    python -m benchmarks.roofline                       # floors of the ResNet-50 stage units
    python -m benchmarks.roofline --peak-tflops 790     # with another matrix ceiling
    python -m benchmarks.roofline --model resnet_v2_50  # bytes of a model: eager, per block, stages

The kernels (one per convolution, everything else in prologues and epilogues):

train_fwd
    K0  bn1 statistics: reads x. (At stage level the previous block's K3 epilogue makes them;
        a standalone block, which is what the block benchmark times, still needs this pass.)
    K1  conv1: reads its input x (only the strided rows when the 1x1 carries the stride),
        writes y1.
    K2  conv2 (3x3, strided, grouped): reads y1, writes y2. Every input element is read once:
        the 3x3 halo re-reads come from on-chip memory in a good kernel, so they are not counted.
    K3  conv3 + shortcut: reads y2 and the shortcut, writes out. Identity reads x; subsample
        reads x at the strided positions; a projection reads x at the strided positions (a1 is
        recomputed from it in the prologue) and adds its GEMM's FLOPs, the second K-loop into
        the same accumulator.
    The basic block is the same with two 3x3 convs (K1 reads x, writes y1; K2 reads y1 and the
    shortcut, writes out).

eval_fwd
    K1..K3 as above without K0: BN uses running statistics, folded into the neighbouring
    kernels (bn2 into K1's epilogue, bn3 into K2's; bn1 stays in K1's prologue because raw x
    feeds the shortcut). The stored tensors are relu(bn(y)) instead of y: same sizes.

train_fwd_bwd
    The train_fwd kernels, then per convolution, last to first (g = dL/dout):
    wgrad   dW = a^T dy: reads the conv's input (y, or x for the first conv, activated in the
            prologue: a is recomputed, never stored) and its output gradient. For the last conv
            the output gradient is g itself; for the others it is dy = A*g' + B*y + C per
            channel (BN backward apply, fused in the prologue), so it reads the masked gradient
            g' of the conv after it AND that conv's input y. A projection's wgrad is taken in
            the last conv's wgrad GEMM ([a3 | a1 strided]^T g, reading g once), reading x at
            the strided positions and adding its FLOPs.
    dgrad   g' = dy W^T: reads the output gradient as wgrad does; the epilogue applies the relu
            mask of the conv's input BN and takes the per-channel sums for that BN's backward,
            so it reads the conv's input (y, or x) once more; writes g' at the input's size. The
            first conv's dgrad carries the projection's dgrad as a second K-loop (reads g at
            the strided positions, adds its FLOPs).
    dx      BN1 backward apply, dx = A1*g'1 + B1*x + C1 (the bn1 sums need the whole batch, so
            this is a pass of its own), plus g for identity (g at the strided positions for
            subsample): reads g'1, x (and g), writes dx.

Byte counting: every tensor is read or written once per kernel that touches it, at ``elem_bytes``
per element (the storage dtype: 2 for bf16/fp16, 4 for fp32); weights are read once per kernel
and weight gradients written once, at the same width; per-channel statistics, BN partial sums
and split-K partial buffers are O(channels x tiles) and left out (well under 1% at these
shapes). Elementwise arithmetic (BN apply, ReLU, statistics) is not counted as FLOPs: it runs on
the vector units, beside the matrix units the peak measures. FLOPs are 2 x MACs; a grouped conv
does 1/groups of a dense one's MACs (each output channel sees in_chs/groups inputs).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from resnet_fused.configs import UnitShape, resnet50_stage_units
from resnet_fused.reference import resolve_shortcut

__all__ = ["MODES", "MODEL_PLANS", "Kernel", "Floor", "plan_kernels", "plan_floor", "eager_kernels",
           "model_bytes", "self_check",
           "DESIGN_PEAK_FLOPS", "DESIGN_BANDWIDTH", "DESIGN_TRAIN_FWD_FLOORS_US"]

#: What a floor is computed for, the benchmark's modes.
MODES = ("train_fwd", "eval_fwd", "train_fwd_bwd")

#: The ceilings docs/design.md section 7 quotes for the H100 (bf16 matrix product, copy bandwidth
#: counting bytes read plus written).
DESIGN_PEAK_FLOPS = 770e12
DESIGN_BANDWIDTH = 3.0e12
#: docs/design.md section 7: identity bottleneck, train forward, batch 256, bf16, in microseconds,
#: (K1+K2+K3, with K0).
DESIGN_TRAIN_FWD_FLOORS_US = {
    "conv2_x": (554.0, 691.0),
    "conv3_x": (315.0, 383.0),
    "conv4_x": (195.0, 229.0),
    "conv5_x": (147.0, 164.0),
}


@dataclass(frozen=True)
class Kernel:
    """One kernel of the plan: its matrix FLOPs and its compulsory memory traffic."""

    name: str
    flops: float
    bytes: float

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        return max(self.flops / peak_flops, self.bytes / bandwidth)

    def is_memory_bound(self, peak_flops: float, bandwidth: float) -> bool:
        return self.bytes / bandwidth >= self.flops / peak_flops


@dataclass(frozen=True)
class Floor:
    """The floor of a list of kernels under one pair of ceilings."""

    kernels: tuple[Kernel, ...]
    peak_flops: float
    bandwidth: float

    @property
    def seconds(self) -> float:
        return sum(k.seconds(self.peak_flops, self.bandwidth) for k in self.kernels)

    @property
    def us(self) -> float:
        return self.seconds * 1e6

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)

    @property
    def memory_bound_share(self) -> float:
        """The fraction of the floor spent in memory-bound kernels."""
        total = self.seconds
        memory = sum(k.seconds(self.peak_flops, self.bandwidth) for k in self.kernels
                     if k.is_memory_bound(self.peak_flops, self.bandwidth))
        return memory / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "floor_us": self.us,
            "flops": self.flops,
            "bytes": self.bytes,
            "memory_bound_share": self.memory_bound_share,
            "kernels": [{"name": k.name, "flops": k.flops, "bytes": k.bytes,
                         "us": k.seconds(self.peak_flops, self.bandwidth) * 1e6} for k in self.kernels],
        }


@dataclass(frozen=True)
class _Conv:
    """One convolution of a block, sizes per image (pixels = height * width)."""

    name: str
    kernel_size: int
    stride: int
    in_chs: int
    out_chs: int
    groups: int
    in_pixels: int
    out_pixels: int

    def macs(self, batch: int) -> int:
        return batch * self.out_pixels * self.out_chs * (self.in_chs // self.groups) * self.kernel_size ** 2

    def input_elements_read(self, batch: int) -> int:
        """Elements of the input the conv needs: a strided 1x1 touches only the strided
        pixels; a 3x3 with stride <= 3 touches every pixel (its taps cover the holes)."""
        pixels = self.out_pixels if self.kernel_size == 1 else self.in_pixels
        return batch * pixels * self.in_chs

    def input_elements(self, batch: int) -> int:
        return batch * self.in_pixels * self.in_chs

    def output_elements(self, batch: int) -> int:
        return batch * self.out_pixels * self.out_chs

    @property
    def weight_elements(self) -> int:
        return self.out_chs * (self.in_chs // self.groups) * self.kernel_size ** 2


def _out_size(size: int, stride: int) -> int:
    # Both the 3x3 (padding 1) and the 1x1 (padding 0) give floor((size - 1) / stride) + 1.
    return (size - 1) // stride + 1


def _block_convs(unit: UnitShape, stride_on: str) -> list[_Conv]:
    """The convolutions of a unit in the order the data meets them."""
    h, w, s = unit.height, unit.width, unit.stride
    full, strided = h * w, _out_size(h, s) * _out_size(w, s)
    mid, g = unit.mid_chs, unit.groups
    if unit.block == "basic":
        return [_Conv("conv1", 3, s, unit.in_chs, mid, g, full, strided),
                _Conv("conv2", 3, 1, mid, unit.out_chs, g, strided, strided)]
    if unit.block != "bottleneck":
        raise ValueError(f"unit.block must be 'basic' or 'bottleneck', got {unit.block!r}")
    if stride_on == "1x1":
        return [_Conv("conv1", 1, s, unit.in_chs, mid, 1, full, strided),
                _Conv("conv2", 3, 1, mid, mid, g, strided, strided),
                _Conv("conv3", 1, 1, mid, unit.out_chs, 1, strided, strided)]
    if stride_on != "3x3":
        raise ValueError(f"stride_on must be '3x3' or '1x1', got {stride_on!r}")
    return [_Conv("conv1", 1, 1, unit.in_chs, mid, 1, full, full),
            _Conv("conv2", 3, s, mid, mid, g, full, strided),
            _Conv("conv3", 1, 1, mid, unit.out_chs, 1, strided, strided)]


def plan_kernels(unit: UnitShape, batch: int, mode: str, elem_bytes: int = 2, *,
                 shortcut: Optional[str] = None, stride_on: str = "3x3",
                 include_bn1_stats: bool = True) -> list[Kernel]:
    """The kernels of the fusion plan for one unit (see the module docstring for the counting).

    ``shortcut`` as the block constructors take it (None: identity when the shape is unchanged,
    else projection); ``include_bn1_stats=False`` leaves out K0 (the stage-level plan).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if elem_bytes not in (1, 2, 4, 8):
        raise ValueError(f"elem_bytes must be 1, 2, 4 or 8, got {elem_bytes!r}")
    kind = resolve_shortcut(unit.in_chs, unit.out_chs, unit.stride, shortcut)
    convs = _block_convs(unit, stride_on)
    first, last = convs[0], convs[-1]
    x_elements = first.input_elements(batch)
    out_elements = last.output_elements(batch)
    # The shortcut reads: x itself (identity) or x at the strided output positions.
    shortcut_read = x_elements if kind == "identity" else batch * last.out_pixels * unit.in_chs
    projection_macs = batch * last.out_pixels * unit.in_chs * unit.out_chs if kind == "projection" else 0
    projection_weights = unit.in_chs * unit.out_chs if kind == "projection" else 0

    def kernel(name: str, macs: int, elements: int) -> Kernel:
        return Kernel(name, 2.0 * macs, float(elements * elem_bytes))

    kernels: list[Kernel] = []
    if mode != "eval_fwd" and include_bn1_stats:
        kernels.append(kernel("K0 bn1 statistics", 0, x_elements))
    for i, conv in enumerate(convs):
        macs = conv.macs(batch)
        elements = conv.input_elements_read(batch) + conv.weight_elements + conv.output_elements(batch)
        if conv is last:
            macs += projection_macs
            elements += shortcut_read + projection_weights
        kernels.append(kernel(f"K{i + 1} {conv.name}" + (" + shortcut" if conv is last else ""),
                              macs, elements))
    if mode != "train_fwd_bwd":
        return kernels

    for i in reversed(range(len(convs))):
        conv = convs[i]
        # The output gradient: g for the last conv; else the BN-backward apply of the next
        # conv's masked dgrad output g' and this conv's output y (both its output's size).
        grad_read = out_elements if conv is last else 2 * conv.output_elements(batch)
        wgrad_macs, wgrad_elements = conv.macs(batch), (conv.input_elements_read(batch) + grad_read
                                                        + conv.weight_elements)
        if conv is last and kind == "projection":
            wgrad_macs += projection_macs
            wgrad_elements += batch * last.out_pixels * unit.in_chs + projection_weights
        kernels.append(kernel(f"{conv.name} wgrad", wgrad_macs, wgrad_elements))
        dgrad_macs = conv.macs(batch)
        # reads the output gradient and the weights; the epilogue reads the input (mask, sums)
        # and writes g' at the input's size.
        dgrad_elements = grad_read + conv.weight_elements + 2 * conv.input_elements(batch)
        if i == 0 and kind == "projection":
            dgrad_macs += projection_macs
            dgrad_elements += out_elements + projection_weights
        kernels.append(kernel(f"{conv.name} dgrad", dgrad_macs, dgrad_elements))
    dx_elements = 3 * x_elements + (out_elements if kind in ("identity", "subsample") else 0)
    kernels.append(kernel("dx bn1 backward apply" + (" + shortcut" if kind != "projection" else ""),
                          0, dx_elements))
    return kernels


def plan_floor(unit: UnitShape, batch: int, mode: str, elem_bytes: int = 2, *,
               peak_flops: float = DESIGN_PEAK_FLOPS, bandwidth: float = DESIGN_BANDWIDTH,
               shortcut: Optional[str] = None, stride_on: str = "3x3",
               include_bn1_stats: bool = True) -> Floor:
    """The floor of :func:`plan_kernels` under the given ceilings (FLOP/s, bytes/s)."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError(f"ceilings must be positive, got peak_flops={peak_flops}, bandwidth={bandwidth}")
    kernels = plan_kernels(unit, batch, mode, elem_bytes, shortcut=shortcut, stride_on=stride_on,
                           include_bn1_stats=include_bn1_stats)
    return Floor(tuple(kernels), peak_flops, bandwidth)


def eager_kernels(unit: UnitShape, batch: int, mode: str, elem_bytes: int = 2, *,
                  shortcut: Optional[str] = None, stride_on: str = "3x3") -> list[Kernel]:
    """Eager PyTorch's kernels for one pre-activation unit, counted like :func:`plan_kernels`.

    Eager runs, per norm, a BatchNorm (training: a statistics read of its input, then an apply
    that reads it again and writes the normalised tensor; eval: one read and one write) and a
    ReLU (a read and a write), then the conv on the stored activation, and an add for the
    shortcut. Its backward runs, per conv, a dgrad and a wgrad on the stored activation; per
    ReLU, a masked copy (reads the gradient and the activation, writes); per BatchNorm, a
    reduction pass (reads the gradient and the input) and an apply pass (reads both again,
    writes); gradients meeting at a tensor are summed by an add (the shortcut's gradient into
    dx, the projection's into conv1's input gradient). cuDNN's conv kernels are taken to read
    and write each tensor once, as the plan's are.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kind = resolve_shortcut(unit.in_chs, unit.out_chs, unit.stride, shortcut)
    convs = _block_convs(unit, stride_on)
    first, last = convs[0], convs[-1]
    x_elements = first.input_elements(batch)
    out_elements = last.output_elements(batch)
    strided_x = batch * last.out_pixels * unit.in_chs
    projection_macs = batch * last.out_pixels * unit.in_chs * unit.out_chs if kind == "projection" else 0
    projection_weights = unit.in_chs * unit.out_chs if kind == "projection" else 0
    train = mode != "eval_fwd"

    def kernel(name: str, macs: int, elements: int) -> Kernel:
        return Kernel(name, 2.0 * macs, float(elements * elem_bytes))

    kernels: list[Kernel] = []
    for conv in convs:
        t = conv.input_elements(batch)
        kernels.append(kernel(f"{conv.name} input BatchNorm", 0, (3 if train else 2) * t))
        kernels.append(kernel(f"{conv.name} input ReLU", 0, 2 * t))
        kernels.append(kernel(f"{conv.name}", conv.macs(batch),
                              conv.input_elements_read(batch) + conv.weight_elements + conv.output_elements(batch)))
    if kind == "projection":
        kernels.append(kernel("projection conv", projection_macs, strided_x + projection_weights + out_elements))
    kernels.append(kernel("shortcut add", 0, 3 * out_elements))
    if mode != "train_fwd_bwd":
        return kernels

    if kind == "projection":
        kernels.append(kernel("projection wgrad", projection_macs, strided_x + out_elements + projection_weights))
        kernels.append(kernel("projection dgrad", projection_macs, out_elements + projection_weights + x_elements))
    for i in reversed(range(len(convs))):
        conv = convs[i]
        t, o = conv.input_elements(batch), conv.output_elements(batch)
        kernels.append(kernel(f"{conv.name} wgrad", conv.macs(batch),
                              conv.input_elements_read(batch) + o + conv.weight_elements))
        kernels.append(kernel(f"{conv.name} dgrad", conv.macs(batch), o + conv.weight_elements + t))
        if i == 0 and kind == "projection":
            kernels.append(kernel("projection + conv1 input gradient add", 0, 3 * t))
        kernels.append(kernel(f"{conv.name} input ReLU backward", 0, 3 * t))
        kernels.append(kernel(f"{conv.name} input BatchNorm backward", 0, 5 * t))
    if kind in ("identity", "subsample"):
        kernels.append(kernel("dx + shortcut gradient add", 0, 3 * x_elements))
    return kernels


#: The byte plans of a whole network's residual units (stem, max pool and head are the same in
#: every plan and left out): eager's kernels, the fusion plan per block (each block takes its
#: own bn1 statistics, K0), and the stage-fused plan (the previous block's last conv emits
#: them, so only the network's first unit runs K0).
MODEL_PLANS = ("eager", "fused per block", "fused stages")


def model_bytes(model: str, batch: int, mode: str = "train_fwd_bwd", elem_bytes: int = 2,
                image_size: int = 224) -> dict[str, float]:
    """Modeled HBM bytes of all residual units of ``model`` under each of :data:`MODEL_PLANS`."""
    from resnet_fused.configs import MODEL_CONFIGS, stage_units

    if model not in MODEL_CONFIGS:
        raise ValueError(f"model must be one of {sorted(MODEL_CONFIGS)}, got {model!r}")
    totals = dict.fromkeys(MODEL_PLANS, 0.0)
    for index, (_, _, unit) in enumerate(stage_units(MODEL_CONFIGS[model], image_size)):
        totals["eager"] += sum(k.bytes for k in eager_kernels(unit, batch, mode, elem_bytes))
        totals["fused per block"] += sum(k.bytes for k in plan_kernels(unit, batch, mode, elem_bytes))
        totals["fused stages"] += sum(k.bytes for k in plan_kernels(unit, batch, mode, elem_bytes,
                                                                      include_bn1_stats=index == 0))
    return totals


def _format_model_table(model: str, batch: int, elem_bytes: int, image_size: int) -> str:
    lines = [f"{model}, residual units only, batch {batch}, {image_size}x{image_size}, "
             f"{elem_bytes}-byte storage: modeled HBM traffic in GB (ratio to eager)",
             f"{'step':<15}" + "".join(f"{plan:>22}" for plan in MODEL_PLANS)]
    for mode in MODES:
        totals = model_bytes(model, batch, mode, elem_bytes, image_size)
        cells = "".join(f"{totals[p] / 1e9:>13.2f} ({totals[p] / totals['eager']:.2f}x)" for p in MODEL_PLANS)
        lines.append(f"{mode:<15}{cells}")
    return "\n".join(lines)


def _design_identity_units() -> dict[str, UnitShape]:
    return {unit.name.split(".")[0]: unit for unit in resnet50_stage_units(kinds=("identity",))}


def self_check(rel_tol: float = 0.025, abs_tol_us: float = 1.0) -> list[dict]:
    """Check the train-forward floors of the ResNet-50 identity units against docs/design.md section 7.

    Returns one dict per stage (ours and docs/design.md's, with and without K0) and raises
    AssertionError naming the first figure that is off. Three checks per stage:

    * at the quoted 770 TFLOP/s and 3.0 TB/s, within ``rel_tol`` of docs/design.md's figure (ours are
      0.3-2.2% above it: 556 vs 554 us at conv2_x, 150 vs 147 at conv5_x);
    * at 790 TFLOP/s, within ``abs_tol_us``: that ceiling reproduces all four of docs/design.md's
      figures to their rounding (the H100 here measured 769-798 TFLOP/s), which pins down the
      kernel list and the byte counts, not only their rough size;
    * K0 (bn1 statistics, pure bandwidth) equals docs/design.md's with-K0 minus without-K0 difference.
    """
    units = _design_identity_units()
    rows = []
    for stage, (design_without_k0, design_with_k0) in DESIGN_TRAIN_FWD_FLOORS_US.items():
        unit = units[stage]
        without_k0 = plan_floor(unit, 256, "train_fwd", 2, include_bn1_stats=False).us
        with_k0 = plan_floor(unit, 256, "train_fwd", 2).us
        at_790 = plan_floor(unit, 256, "train_fwd", 2, peak_flops=790e12, include_bn1_stats=False).us
        rows.append({"stage": stage, "floor_us": without_k0, "design_us": design_without_k0,
                     "floor_with_k0_us": with_k0, "design_with_k0_us": design_with_k0,
                     "floor_at_790_tflops_us": at_790})
        for ours, theirs, what in ((without_k0, design_without_k0, "K1+K2+K3"),
                                   (with_k0, design_with_k0, "K0+K1+K2+K3")):
            if abs(ours / theirs - 1) > rel_tol:
                raise AssertionError(
                    f"roofline self-check: {stage} identity train forward ({what}) floor is "
                    f"{ours:.1f} us, docs/design.md section 7 says {theirs:.0f} us "
                    f"(more than {rel_tol:.1%} apart)")
        if abs(at_790 - design_without_k0) > abs_tol_us:
            raise AssertionError(
                f"roofline self-check: {stage} identity train forward floor at 790 TFLOP/s is "
                f"{at_790:.1f} us; docs/design.md's {design_without_k0:.0f} us should be reproduced "
                f"within {abs_tol_us} us there")
        if abs((with_k0 - without_k0) - (design_with_k0 - design_without_k0)) > abs_tol_us:
            raise AssertionError(
                f"roofline self-check: {stage} K0 (bn1 statistics, a read of x) is "
                f"{with_k0 - without_k0:.1f} us, docs/design.md section 7 implies "
                f"{design_with_k0 - design_without_k0:.0f} us")
    return rows


def _format_table(units: Sequence[UnitShape], batch: int, elem_bytes: int,
                  peak_flops: float, bandwidth: float) -> str:
    width = max(len(u.name) for u in units)
    lines = [f"floors in us, batch {batch}, {elem_bytes}-byte storage, {peak_flops / 1e12:.0f} TFLOP/s, "
             f"{bandwidth / 1e12:.2f} TB/s; train_fwd without K0 in brackets; 'memory-bound' is the "
             "share of the train_fwd_bwd floor spent in memory-bound kernels",
             f"{'unit':<{width}} {'train_fwd':>12} {'eval_fwd':>9} {'train_fwd_bwd':>14} {'memory-bound':>13}"]
    for unit in units:
        floors = {mode: plan_floor(unit, batch, mode, elem_bytes, peak_flops=peak_flops,
                                   bandwidth=bandwidth) for mode in MODES}
        stage_level = plan_floor(unit, batch, "train_fwd", elem_bytes, peak_flops=peak_flops,
                                 bandwidth=bandwidth, include_bn1_stats=False)
        train_fwd = f"{floors['train_fwd'].us:.0f} ({stage_level.us:.0f})"
        lines.append(f"{unit.name:<{width}} {train_fwd:>12} {floors['eval_fwd'].us:>9.0f} "
                     f"{floors['train_fwd_bwd'].us:>14.0f} {floors['train_fwd_bwd'].memory_bound_share:>13.0%}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--elem-bytes", type=int, default=2, help="storage bytes per element (bf16: 2)")
    parser.add_argument("--peak-tflops", type=float, default=DESIGN_PEAK_FLOPS / 1e12)
    parser.add_argument("--bandwidth-tbps", type=float, default=DESIGN_BANDWIDTH / 1e12)
    parser.add_argument("--model", default=None,
                        help="print the modeled bytes of this model's residual units under eager's "
                             "plan, the per-block fused plan and the stage-fused plan (e.g. resnet_v2_50)")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    if args.model is not None:
        print(_format_model_table(args.model, args.batch, args.elem_bytes, args.image_size))
        return 0
    rows = self_check()
    print("self-check against docs/design.md section 7 (identity units, train forward, b256 bf16, "
          "770 TFLOP/s, 3.0 TB/s):")
    for row in rows:
        print(f"  {row['stage']}: {row['floor_us']:.1f} us (docs/design.md {row['design_us']:.0f}), "
              f"with K0 {row['floor_with_k0_us']:.1f} us (docs/design.md {row['design_with_k0_us']:.0f}); "
              f"at 790 TFLOP/s {row['floor_at_790_tflops_us']:.1f} us")
    units = []
    for model in ("resnet_v2_50", "resnet_v2_34", "resnext_v2_50_32x4d"):
        kinds = ("identity", "first") if model == "resnet_v2_50" else ("identity",)
        units += [replace(u, name=f"{model}:{u.name}") for u in resnet50_stage_units(model, kinds=kinds)]
    print(_format_table(units, args.batch, args.elem_bytes, args.peak_tflops * 1e12,
                        args.bandwidth_tbps * 1e12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
