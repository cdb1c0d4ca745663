"""ResNet-v2 (pre-activation) and ResNeXt-v2 models, built from ``configs.MODEL_CONFIGS``.

The module tree and state_dict keys follow timm's ``ResNetV2`` (``stem.conv``,
``stages.{i}.blocks.{j}.{norm1,conv1,...}``, ``norm``, ``head.fc`` as a 1x1 conv), so a
ResNet-v2-50 here has timm ``resnetv2_50``'s 25,549,352 parameters and its keys.

Options beyond timm's: which unit of a stage carries the stride (``stride_unit``), which
conv of a bottleneck carries it (``stride_on``), and the shortcut of a strided unit whose
width does not change (``strided_shortcut``): together they express torchvision/timm/MXNet
(``first``/``3x3``/projection), TF-slim's resnet_v2 (``last``/``3x3``/``subsample``) and the
paper's Caffe models (``first``/``1x1``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import reference
from .backends import check_backend, resolve_backend
from .modules import FusedBasicBlock, FusedBottleneck
from .configs import MODEL_CONFIGS, STEM_CHANNELS, ModelConfig, unit_stride
from .stage import FusedStage, FusedStages

__all__ = [
    "ResNetV2", "ResNetStage", "ClassifierHead", "make_block", "create_model", "list_models",
    "resnet_v2_18", "resnet_v2_34", "resnet_v2_50", "resnet_v2_101", "resnet_v2_152",
    "resnet_v2_200", "resnext_v2_50_32x4d", "resnext_v2_101_32x8d",
]

_REFERENCE_BLOCKS = {"basic": reference.PreActBasicBlock, "bottleneck": reference.PreActBottleneck}
_FUSED_BLOCKS = {"basic": FusedBasicBlock, "bottleneck": FusedBottleneck}


def make_block(block: str, *, backend: str = "reference", **kwargs: Any) -> nn.Module:
    """Build one pre-activation unit of kind ``"basic"`` or ``"bottleneck"``.

    ``kwargs`` are the block constructor's (``in_chs, out_chs, bottle_ratio, stride, groups,
    shortcut, stride_on, eps, momentum``), the same for every backend.
    """
    if block not in _REFERENCE_BLOCKS:
        raise ValueError(f"block must be one of {tuple(_REFERENCE_BLOCKS)}, got {block!r}")
    backend = resolve_backend(backend)
    if backend == "reference":
        return _REFERENCE_BLOCKS[block](**kwargs)
    return _FUSED_BLOCKS[block](backend=backend, **kwargs)


class ResNetStage(nn.Module):
    """A stage: ``blocks``, a ``FusedStage`` of units (an nn.Sequential: timm's key
    ``stages.{i}.blocks.{j}``) that chains the statistics partials between fused blocks."""

    #: Its forward is ``self.blocks(x)``: a ``FusedStages`` chains statistics through it.
    forward_is_blocks = True

    def __init__(self, units: list[nn.Module]):
        super().__init__()
        self.blocks = FusedStage(*units)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool, then ``fc`` as a 1x1 conv with bias (timm's key and shape)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Conv2d(in_features, num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x.mean(dim=(2, 3), keepdim=True)
        return torch.flatten(self.fc(x), 1)


class ResNetV2(nn.Module):
    """A pre-activation ResNet: 7x7/2 conv + 3x3/2 max pool, stages of units, BN+ReLU, head.

    Args:
        config: the ``ModelConfig`` (see ``configs.MODEL_CONFIGS``).
        num_classes: classifier outputs; 0 returns the pooled features.
        in_chans: image channels.
        stride_unit: ``"first"`` (the first unit of stages 2-4 is strided: torchvision, MXNet,
            timm) or ``"last"`` (the last unit of stages 1-3: TF-slim's resnet_v2).
        stride_on: ``"3x3"`` or ``"1x1"`` (the paper's Caffe models; bottlenecks only).
        strided_shortcut: shortcut of a strided unit whose width does not change:
            ``"projection"`` or ``"subsample"`` (TF-slim). Units whose width changes always
            project, unchanged ones without stride are identities.
        zero_init_last: zero the last conv of every unit (each unit starts as its shortcut).
        backend: ``"reference" | "triton" | "cuda" | "auto"``, see ``backends.py``.
        eps, momentum: BatchNorm settings of every norm.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        stride_unit: str = "first",
        stride_on: str = "3x3",
        strided_shortcut: str = "projection",
        zero_init_last: bool = False,
        backend: str = "reference",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if stride_unit not in ("first", "last"):
            raise ValueError(f"stride_unit must be 'first' or 'last', got {stride_unit!r}")
        if stride_on not in reference.STRIDE_ON:
            raise ValueError(f"stride_on must be one of {reference.STRIDE_ON}, got {stride_on!r}")
        if strided_shortcut not in ("projection", "subsample"):
            raise ValueError(
                f"strided_shortcut must be 'projection' or 'subsample', got {strided_shortcut!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        self.config = config
        self.backend = check_backend(backend)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, STEM_CHANNELS, 7, stride=2, padding=3, bias=False))
        self.stem.add_module("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

        # FusedStages: the statistics partials flow across stage boundaries too, so in a fused
        # model only the first block takes its own input statistics (stage.py).
        self.stages = FusedStages()
        in_chs = STEM_CHANNELS
        n_stages = len(config.layers)
        for s, (depth, out_chs) in enumerate(zip(config.layers, config.channels)):
            units = []
            for u in range(depth):
                stride = unit_stride(s, u, depth, n_stages, stride_unit)
                shortcut = None
                if stride > 1 and in_chs == out_chs:
                    shortcut = strided_shortcut
                units.append(make_block(
                    config.block, backend=backend, in_chs=in_chs, out_chs=out_chs,
                    bottle_ratio=config.bottle_ratio, stride=stride, groups=config.groups,
                    shortcut=shortcut, stride_on=stride_on, eps=eps, momentum=momentum))
                in_chs = out_chs
            self.stages.add_module(str(s), ResNetStage(units))
        self.num_features = in_chs
        self.norm = reference.BatchNormReLU2d(in_chs, eps=eps, momentum=momentum)
        self.head = ClassifierHead(in_chs, num_classes)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = False) -> None:
        """timm's ResNetV2 initialisation: He-normal (fan_out) convs, unit BN, N(0, 0.01) head."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and name == "head.fc":
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last") and callable(m.zero_init_last):
                    m.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"ResNetV2 expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"ResNetV2 expects an (N, {self.in_chans}, H, W) image batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"ResNetV2 expects a floating-point image batch, got {x.dtype}")
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(MODEL_CONFIGS)


def create_model(name: str, **kwargs: Any) -> ResNetV2:
    """Build a model by name (``list_models()``); keyword arguments as :class:`ResNetV2`."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    return ResNetV2(MODEL_CONFIGS[name], **kwargs)


def resnet_v2_18(**kwargs: Any) -> ResNetV2:
    """ResNet-v2-18: basic units 2,2,2,2 (1.8 GMACs in the paper's table)."""
    return create_model("resnet_v2_18", **kwargs)


def resnet_v2_34(**kwargs: Any) -> ResNetV2:
    """ResNet-v2-34: basic units 3,4,6,3 (3.6 GMACs)."""
    return create_model("resnet_v2_34", **kwargs)


def resnet_v2_50(**kwargs: Any) -> ResNetV2:
    """ResNet-v2-50: bottleneck units 3,4,6,3 (3.8 GMACs with the stride on the 1x1)."""
    return create_model("resnet_v2_50", **kwargs)


def resnet_v2_101(**kwargs: Any) -> ResNetV2:
    """ResNet-v2-101: bottleneck units 3,4,23,3 (7.6 GMACs)."""
    return create_model("resnet_v2_101", **kwargs)


def resnet_v2_152(**kwargs: Any) -> ResNetV2:
    """ResNet-v2-152: bottleneck units 3,8,36,3 (11.3 GMACs)."""
    return create_model("resnet_v2_152", **kwargs)


def resnet_v2_200(**kwargs: Any) -> ResNetV2:
    """ResNet-v2-200: bottleneck units 3,24,36,3 (the identity-mappings paper's deepest ImageNet model)."""
    return create_model("resnet_v2_200", **kwargs)


def resnext_v2_50_32x4d(**kwargs: Any) -> ResNetV2:
    """Pre-activation ResNeXt-50 32x4d: 32 groups of width 4 in the first stage's 3x3."""
    return create_model("resnext_v2_50_32x4d", **kwargs)


def resnext_v2_101_32x8d(**kwargs: Any) -> ResNetV2:
    """Pre-activation ResNeXt-101 32x8d: 32 groups of width 8 in the first stage's 3x3."""
    return create_model("resnext_v2_101_32x8d", **kwargs)
