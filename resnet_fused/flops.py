"""Multiply-accumulates (GMACs) per stage of a resnet_fused, torchvision or timm model: the command line.

    python -m resnet_fused.flops resnet_v2_50            # per-stage table
    python -m resnet_fused.flops --paper                 # every model against the paper's table
    python -m resnet_fused.flops torchvision:resnet50 --backend triton

The counting itself is :mod:`resnet_fused.macs` (PyTorch's ``FlopCounterMode`` on meta tensors).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .configs import PAPER_GMACS
from .convert import convert
from .macs import MacReport, conv_macs, count_macs, register_conv_macs
from .models import create_model, list_models

__all__ = ["MacReport", "count_macs", "conv_macs", "register_conv_macs", "main"]


def _paper_comparison(stride_on: str, image_size: int) -> str:
    lines = [f"{'model':<24} {'GMACs':>8} {'paper':>7} {'diff':>7}   (stride on the {stride_on}, "
             f"{image_size}x{image_size})"]
    for name, paper in PAPER_GMACS.items():
        with torch.device("meta"):
            model = create_model(name, stride_on=stride_on)
        g = count_macs(model, (1, 3, image_size, image_size)).gmacs
        lines.append(f"{name:<24} {g:>8.3f} {paper:>7.1f} {g / paper - 1:>+7.1%}")
    return "\n".join(lines)


_LIBRARIES = ("torchvision:", "timm:")


def _library_model(name: str, backend: str) -> nn.Module:
    """``torchvision:<name>`` or ``timm:<name>`` built on the meta device, converted with
    ``resnet_fused.convert`` unless ``backend`` is ``reference``."""
    library, _, model_name = name.partition(":")
    with torch.device("meta"):
        if library == "torchvision":
            import torchvision  # optional dependencies: only for their models

            builder = getattr(torchvision.models, model_name, None)
            if not callable(builder):
                raise ValueError(f"torchvision has no model {model_name!r}")
            model = builder()
        else:
            import timm

            model = timm.create_model(model_name, pretrained=False)
    if backend != "reference":
        model = convert(model, backend=backend)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_fused.flops",
        description="Multiply-accumulates (GMACs) per stage of a resnet_fused, torchvision or timm model.")
    parser.add_argument("model", nargs="?", default="resnet_v2_50",
                        help=f"one of {', '.join(list_models())}, or torchvision:<name> / timm:<name> "
                             "(e.g. torchvision:resnet50)")
    parser.add_argument("--backend", default="reference",
                        help="build the model's blocks for this backend (a library model: converted "
                             "with resnet_fused.convert); the count must not change")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stride-on", choices=("3x3", "1x1"), default="3x3",
                        help="which bottleneck conv carries the stride (1x1: the paper's models)")
    parser.add_argument("--paper", action="store_true",
                        help="compare every model of the paper's table (stride on the 1x1)")
    args = parser.parse_args(argv)
    if args.paper:
        print(_paper_comparison("1x1", args.image_size))
        return 0
    if args.model.startswith(_LIBRARIES):
        try:
            model = _library_model(args.model, args.backend)
        except (ValueError, RuntimeError) as exc:
            parser.error(str(exc))
        what = f"{args.model} ({'converted, backend ' + args.backend if args.backend != 'reference' else 'eager'})"
    elif args.model in list_models():
        with torch.device("meta"):
            model = create_model(args.model, stride_on=args.stride_on, backend=args.backend)
        what = f"{args.model}, stride on the {args.stride_on}"
    else:
        parser.error(f"unknown model {args.model!r}: one of {', '.join(list_models())}, or "
                     "torchvision:<name> / timm:<name>")
    report = count_macs(model, (args.batch, 3, args.image_size, args.image_size))
    print(report.format_table(model, f"{what}, input {args.batch}x3x{args.image_size}x{args.image_size}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
