"""A converted model keeps its library's interfaces: FX tracing and feature extraction,
TorchScript (script, save, load), torch.export (export, save, load), timm's ``features_only`` and
``forward_intermediates``.

Every case converts a small model (timm post- and pre-activation, torchvision), runs the
interface on fresh random inputs, checks that the fused Triton kernels ran (the launch counter)
and compares with the unconverted model: outputs, and in train mode every parameter gradient
and the running statistics.
"""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import resnet_fused as rf
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

from helpers import assert_parity, eager_error_spread, rel_err

timm = pytest.importorskip("timm")
tvr = pytest.importorskip("torchvision.models.resnet")
from timm.layers import BatchNormAct2d, create_conv2d  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]


class TinyTorchvision(nn.Module):
    """torchvision's Bottleneck at narrow widths, laid out as torchvision's ResNet
    (``layer1`` with a stride-1 projection, ``layer2`` strided), so feature extractors find
    ``layer1`` / ``layer2`` as they do in resnet50."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(
            tvr.Bottleneck(16, 4, 1, nn.Sequential(tvr.conv1x1(16, 16, 1), nn.BatchNorm2d(16))), tvr.Bottleneck(16, 4))
        self.layer2 = nn.Sequential(tvr.Bottleneck(16, 8, 2, nn.Sequential(tvr.conv1x1(16, 32, 2), nn.BatchNorm2d(32))))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


def timm_post(**kwargs) -> nn.Module:
    """timm's ResNet with BasicBlocks, four stages 8, 8, 16, 16 (post-activation), without the
    stem's max pool: layer4's norms see 8 values per channel at 32x32, not 2 (where a train-mode
    BN outputs +-1 whatever its input and the input gradient is rounding noise)."""
    model = timm_resnet.ResNet(timm_resnet.BasicBlock, [1, 1, 1, 1], channels=(8, 8, 16, 16), num_classes=5,
                               **kwargs)
    model.maxpool = nn.Identity()
    return model


def timm_pre(**kwargs) -> nn.Module:
    """timm's ResNetV2 with pre-activation bottlenecks and BatchNormAct2d, two stages."""
    return timm_resnetv2.ResNetV2(layers=[1, 1], channels=(16, 32), stem_chs=8, conv_layer=create_conv2d,
                                  norm_layer=BatchNormAct2d, num_classes=5, **kwargs)


MODELS = {"timm-postact": timm_post, "timm-preact": timm_pre, "torchvision": TinyTorchvision}


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def pair(name: str, gen: torch.Generator, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(eager model, converted copy), same weights and random BN state."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    eager = MODELS[name](**kwargs)
    _randomize(eager, gen)
    fused = rf.convert(copy.deepcopy(eager), backend="triton")
    assert any(isinstance(m, tuple(rf.interop.leaf_modules())) for m in fused.modules()), name
    return eager, fused


def image(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=gen)


def fused_launches(fn):
    """(fn(), Triton launches it made)."""
    reset_launch_counts()
    out = fn()
    return out, sum(launch_counts().values())


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Two runs of the same fused computation (in-process vs reloaded): equal up to roundoff."""
    assert a.shape == b.shape, what
    err = rel_err(a, b)
    assert err < 1e-6, f"{what}: relative error {err:.3g}"


def parity(got: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str, spread: float = 0.0) -> None:
    """The project's rule: the fused fp32 result's error against float64 at most 2x eager's
    (``spread``: eager's error over rounding-noise copies, where one eager sample is noisy)."""
    assert_parity(got, eager, exact, torch.float32, what, eager_spread=spread)


def _train_step(model: nn.Module, run, x: torch.Tensor, dtype: torch.dtype, grad_seed: int = 7) -> dict:
    """Train-mode forward + backward of ``run`` (over ``model``'s parameters): the output, the input
    gradient, every parameter gradient and every buffer afterwards, by name."""
    model.train()
    xi = x.detach().to(dtype).clone().requires_grad_()
    out = run(xi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(dtype))
    return {"output": out.detach(), "input": xi.grad, **{k: p.grad for k, p in model.named_parameters()},
            **{k: b.detach().clone() for k, b in model.named_buffers()}}


def check_train_step(run, eager: nn.Module, fused: nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    """``run(x)`` (the interface's callable over ``fused``'s parameters) vs ``eager(x)`` and a
    float64 copy in train mode: output, input gradient, every parameter gradient, the buffers."""
    start = copy.deepcopy(eager)
    twin64 = copy.deepcopy(eager).double()
    exact = _train_step(twin64, twin64, x, torch.float64)
    want = _train_step(eager, eager, x, torch.float32)
    reset_launch_counts()
    got = _train_step(fused, run, x, torch.float32)
    assert sum(launch_counts().values()) > 0, "the fused kernels did not run"
    floats = {k for k, v in exact.items() if v.is_floating_point()}
    spread = eager_error_spread(lambda m, t: _train_step(m, m, t, torch.float32), start, x, torch.float32, gen,
                                {k: exact[k] for k in floats & got.keys()})
    # Every parameter; every buffer of the fused blocks (an FX graph keeps only the buffers its
    # traced-through modules read, e.g. not a timm BatchNormAct2d's counter).
    params = {k for k, _ in eager.named_parameters()}
    assert params <= got.keys() <= want.keys()
    leaves = tuple(rf.interop.leaf_modules())
    for path, block in fused.named_modules():
        if isinstance(block, leaves):
            assert {f"{path}.{k}" for k, _ in block.named_buffers()} <= got.keys(), path
    for k, value in got.items():
        if k.endswith("num_batches_tracked"):
            assert int(value) == int(want[k]) == int(exact[k]), k
        else:
            parity(value, want[k], exact[k], k, spread[k])


def check_eval(run, eager: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    exact = copy.deepcopy(eager).double().eval()
    eager.eval()
    fused.eval()
    with torch.no_grad():
        want, ref = eager(x), exact(x.double())
        got, launches = fused_launches(lambda: run(x))
    assert launches > 0, "the fused kernels did not run"
    parity(got, want, ref, "eval output")


def run_fresh(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a fresh interpreter that imports resnet_fused (kernels interpreted on the CPU)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------
# FX
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_fx_symbolic_trace_runs_the_fused_blocks(name, gen):
    """symbolic_trace of a converted model: each fused block is one call_module node; the
    GraphModule runs the fused kernels and matches eager, train step and eval."""
    eager, fused = pair(name, gen)
    gm = torch.fx.symbolic_trace(fused)
    leaves = tuple(rf.interop.leaf_modules())
    blocks = {n for n, m in fused.named_modules() if isinstance(m, leaves)}
    called = {str(node.target) for node in gm.graph.nodes if node.op == "call_module"}
    assert blocks and blocks <= called, (blocks, called)
    check_train_step(gm, eager, gm, image(gen), gen)
    # FX bakes a traced-through module's train/eval branch into the graph: trace again in eval.
    gm = torch.fx.symbolic_trace(fused.eval())
    check_eval(gm, eager, gm, image(gen))


def test_torchvision_create_feature_extractor(gen):
    """torchvision's create_feature_extractor (FX) over a converted torchvision ResNet: the
    returned layer outputs and the gradients are eager's, with the fused kernels running; with
    and without ``rf.interop.tracer_kwargs()``."""
    eager, fused = pair("torchvision", gen)
    nodes = {"layer1": "c2", "layer2": "c3"}
    x = image(gen)
    graphs = {}
    for key, kwargs in (("plain", {}), ("leaves", {"tracer_kwargs": rf.interop.tracer_kwargs()})):
        got_fx = create_feature_extractor(copy.deepcopy(fused), return_nodes=nodes, **kwargs)
        called = [str(n.target) for n in got_fx.graph.nodes if n.op == "call_module"]
        assert {"layer1.0", "layer1.1", "layer2.0"} <= set(called), (key, called)
        graphs[key] = (got_fx, called)
    assert graphs["plain"][1] == graphs["leaves"][1]  # the same graph either way: run one of them
    got = _Summed(graphs["leaves"][0])
    check_train_step(got, _Summed(create_feature_extractor(copy.deepcopy(eager), return_nodes=nodes)), got, x, gen)


class _Summed(nn.Module):
    """A feature extractor's features as one (N, features) tensor (gradients through all of them)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([v.flatten(1) for v in self.inner(x).values()], 1)


@pytest.mark.parametrize("name", ["timm-postact", "timm-preact"])
def test_timm_fx_feature_extraction(name, gen):
    """timm's FX feature extraction (FeatureGraphNet, as features_only with feature_cls='fx'
    builds it) over a converted model: the fused blocks are registered timm leaves, the features
    are eager's and the fused kernels run."""
    from timm.layers import is_notrace_module
    from timm.models import FeatureGraphNet

    assert all(is_notrace_module(cls) for cls in rf.interop.leaf_modules())
    eager, fused = pair(name, gen)
    exact_net = FeatureGraphNet(copy.deepcopy(eager).double(), out_indices=(1, 2)).eval()
    want_net = FeatureGraphNet(eager, out_indices=(1, 2)).eval()
    got_net = FeatureGraphNet(fused, out_indices=(1, 2)).eval()
    assert any(n.op == "call_module" and isinstance(got_net.graph_module.get_submodule(str(n.target)),
                                                    tuple(rf.interop.leaf_modules()))
               for n in got_net.graph_module.graph.nodes)
    x = image(gen)
    with torch.no_grad():
        want, exact = want_net(x), exact_net(x.double())
        got, launches = fused_launches(lambda: got_net(x))
    assert launches > 0 and len(got) == len(want) == 2
    for i, (a, b, c) in enumerate(zip(got, want, exact)):
        parity(a, b, c, f"feature {i}")


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_50"])
def test_timm_features_only_and_forward_intermediates(name, gen):
    """timm.create_model(features_only=True) converted, and forward_intermediates of a converted
    model: the same features as the unconverted model, from the fused kernels."""
    kwargs = (dict(channels=(8, 8, 16, 16), stem_width=8) if name == "resnet18" else
              dict(channels=(16, 16, 32, 32), stem_chs=8, norm_layer=BatchNormAct2d, conv_layer=create_conv2d))
    kwargs["layers"] = [1, 1, 1, 1]
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    x = image(gen)
    for features_only in (True, False):
        torch.manual_seed(seed)
        eager = timm.create_model(name, pretrained=False, features_only=features_only, **kwargs).eval()
        exact = copy.deepcopy(eager).double()
        fused = rf.convert(copy.deepcopy(eager), backend="triton")
        with torch.no_grad():
            if features_only:
                want, ref = eager(x), exact(x.double())
                got, launches = fused_launches(lambda: fused(x))
            else:
                want = eager.forward_intermediates(x, indices=(1, 2, 3))
                ref = exact.forward_intermediates(x.double(), indices=(1, 2, 3))
                got, launches = fused_launches(lambda: fused.forward_intermediates(x, indices=(1, 2, 3)))
                parity(got[0], want[0], ref[0], "final features")
                want, got, ref = want[1], got[1], ref[1]
        assert launches > 0, features_only
        assert len(got) == len(want) >= 3
        for i, (a, b, c) in enumerate(zip(got, want, ref)):
            parity(a, b, c, f"features_only={features_only} feature {i}")


# ---------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript_script_runs_the_fused_ops(name, gen):
    """torch.jit.script of a converted model: the scripted forward calls the fused ops, train
    step (gradients, running statistics) and eval as eager; scripting leaves the eager model as
    it was; an FX-traced converted model scripts too."""
    eager, fused = pair(name, gen)
    scripted = torch.jit.script(fused)
    assert "resnet_fused::" in str(scripted.inlined_graph)
    check_train_step(scripted, eager, scripted, image(gen), gen)
    check_eval(scripted, eager, scripted, image(gen))
    check_eval(torch.jit.script(torch.fx.symbolic_trace(fused.eval())), eager, fused, image(gen))
    check_eval(fused, eager, fused, image(gen))  # the eager converted model still runs eagerly


def test_torchscript_save_load_in_a_fresh_process(gen, tmp_path):
    """A scripted converted model saved with torch.jit.save loads and runs in a fresh process
    that imports resnet_fused: the outputs of the in-process model, from the fused kernels."""
    scripted = {}
    for name in ("timm-postact", "timm-preact"):
        eager, fused = pair(name, gen)
        scripted[name] = torch.jit.script(fused.eval())
        torch.jit.save(scripted[name], str(tmp_path / f"{name}.pt"))
    x = image(gen)
    torch.save(x, tmp_path / "x.pt")
    run_fresh("""
        import torch, resnet_fused
        from resnet_fused.triton.launch import launch_counts, reset_launch_counts
        x = torch.load("x.pt")
        for name in ("timm-postact", "timm-preact"):
            m = torch.jit.load(name + ".pt")
            reset_launch_counts()
            with torch.no_grad():
                torch.save(m(x), name + ".out.pt")
            assert sum(launch_counts().values()) > 0, name
    """, tmp_path)
    for name, m in scripted.items():
        with torch.no_grad():
            want = m(x)
        close(torch.load(tmp_path / f"{name}.out.pt"), want, name)


def test_torchscript_timm_scriptable_models(gen):
    """Models built under timm's set_scriptable(True) convert and script the same way."""
    from timm.layers import set_scriptable

    with set_scriptable(True):
        eager, fused = pair("timm-postact", gen)
    scripted = torch.jit.script(fused)
    check_eval(scripted, eager, scripted, image(gen))


def test_torchscript_autocast_error_names_the_block_and_export(gen):
    """Autocast cannot reach a custom op inside TorchScript: the scripted block handed autocast's
    bf16 activations says so, names itself and points to torch.export."""
    _, fused = pair("timm-preact", gen)
    scripted = torch.jit.script(fused.eval())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(Exception, match="FusedBottleneck.*autocast.*torch.export"):
        scripted(image(gen))


# ---------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------


def _fused_targets(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "resnet_fused" in str(n.target)}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_eval_and_train(name, gen):
    """torch.export of a converted model: eval, and train mode (running statistics updated as
    buffer mutations), with the fused ops in the graph and eager's results."""
    eager, fused = pair(name, gen)
    x = image(gen)
    ep = torch.export.export(fused.eval(), (x,))
    assert _fused_targets(ep)
    check_eval(ep.module(), eager, fused, image(gen))
    ep_train = torch.export.export(fused.train(), (x,))
    assert _fused_targets(ep_train)
    trained = ep_train.module()
    exact = copy.deepcopy(eager).double().train()
    eager.train()
    want, ref = eager(x), exact(x.double())
    got, launches = fused_launches(lambda: trained(x))
    assert launches > 0
    parity(got, want, ref, "train output")
    got_buffers = dict(trained.named_buffers())
    for (k, be), bx in zip(eager.named_buffers(), exact.buffers()):
        if k.endswith("num_batches_tracked"):
            assert int(got_buffers[k]) == int(be), k
        else:
            parity(got_buffers[k], be, bx, k)


def test_export_save_load_in_a_fresh_process(gen, tmp_path):
    """torch.export.save / torch.export.load round-trip in a fresh process importing
    resnet_fused: same outputs, the fused ops in the loaded graph, the kernels running."""
    x = image(gen)
    torch.save(x, tmp_path / "x.pt")
    want = {}
    for name in MODELS:
        _, fused = pair(name, gen)
        ep = torch.export.export(fused.eval(), (x,))
        torch.export.save(ep, str(tmp_path / f"{name}.pt2"))
        with torch.no_grad():
            want[name] = ep.module()(x)
    run_fresh(f"""
        import torch, resnet_fused
        from resnet_fused.triton.launch import launch_counts, reset_launch_counts
        x = torch.load("x.pt")
        for name in {list(MODELS)!r}:
            ep = torch.export.load(name + ".pt2")
            assert any("resnet_fused" in str(n.target) for n in ep.graph.nodes), name
            reset_launch_counts()
            with torch.no_grad():
                torch.save(ep.module()(x), name + ".out.pt")
            assert sum(launch_counts().values()) > 0, name
    """, tmp_path)
    for name, w in want.items():
        close(torch.load(tmp_path / f"{name}.out.pt"), w, name)


# ---------------------------------------------------------------------------------------
# Convert: projections in all but form (Identity pool, stride-1 DownsampleAvg)
# ---------------------------------------------------------------------------------------


def _has_real_pool(block: nn.Module) -> bool:
    """Whether the block's shortcut average-pools (an AvgPool2d that is not a no-op)."""
    ds = getattr(block, "downsample", None)
    return ds is not None and any(isinstance(m, nn.AvgPool2d) for m in ds.modules())


def _has_attention(block: nn.Module) -> bool:
    return any(getattr(block, k, None) is not None and not isinstance(getattr(block, k), nn.Identity)
               for k in ("se", "attn"))


@pytest.mark.parametrize("name", ["resnet14t", "resnet26t", "resnet50d", "resnetv2_50d"])
def test_convert_fuses_projections_in_all_but_form(name):
    """ResNet-D/T variants: every block without a real average pool or attention converts
    (the stride-1 first projection included), and describe's reasons are true of their blocks."""
    model = timm.create_model(name, pretrained=False, num_classes=2,
                              **({"norm_layer": BatchNormAct2d} if name.startswith("resnetv2") else {}))
    blocks = {n: m for n, m in model.named_modules()
              if type(m).__name__ in ("BasicBlock", "Bottleneck", "PreActBottleneck", "PreActBasic")}
    expected = {n for n, m in blocks.items() if not _has_real_pool(m) and not _has_attention(m)}
    pooled = {n for n, m in blocks.items() if _has_real_pool(m)}
    rf.convert(model, backend="triton")
    leaves = tuple(rf.interop.leaf_modules())
    converted = {n for n, m in model.named_modules() if isinstance(m, leaves)}
    assert expected and converted == expected, (sorted(expected - converted), sorted(converted - expected))
    for path, info in rf.describe(model, as_dict=True).items():
        reason = info.get("reason") or ""
        if "average-pool" in reason or "avg" in reason.lower():
            assert path in pooled, (path, reason)
