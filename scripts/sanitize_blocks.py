"""One training forward+backward and one eval forward of each block type through a fused backend,
at tiny shapes: the program compute-sanitizer (memcheck, racecheck) runs in scripts/gpu_check.sh.

    compute-sanitizer --tool memcheck python scripts/sanitize_blocks.py [--backend triton]

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with PyTorch's caching allocator an out-of-bounds
access usually lands inside another pooled block, which memcheck cannot see.

Exit status: 0 after every case ran (the last line then says ``SANITIZE_BLOCKS_DONE``), 3 when
the backend is not available in this installation (nothing was checked), 1 on any failure.
"""
from __future__ import annotations

import argparse
import sys

import torch

import resnet_fused

#: (block, constructor kwargs): every shortcut kind, a strided unit, a grouped 3x3, a basic
#: block; widths and spatial sizes tiny (memcheck and racecheck slow kernels down 10-100x) but
#: with odd spatial sizes and more than one tile where the kernels tile.
CASES = [
    ("bottleneck", dict(in_chs=32, out_chs=32, bottle_ratio=0.25, stride=1, groups=1)),
    ("bottleneck", dict(in_chs=16, out_chs=32, bottle_ratio=0.25, stride=2, groups=1)),
    ("bottleneck", dict(in_chs=32, out_chs=32, bottle_ratio=0.25, stride=2, groups=1, shortcut="subsample")),
    ("bottleneck", dict(in_chs=64, out_chs=64, bottle_ratio=0.5, stride=1, groups=8)),
    ("basic", dict(in_chs=16, out_chs=16, bottle_ratio=1.0, stride=1, groups=1)),
    ("basic", dict(in_chs=16, out_chs=32, bottle_ratio=1.0, stride=2, groups=1)),
]
DTYPES = (torch.float32, torch.bfloat16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    parser.add_argument("--size", type=int, default=9, help="input height and width")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SANITIZE_BLOCKS_NOT_RUN: no CUDA GPU")
        return 3
    if args.backend not in resnet_fused.available_backends():
        print(f"SANITIZE_BLOCKS_NOT_RUN: no {args.backend} backend "
              f"(available: {', '.join(resnet_fused.available_backends())})")
        return 3
    torch.manual_seed(0)
    ran = 0
    for block_kind, kwargs in CASES:
        for dtype in DTYPES:
            label = f"{block_kind} {kwargs} {dtype}"
            block = resnet_fused.make_block(block_kind, backend=args.backend, **kwargs)
            block = block.cuda().to(dtype).to(memory_format=torch.channels_last)
            x = torch.randn(2, kwargs["in_chs"], args.size, args.size, device="cuda", dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            block.train()
            out = block(x)
            out.backward(torch.randn_like(out))
            block.eval()
            with torch.no_grad():
                block(x)
            torch.cuda.synchronize()
            print(f"ok: {label}", flush=True)
            ran += 1
    print(f"SANITIZE_BLOCKS_DONE cases={ran} backend={args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
