"""Multiply-accumulate counts per layer and per stage, for any nn.Module, and the MAC formulas of
the fused custom ops.

Built on PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (which reproduces
torchvision's published figures); this module only runs it on meta tensors, groups its
per-module counts and converts FLOPs to MACs. The ResNet paper's table counts multiply-adds,
so the unit here is GMACs; a benchmark's TFLOP/s is 2 x MACs / s.

Fused custom ops register their formulas with :func:`register_conv_macs` so a fused model
counts the same as the eager one.

The command line over the models is ``resnet_fused.flops``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = ["MacReport", "count_macs", "conv_macs", "register_conv_macs"]

# FlopCounterMode counts a multiply-accumulate as 2 FLOPs.
_FLOPS_PER_MAC = 2


@dataclass
class MacReport:
    """MAC counts of one forward pass.

    ``by_module`` maps every submodule's qualified name ("" for the whole model, "stages.0",
    "stages.0.blocks.1.conv2", ...) to the MACs done inside it.
    """

    input_shape: tuple[int, ...]
    total: int
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def top_level(self, model: nn.Module) -> list[tuple[str, int]]:
        """(name, MACs) for each direct child of ``model`` and each child of a Sequential one.

        For the models here: stem, stages.0 .. stages.3, norm, head.
        """
        rows = []
        for name, child in model.named_children():
            if isinstance(child, nn.Sequential) and name == "stages":
                rows += [(f"{name}.{n}", self.by_module.get(f"{name}.{n}", 0))
                         for n, _ in child.named_children()]
            else:
                rows.append((name, self.by_module.get(name, 0)))
        return rows

    def format_table(self, model: nn.Module, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"{'layer':<12} {'GMACs':>9} {'share':>7}")
        for name, macs in self.top_level(model):
            share = macs / self.total if self.total else 0.0
            lines.append(f"{_paper_name(name):<12} {macs / 1e9:>9.3f} {share:>7.1%}")
        lines.append(f"{'total':<12} {self.gmacs:>9.3f}")
        return "\n".join(lines)


def _paper_name(name: str) -> str:
    """The ResNet paper's layer names: conv1 (stem), conv2_x .. conv5_x, fc."""
    if name == "stem":
        return "conv1"
    if name.startswith("stages."):
        return f"conv{int(name.split('.')[1]) + 2}_x"
    if name.startswith("layer") and name[5:].isdigit():  # torchvision / timm post-activation ResNets
        return f"conv{int(name[5:]) + 1}_x"
    return {"head": "fc"}.get(name, name)


def count_macs(
    model: nn.Module,
    inputs: Union[torch.Tensor, Sequence[int]],
) -> MacReport:
    """Count the MACs of ``model(inputs)`` without computing anything.

    ``inputs`` is a tensor or an input shape such as ``(1, 3, 224, 224)``. The forward runs on
    meta tensors through ``torch.func.functional_call``, so the model itself (its device, its
    parameters, its BN running statistics) is left untouched, and a ResNet-152 counts in well
    under a second on a CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_macs expects an nn.Module, got {type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        shape, dtype = tuple(inputs.shape), inputs.dtype if inputs.is_floating_point() else torch.float32
    else:
        shape, dtype = tuple(inputs), torch.float32
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"inputs must be a tensor or a shape of positive ints, got {inputs!r}")
    meta_state = {name: torch.empty_like(t, device="meta")
                  for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    x = torch.empty(shape, dtype=dtype, device="meta")
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        torch.func.functional_call(model, meta_state, (x,))
    root = type(model).__name__
    by_module: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else key
        by_module[name] = sum(per_op.values()) // _FLOPS_PER_MAC
    total = counter.get_total_flops() // _FLOPS_PER_MAC
    return MacReport(shape, total, by_module)


def conv_macs(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """MACs of a 2-D convolution: every output element takes (C_in / groups) * kh * kw MACs.

    ``w_shape`` is (C_out, C_in / groups, kh, kw), so the groups are already in it.
    """
    n, c_out, h_out, w_out = out_shape
    return n * c_out * h_out * w_out * w_shape[1] * w_shape[2] * w_shape[3]


def register_conv_macs(op: object, macs: Callable[..., int]) -> None:
    """Register a fused op's MAC formula with FlopCounterMode (as FLOPs = 2 x MACs).

    ``op`` is the op packet (``torch.ops.resnet_fused.name``). ``macs`` receives the op's arguments with tensors replaced by their shapes (FlopCounterMode's
    convention), plus ``out_shape``, and returns the op's MACs, typically a sum of
    :func:`conv_macs` terms.
    """
    def flops(*args, out_shape=None, **kwargs) -> int:
        return _FLOPS_PER_MAC * macs(*args, out_shape=out_shape, **kwargs)

    register_flop_formula(op)(flops)


