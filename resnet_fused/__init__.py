"""resnet_fused: fused pre-activation ResNet blocks for PyTorch.

    import resnet_fused as rf
    model = rf.resnet_v2_50(backend="reference")   # backend: reference | triton | cuda | auto
    rf.count_macs(model, (1, 3, 224, 224))         # multiply-accumulates per stage

Importing the package never loads the compiled extension nor queries a GPU; ``backend="cuda"``
loads ``resnet_fused._C`` when first asked for, and says clearly when it is missing.
"""
from .backends import BACKENDS, available_backends, resolve_backend
from .convert import convert, describe, unconvert
from .configs import MODEL_CONFIGS, PAPER_GMACS, ModelConfig, UnitShape
from .flops import MacReport, count_macs
from .models import (
    ResNetV2,
    create_model,
    list_models,
    make_block,
    resnet_v2_18,
    resnet_v2_34,
    resnet_v2_50,
    resnet_v2_101,
    resnet_v2_152,
    resnet_v2_200,
    resnext_v2_50_32x4d,
    resnext_v2_101_32x8d,
)
from .modules import FusedBasicBlock, FusedBottleneck
from .postact import FusedPostActBasicBlock, FusedPostActBottleneck, FusedTimmBasicBlock, FusedTimmBottleneck
from . import interop
from .ops import batch_stats
from .reference import PreActBasicBlock, PreActBottleneck

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "available_backends", "resolve_backend",
    "MODEL_CONFIGS", "PAPER_GMACS", "ModelConfig", "UnitShape",
    "MacReport", "count_macs",
    "ResNetV2", "create_model", "list_models", "make_block",
    "resnet_v2_18", "resnet_v2_34", "resnet_v2_50", "resnet_v2_101", "resnet_v2_152",
    "resnet_v2_200", "resnext_v2_50_32x4d", "resnext_v2_101_32x8d",
    "batch_stats", "interop",
    "convert", "describe", "unconvert",
    "FusedBasicBlock", "FusedBottleneck",
    "FusedPostActBasicBlock", "FusedPostActBottleneck", "FusedTimmBasicBlock", "FusedTimmBottleneck",
    "PreActBasicBlock", "PreActBottleneck",
]
