"""MAC counting: torchvision's published figures, the ResNet paper's table, custom-op formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import resnet_fused as rf
from resnet_fused import flops
from resnet_fused.configs import PAPER_GMACS

# torchvision's published GMACs ("GFLOPS" on its model pages, which count multiply-adds).
TORCHVISION_GMACS = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089,
                     "resnet101": 7.801, "resnet152": 11.513}


@pytest.mark.parametrize("name,published", list(TORCHVISION_GMACS.items()))
def test_torchvision_figures(name, published):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is in requirements-dev.txt")
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    gmacs = flops.count_macs(model, (1, 3, 224, 224)).gmacs
    assert abs(gmacs / published - 1) < 0.01, (name, gmacs)


@pytest.mark.parametrize("name,paper", list(PAPER_GMACS.items()))
def test_paper_table_with_stride_on_1x1(name, paper):
    with torch.device("meta"):
        model = rf.create_model(name, stride_on="1x1")
    gmacs = flops.count_macs(model, (1, 3, 224, 224)).gmacs
    assert abs(gmacs / paper - 1) < 0.02, (name, gmacs)


def test_stride_on_3x3_matches_torchvision_v15():
    """The 3x3-stride ResNet-v2-50 does the same convolutions as torchvision's v1.5 ResNet-50."""
    with torch.device("meta"):
        model = rf.resnet_v2_50()
    assert flops.count_macs(model, (1, 3, 224, 224)).total == 4_089_184_256


def test_per_stage_breakdown_sums_to_total():
    with torch.device("meta"):
        model = rf.resnet_v2_50()
    report = flops.count_macs(model, (2, 3, 224, 224))
    rows = dict(report.top_level(model))
    assert list(rows) == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "norm", "head"]
    assert sum(rows.values()) == report.total
    # conv1 of the paper: 7x7x3x64 at 112x112, per image
    assert rows["stem"] == 2 * 7 * 7 * 3 * 64 * 112 * 112
    assert report.by_module["stages.0.blocks.1.conv2"] == 2 * 64 * 64 * 9 * 56 * 56


def test_count_macs_leaves_model_untouched(gen):
    model = rf.resnet_v2_18(num_classes=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops.count_macs(model, torch.randn(2, 3, 32, 32, generator=gen))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert next(model.parameters()).device.type == "cpu"


def test_grouped_conv_macs_divide_by_groups():
    conv = nn.Conv2d(32, 64, 3, padding=1, groups=8, bias=False)
    assert flops.count_macs(conv, (1, 32, 10, 10)).total == 64 * 10 * 10 * (32 // 8) * 9


def test_register_conv_macs_counts_a_custom_op():
    """A fused op registered with register_conv_macs counts as the eager conv does."""
    lib_name = "resnet_fused_flops_test"

    @torch.library.custom_op(f"{lib_name}::relu_conv", mutates_args=())
    def relu_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.relu(x), w, padding=1)

    @relu_conv.register_fake
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0], x.shape[2], x.shape[3])

    flops.register_conv_macs(
        torch.ops.resnet_fused_flops_test.relu_conv,
        lambda x_shape, w_shape, out_shape: flops.conv_macs(x_shape, w_shape, out_shape))

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))

        def forward(self, x):
            return relu_conv(x, self.weight)

    eager = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, bias=False))
    shape = (2, 4, 6, 6)
    assert flops.count_macs(Fused(), shape).total == flops.count_macs(eager, shape).total == 2 * 8 * 36 * 36


def test_cli_prints_stage_table(capsys):
    assert flops.main(["resnet_v2_50"]) == 0
    out = capsys.readouterr().out
    for name in ("conv1", "conv2_x", "conv5_x", "fc", "total"):
        assert name in out
    assert "4.089" in out
    assert flops.main(["--paper"]) == 0
    assert "resnet_v2_152" in capsys.readouterr().out


@pytest.mark.parametrize("bad,exc", [((1, 3, 0, 4), ValueError), ((), ValueError), ("224", ValueError)])
def test_count_macs_bad_input(bad, exc):
    with pytest.raises(exc, match="shape of positive ints"):
        flops.count_macs(nn.Conv2d(3, 3, 1), bad)


def test_count_macs_needs_module():
    with pytest.raises(TypeError, match="nn.Module"):
        flops.count_macs(lambda x: x, (1, 3, 4, 4))


@pytest.mark.parametrize("name,stride_on", [("resnet_v2_50", "3x3"), ("resnet_v2_50", "1x1"),
                                            ("resnet_v2_18", "3x3"), ("resnext_v2_50_32x4d", "3x3")])
def test_fused_models_count_what_eager_counts(name, stride_on):
    """The fused block ops register their MACs: a fused model counts the eager one's MACs."""
    with torch.device("meta"):
        eager = rf.create_model(name, stride_on=stride_on)
        fused = rf.create_model(name, stride_on=stride_on, backend="triton")
    shape = (2, 3, 64, 64)
    assert rf.count_macs(fused, shape).total == rf.count_macs(eager, shape).total > 0


def test_cli_counts_converted_library_models(capsys):
    from resnet_fused.flops import main

    pytest.importorskip("torchvision")
    for backend in ("reference", "triton"):
        assert main(["torchvision:resnet50", "--backend", backend]) == 0
        out = capsys.readouterr().out
        assert "conv3_x" in out and out.rstrip().endswith("4.089"), out
    with pytest.raises(SystemExit):
        main(["torchvision:no_such_model"])
