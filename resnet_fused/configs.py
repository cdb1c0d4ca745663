"""The one table of model configurations, and the block shapes derived from it.

Models (``models.py``), the FLOPs tables (``flops.py``), the benchmarks and the tests all read
these; nothing else in the project spells out a stage width or a unit count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional

__all__ = ["ModelConfig", "MODEL_CONFIGS", "PAPER_GMACS", "UnitShape", "stage_units",
           "resnet50_stage_units", "STEM_CHANNELS", "unit_stride"]

#: Width of the 7x7 stem conv (all models here).
STEM_CHANNELS = 64


@dataclass(frozen=True)
class ModelConfig:
    """A ResNet-v2 / ResNeXt-v2 family member.

    ``channels`` are the stage OUTPUT widths; a bottleneck's middle width is
    ``int(channels * bottle_ratio)`` (ResNeXt 32x4d: ratio 0.5 and 32 groups gives 128 = 32 x 4
    at width 256).
    """

    block: str                      # "basic" or "bottleneck"
    layers: tuple[int, ...]         # units per stage
    channels: tuple[int, ...]       # output width per stage
    bottle_ratio: float
    groups: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "resnet_v2_18": ModelConfig("basic", (2, 2, 2, 2), (64, 128, 256, 512), 1.0),
    "resnet_v2_34": ModelConfig("basic", (3, 4, 6, 3), (64, 128, 256, 512), 1.0),
    "resnet_v2_50": ModelConfig("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048), 0.25),
    "resnet_v2_101": ModelConfig("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048), 0.25),
    "resnet_v2_152": ModelConfig("bottleneck", (3, 8, 36, 3), (256, 512, 1024, 2048), 0.25),
    "resnet_v2_200": ModelConfig("bottleneck", (3, 24, 36, 3), (256, 512, 1024, 2048), 0.25),
    "resnext_v2_50_32x4d": ModelConfig("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048), 0.5, 32),
    "resnext_v2_101_32x8d": ModelConfig("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048), 1.0, 32),
}

#: The ResNet paper's FLOPs table (He et al. 2015, Table 1), which counts multiply-adds:
#: GMACs at 224x224, reproduced by these models with ``stride_on="1x1"`` (the Caffe models').
PAPER_GMACS: dict[str, float] = {
    "resnet_v2_18": 1.8,
    "resnet_v2_34": 3.6,
    "resnet_v2_50": 3.8,
    "resnet_v2_101": 7.6,
    "resnet_v2_152": 11.3,
}


@dataclass(frozen=True)
class UnitShape:
    """One residual unit of a model at a given input size: what a block benchmark builds."""

    name: str            # e.g. "conv3_x.unit0", "conv3_x.first"
    block: str           # "basic" or "bottleneck"
    in_chs: int
    out_chs: int
    bottle_ratio: float
    stride: int
    groups: int
    height: int          # input spatial size of the unit
    width: int

    @property
    def mid_chs(self) -> int:
        return int(self.out_chs * self.bottle_ratio)

    def block_kwargs(self) -> dict:
        """Keyword arguments of the block constructors (reference and fused alike)."""
        return dict(in_chs=self.in_chs, out_chs=self.out_chs, bottle_ratio=self.bottle_ratio,
                    stride=self.stride, groups=self.groups)

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_chs, self.height, self.width)


def unit_stride(stage: int, unit: int, depth: int, n_stages: int, stride_unit: str = "first") -> int:
    """The stride of a unit: 2 where a stage changes resolution, else 1.

    The stem (7x7/2 conv + 3x3/2 max pool) divides the image by 4 and stage 0 keeps the size;
    each later stage halves it, on its first unit (``stride_unit="first"``: torchvision, MXNet,
    timm) or on the LAST unit of the PREVIOUS stage (``"last"``: TF-slim's resnet_v2, where
    the final stage has no stride).
    """
    if stride_unit == "first":
        return 2 if (stage > 0 and unit == 0) else 1
    if stride_unit == "last":
        return 2 if (stage < n_stages - 1 and unit == depth - 1) else 1
    raise ValueError(f"stride_unit must be 'first' or 'last', got {stride_unit!r}")


def stage_units(config: ModelConfig, image_size: int = 224,
                stride_unit: str = "first") -> Iterator[tuple[int, int, UnitShape]]:
    """Yield (stage index, unit index, UnitShape) for every unit of a model (see unit_stride)."""
    size = -(-image_size // 4)  # ceil: the stem pads, as torch's conv/pool arithmetic does
    in_chs = STEM_CHANNELS
    n_stages = len(config.layers)
    for s, (depth, out_chs) in enumerate(zip(config.layers, config.channels)):
        for u in range(depth):
            stride = unit_stride(s, u, depth, n_stages, stride_unit)
            yield s, u, UnitShape(f"conv{s + 2}_x.unit{u}", config.block, in_chs, out_chs,
                                  config.bottle_ratio, stride, config.groups, size, size)
            size = -(-size // stride)
            in_chs = out_chs


def resnet50_stage_units(model: str = "resnet_v2_50", image_size: int = 224,
                         kinds: tuple[str, ...] = ("identity", "first"),
                         stages: Optional[tuple[int, ...]] = None) -> list[UnitShape]:
    """The first (projection, possibly strided) and an identity unit of every stage.

    These are the shapes the block benchmark runs: for ResNet-50, conv2_x 256/64 at 56x56,
    conv3_x 512/128 at 28x28, conv4_x 1024/256 at 14x14, conv5_x 2048/512 at 7x7.
    """
    config = MODEL_CONFIGS[model]
    out: list[UnitShape] = []
    for s, u, unit in stage_units(config, image_size):
        if stages is not None and s not in stages:
            continue
        if (u == 0 and "first" in kinds) or (u == 1 and "identity" in kinds):
            name = f"conv{s + 2}_x." + ("first" if u == 0 else "identity")
            out.append(UnitShape(name, unit.block, unit.in_chs, unit.out_chs, unit.bottle_ratio,
                                 unit.stride, unit.groups, unit.height, unit.width))
    return out
