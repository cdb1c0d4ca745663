"""The block parity matrix shared by the fused backends' tests: cases, twins, modes."""
from __future__ import annotations

import copy

import torch

import resnet_fused as rf
from helpers import DEVICE, assert_parity, randomize_bn


# (block, kwargs, input (N, H, W)): odd widths (12, 20), 7x7 and 5x9, batch 1, every shortcut.
CASES = {
    "bottleneck-identity": ("bottleneck", dict(in_chs=20, out_chs=20, bottle_ratio=0.6), (2, 7, 7)),
    "bottleneck-projection-s2": ("bottleneck", dict(in_chs=12, out_chs=20, bottle_ratio=0.6, stride=2), (2, 7, 7)),
    "bottleneck-subsample-b1": ("bottleneck", dict(in_chs=20, out_chs=20, bottle_ratio=0.6, stride=2,
                                                   shortcut="subsample"), (1, 5, 9)),
    "resnext-g2": ("bottleneck", dict(in_chs=16, out_chs=24, bottle_ratio=0.5, groups=2), (2, 5, 9)),
    "resnext-g4-s2": ("bottleneck", dict(in_chs=16, out_chs=32, bottle_ratio=0.5, stride=2, groups=4), (2, 6, 6)),
    "bottleneck-stride-on-1x1": ("bottleneck", dict(in_chs=12, out_chs=24, bottle_ratio=0.5, stride=2,
                                                    stride_on="1x1"), (2, 7, 7)),
    "basic-identity": ("basic", dict(in_chs=12, out_chs=12), (2, 7, 7)),
    "basic-projection-s2": ("basic", dict(in_chs=12, out_chs=20, stride=2), (1, 5, 9)),
    "basic-g2-subsample": ("basic", dict(in_chs=16, out_chs=16, stride=2, groups=2, shortcut="subsample"), (2, 7, 7)),
}
CONVS = {"bottleneck": 3, "basic": 2}
NORMS = {"bottleneck": 3, "basic": 2}


def make_pair(case: str, dtype: torch.dtype, gen: torch.Generator, backend: str = "triton"):
    """A fused block in ``dtype``, and its float64 and same-dtype eager twins, same weights.

    The twins get the fused block's parameters and buffers AFTER its conversion to ``dtype``:
    the float64 reference computes exactly what the 16-bit blocks are given (rounded weights
    included), so the errors compared are the computation's, not the parameters' rounding (which
    a ReLU mask near zero can amplify into differences no kernel is responsible for).
    """
    kind, kwargs, _ = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fused = rf.make_block(kind, backend=backend, **kwargs)
    randomize_bn(fused, gen)
    fused = fused.to(DEVICE, dtype)
    exact = rf.make_block(kind, backend="reference", **kwargs).to(DEVICE, torch.float64)
    exact.load_state_dict(fused.state_dict())
    eager = copy.deepcopy(exact).to(dtype)
    return fused, exact, eager


def make_input(case, dtype, gen, offset=0.0, spread=1.0, memory_format=torch.channels_last):
    _, kwargs, (n, h, w) = CASES[case]
    x = torch.randn(n, kwargs["in_chs"], h, w, generator=gen, dtype=torch.float64) * spread + offset
    return x.to(DEVICE, dtype).contiguous(memory_format=memory_format)


def set_mode(modules, mode):
    for m in modules:
        m.train(mode == "train")
        if mode == "frozen":  # eval-mode norms inside a training block
            m.train()
            for norm in m.modules():
                if isinstance(norm, torch.nn.BatchNorm2d):
                    norm.eval()


def check_running_stats(fused, exact, eager, dtype):
    for key, value in exact.state_dict().items():
        if "running" in key:
            assert_parity(fused.state_dict()[key], eager.state_dict()[key], value, dtype, key)
        elif key.endswith("num_batches_tracked"):
            assert int(fused.state_dict()[key]) == int(value), key
