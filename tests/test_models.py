"""Models: parameter counts, output shapes, options, timm compatibility, backend keyword."""
from __future__ import annotations

import pytest
import torch

import resnet_fused as rf
from helpers import randomize_bn
from resnet_fused import reference as ref
from resnet_fused.configs import MODEL_CONFIGS, resnet50_stage_units, stage_units

# Parameter counts at 1000 classes. ResNet-v2-50's is timm resnetv2_50's published figure;
# the basic and deeper bottleneck models equal timm's resnetv2_18/34/101/152 (checked in
# test_models_match_timm below where timm is installed); ResNeXt and ResNet-200 are this
# implementation's, whose convolution shapes are those of torchvision's v1 models minus the
# v1-only BatchNorm placement.
PARAM_COUNTS = {
    "resnet_v2_18": 11_687_720,
    "resnet_v2_34": 21_795_880,
    "resnet_v2_50": 25_549_352,
    "resnet_v2_101": 44_541_480,
    "resnet_v2_152": 60_185_128,
    "resnet_v2_200": 64_666_152,
    "resnext_v2_50_32x4d": 25_021_224,
    "resnext_v2_101_32x8d": 88_783_656,
}


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return rf.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_parameter_count(name):
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_builders_match_table():
    builders = {n: getattr(rf, n) for n in MODEL_CONFIGS}
    assert set(rf.list_models()) == set(PARAM_COUNTS)
    for name, build in builders.items():
        with torch.device("meta"):
            assert build().config == MODEL_CONFIGS[name]


@pytest.mark.parametrize("name", ["resnet_v2_18", "resnet_v2_50", "resnext_v2_50_32x4d"])
def test_forward_shapes_and_layouts(name, gen):
    torch.manual_seed(0)
    model = rf.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 48, generator=gen)
    with torch.no_grad():
        out = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 7)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    features = rf.create_model(name, num_classes=0).eval()
    with torch.no_grad():
        assert features(x).shape == (2, MODEL_CONFIGS[name].channels[-1])


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_forward_shape_on_meta(name):
    """Every model, every depth, at 224x224: the output shape (meta tensors, no compute)."""
    model = _meta_model(name, num_classes=10)
    with torch.no_grad():
        assert model(torch.empty(3, 3, 224, 224, device="meta")).shape == (3, 10)


def _units(model):
    return [b for stage in model.stages for b in stage.blocks]


def test_stride_unit_last_is_tf_slim_layout():
    model = _meta_model("resnet_v2_50", stride_unit="last", strided_shortcut="subsample")
    units = _units(model)
    strides = [u.stride for u in units]
    shortcuts = [u.shortcut for u in units]
    # stride on the last unit of stages 1-3, none in stage 4
    assert strides == [1, 1, 2] + [1, 1, 1, 2] + [1] * 5 + [2] + [1, 1, 1]
    assert shortcuts[2] == shortcuts[6] == shortcuts[12] == "subsample"
    assert shortcuts[0] == shortcuts[3] == shortcuts[7] == shortcuts[13] == "projection"
    assert len(units) == 16
    with torch.no_grad():
        assert model(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 1000)


def test_stride_options_match_unit_table():
    """models.py and configs.stage_units agree on every unit's stride and widths."""
    for stride_unit in ("first", "last"):
        model = _meta_model("resnet_v2_101", stride_unit=stride_unit)
        table = [unit for _, _, unit in stage_units(MODEL_CONFIGS["resnet_v2_101"], 224, stride_unit)]
        assert [(u.in_chs, u.out_chs, u.stride) for u in _units(model)] == \
               [(t.in_chs, t.out_chs, t.stride) for t in table]


def test_stride_on_1x1_moves_the_stride():
    model = _meta_model("resnet_v2_50", stride_on="1x1")
    first = model.stages[1].blocks[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
    default = _meta_model("resnet_v2_50").stages[1].blocks[0]
    assert default.conv1.stride == (1, 1) and default.conv2.stride == (2, 2)


def test_resnet50_stage_shapes():
    units = {u.name: u for u in resnet50_stage_units()}
    assert [(units[f"conv{i}_x.identity"].in_chs, units[f"conv{i}_x.identity"].mid_chs,
             units[f"conv{i}_x.identity"].height) for i in (2, 3, 4, 5)] == \
           [(256, 64, 56), (512, 128, 28), (1024, 256, 14), (2048, 512, 7)]
    first = units["conv3_x.first"]
    assert (first.in_chs, first.out_chs, first.stride, first.height) == (256, 512, 2, 56)


def test_zero_init_last_zeroes_every_unit():
    model = rf.create_model("resnet_v2_18", zero_init_last=True)
    assert all(torch.count_nonzero(u.conv2.weight) == 0 for u in _units(model))
    model = rf.create_model("resnet_v2_18")
    assert all(torch.count_nonzero(u.conv2.weight) > 0 for u in _units(model))


def test_backend_keyword():
    assert rf.create_model("resnet_v2_18", backend="auto").backend == "auto"
    assert rf.resolve_backend("auto") == "auto"   # decided per call: fused on a GPU, eager on a CPU
    assert rf.resolve_backend("reference") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        rf.create_model("resnet_v2_18", backend="cudnn")
    with pytest.raises(TypeError, match="backend must be a str"):
        rf.make_block("basic", backend=None, in_chs=8)
    for backend in ("triton", "cuda"):
        if backend in rf.available_backends():
            continue
        # Not a silent fallback: the message names the backend and what to use instead.
        with pytest.raises((NotImplementedError, RuntimeError), match=backend):
            rf.make_block("bottleneck", backend=backend, in_chs=8)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(stride_unit="middle"), ValueError, "stride_unit"),
    (dict(stride_on="3x1"), ValueError, "stride_on"),
    (dict(strided_shortcut="identity"), ValueError, "strided_shortcut"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(in_chans=0), ValueError, "in_chans"),
])
def test_model_option_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rf.create_model("resnet_v2_18", **kwargs)


def test_model_input_errors():
    model = rf.create_model("resnet_v2_18", num_classes=3)
    with pytest.raises(ValueError, match="unknown model"):
        rf.create_model("resnet_v2_19")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model("image")
    with pytest.raises(ValueError, match="unknown block|block must be one of"):
        rf.make_block("wide", in_chs=8)


def test_make_block_builds_reference_blocks():
    assert isinstance(rf.make_block("bottleneck", in_chs=16, out_chs=32, stride=2), ref.PreActBottleneck)
    assert isinstance(rf.make_block("basic", in_chs=16), ref.PreActBasicBlock)


timm = pytest.importorskip("timm", reason="timm is optional; installed by requirements-dev.txt")


@pytest.mark.parametrize("ours,theirs", [("resnet_v2_18", "resnetv2_18"), ("resnet_v2_34", "resnetv2_34"),
                                         ("resnet_v2_50", "resnetv2_50"), ("resnet_v2_101", "resnetv2_101")])
def test_models_match_timm(ours, theirs, gen):
    """Same keys, shapes and parameter count as timm; loading timm's weights gives timm's outputs."""
    theirs_model = timm.create_model(theirs, pretrained=False)
    assert sum(p.numel() for p in theirs_model.parameters()) == PARAM_COUNTS[ours]
    if ours not in ("resnet_v2_18", "resnet_v2_50"):
        return  # the forward comparison of the two deep ones adds minutes, not coverage
    randomize_bn(theirs_model, gen)
    model = rf.create_model(ours)
    model.load_state_dict(theirs_model.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=gen)
    for train in (False, True):
        model.train(train)
        theirs_model.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model(x), theirs_model(x), rtol=1e-5, atol=1e-5)


def test_fused_blocks_show_their_real_signatures():
    """inspect.signature / help() / IDEs see the reference blocks' arguments plus ``backend``."""
    import inspect

    import resnet_fused as rf

    for fused, ref in ((rf.FusedBottleneck, rf.PreActBottleneck), (rf.FusedBasicBlock, rf.PreActBasicBlock)):
        params = inspect.signature(fused).parameters
        ref_params = inspect.signature(ref).parameters
        assert list(params)[:-1] == list(ref_params)
        assert all(params[k].default == ref_params[k].default for k in ref_params)
        assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY and params["backend"].default == "triton"
    block = rf.FusedBottleneck(16, 32, 0.5, 2, backend="reference")  # positional as the reference's
    assert (block.in_chs, block.out_chs, block.stride, block.mid_chs) == (16, 32, 2, 16)
