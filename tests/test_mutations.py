"""Mutation suite: known faults injected into each fused backend must fail the parity checks.

A parity check that a wrong kernel passes proves nothing. Here each fault is injected through a
test-only hook (the kernel-set object's method is replaced by a wrapper for the duration of one
test, with pytest's monkeypatch: nothing in the package changes), and the very same check
functions the parity tests use (``block_cases.check_backward``, which also compares the output
of the same step) must raise AssertionError.

Faults, and the paths (kernel-set calls) each one is injected into:

* ``wgrad-x1.05``: the weight gradient of every 1x1 (path ``1x1``) or every 3x3 (``3x3``) conv
  scaled by 1.05;
* ``dropped-tap``: one 3x3 tap (row 0, column 1) left out of the forward conv (``fwd``), the
  dgrad (``dgrad``) or the wgrad (``wgrad``, that tap's dW is never written: zero);
* ``relu-mask``: channel 0's ReLU mask inverted ([z < 0] instead of [z > 0]) in every forward
  conv's prologue (``fwd``: relu(-z) with the sign of that input channel's weights flipped) or in
  the backward's dgrad / relu_grad_sums epilogue (``bwd``);
* ``stats-count``: batch statistics over n + 1 values instead of n (``fwd``: mean and biased
  variance of ``finalize`` divided by n + 1) or the BN-backward coefficients with count n + 1
  (``bwd``, train-mode norms);
* ``shortcut-twice``: the shortcut's gradient added twice: the identity / subsample gradient in
  the final BN-backward apply (``add``) or the projection's dgrad K-loop (``proj``); in the
  post-activation closing pass relu(bn(y) + shortcut), the shortcut added twice
  (``closing-fwd``: ``postact_out``);
* ``wgrad-x1.05`` on ``raw``: the weight gradient of a conv whose input is the raw block input
  (the post-activation first conv and projection: ``plain_conv_wgrad``) scaled by 1.05;
* ``relu-mask`` on ``closing-bwd``: channel 0's mask [z > 0] of the closing pass inverted in its
  backward (``postact_out_backward``'s g');
* ``sums-x1.05`` on ``closing-bwd``: the BN-backward partial sums the closing pass's backward
  returns for the last norm scaled by 1.05.

A hook counts its hits; a case "runs the path" when the hook fired, and then the check must
fail. Pre-activation cases (``block_cases.CASES``) go through ``check_backward``,
post-activation ones (``block_cases.POSTACT_CASES``, torchvision's blocks as the twins) through
``check_postact_backward``. CI runs each fault x path x backend x dtype once on the
pre-activation cases (fp32 and fp16 for both backends, bf16 for the CUDA host emulator) and, on
the post-activation ones, each closing-pass / raw-input fault once per backend and every other
fault once on the CUDA host emulator (dtype alternating), cycling through
the cases that run it; RESNET_FUSED_MUTATIONS=all runs every case that runs the path, both
backends, fp32 and fp16 (and bf16 on the pre-activation cases), train and frozen (the full
sweep).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from block_cases import CASES, POSTACT_CASES, check_backward, check_postact_backward, postact_projection, shortcut_of
from helpers import requires_triton
from resnet_fused import _extension

#: (fault, path) -> installer(kernel_set, monkeypatch, hits)
FAULTS = {}


def fault(name: str, path: str):
    def register(fn):
        FAULTS[(name, path)] = fn
        return fn
    return register


def _wrap(ks, monkeypatch, method: str, make):
    """Replace ``ks.method`` (on the instance) by ``make(original)``."""
    monkeypatch.setattr(ks, method, make(getattr(ks, method)))


def _arg(args, kwargs, index: int, name: str):
    return kwargs[name] if name in kwargs else args[index]


def _set_arg(args, kwargs, index: int, name: str, value):
    if name in kwargs or len(args) <= index:
        kwargs = dict(kwargs, **{name: value})
    else:
        args = args[:index] + (value,) + args[index + 1:]
    return args, kwargs


def _wgrad_scaled(ksize: int):
    def install(ks, monkeypatch, hits):
        def make(orig):
            def conv_wgrad(*args, **kwargs):
                out = orig(*args, **kwargs)
                if kwargs.get("ksize", 1) == ksize:
                    hits.append("conv_wgrad")
                    return out * 1.05
                return out
            return conv_wgrad
        _wrap(ks, monkeypatch, "conv_wgrad", make)
    return install


fault("wgrad-x1.05", "1x1")(_wgrad_scaled(1))
fault("wgrad-x1.05", "3x3")(_wgrad_scaled(3))

TAP = (0, 1)


def _drop_tap(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[:, :, TAP[0], TAP[1]] = 0
    return w


@fault("dropped-tap", "fwd")
def _(ks, monkeypatch, hits):
    def make(orig):
        def conv(x, weight, *args, **kwargs):
            if weight.shape[-1] == 3:
                hits.append("conv")
                weight = _drop_tap(weight)
            return orig(x, weight, *args, **kwargs)
        return conv
    _wrap(ks, monkeypatch, "conv", make)


@fault("dropped-tap", "dgrad")
def _(ks, monkeypatch, hits):
    def make(orig):
        def conv_dgrad(grad, weight, *args, **kwargs):
            if weight.shape[-1] == 3:
                hits.append("conv_dgrad")
                weight = _drop_tap(weight)
            return orig(grad, weight, *args, **kwargs)
        return conv_dgrad
    _wrap(ks, monkeypatch, "conv_dgrad", make)


@fault("dropped-tap", "wgrad")
def _(ks, monkeypatch, hits):
    def make(orig):
        def conv_wgrad(*args, **kwargs):
            out = orig(*args, **kwargs)
            if kwargs.get("ksize", 1) == 3:
                hits.append("conv_wgrad")
                out = out.clone()
                out[:, :, TAP[0], TAP[1]] = 0
            return out
        return conv_wgrad
    _wrap(ks, monkeypatch, "conv_wgrad", make)


def _flip_channel0(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0] = -t[0]
    return t


@fault("relu-mask", "fwd")
def _(ks, monkeypatch, hits):
    """relu(-z) * (-w) = z [z < 0] w on input channel 0: that channel's mask inverted."""
    def make(orig):
        def conv(x, weight, *args, **kwargs):
            if kwargs.get("scale") is not None:
                hits.append("conv")
                kwargs = dict(kwargs, scale=_flip_channel0(kwargs["scale"]), shift=_flip_channel0(kwargs["shift"]))
                weight = weight.clone()
                c_out_per_group = weight.shape[0] // kwargs.get("groups", 1)
                weight[:c_out_per_group, 0] = -weight[:c_out_per_group, 0]  # input channel 0 is group 0's
            return orig(x, weight, *args, **kwargs)
        return conv
    _wrap(ks, monkeypatch, "conv", make)


@fault("relu-mask", "bwd")
def _(ks, monkeypatch, hits):
    """The backward's mask [v * scale + shift > 0] inverted on channel 0 (dgrad epilogue, or the
    hybrid's relu_grad_sums): scale and shift negated there only."""
    def make_dgrad(orig):
        def conv_dgrad(grad, weight, v, scale, shift, *args, **kwargs):
            hits.append("conv_dgrad")
            return orig(grad, weight, v, _flip_channel0(scale), _flip_channel0(shift), *args, **kwargs)
        return conv_dgrad

    def make_sums(orig):
        def relu_grad_sums(grad, v, scale, shift, *args, **kwargs):
            hits.append("relu_grad_sums")
            return orig(grad, v, _flip_channel0(scale), _flip_channel0(shift), *args, **kwargs)
        return relu_grad_sums
    _wrap(ks, monkeypatch, "conv_dgrad", make_dgrad)
    _wrap(ks, monkeypatch, "relu_grad_sums", make_sums)


def _count_plus_one(mean, var, part, weight, bias, eps):
    """(mean, var, invstd, scale, shift) of n values computed as if there were n + 1."""
    n = part[0].sum(0)
    mean, var = mean * n / (n + 1), var * n / (n + 1)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
    shift = -mean * scale + (bias.to(scale.dtype) if bias is not None else 0)
    return mean, var, invstd, scale, shift


@fault("stats-count", "fwd")
def _(ks, monkeypatch, hits):
    """Batch statistics over n + 1 values: the kernel set's finalize (``finalize_stats``, [5, C]
    = mean, var, invstd, scale, shift, where the kernel set has it; else ``finalize``)."""
    def make_stats(orig):
        def finalize_stats(part, weight, bias, eps, *args, **kwargs):
            out = orig(part, weight, bias, eps, *args, **kwargs)
            if part is None or kwargs.get("from_running"):
                return out
            hits.append("finalize_stats")
            return torch.stack(_count_plus_one(out[0], out[1], part, weight, bias, eps)).to(out.dtype)
        return finalize_stats

    def make(orig):
        def finalize(part, weight, bias, eps, *args, **kwargs):
            hits.append("finalize")
            mean, var, _, _ = orig(part, weight, bias, eps, *args, **kwargs)
            mean, var, _, scale, shift = _count_plus_one(mean, var, part, weight, bias, eps)
            return mean, var, scale, shift
        return finalize
    if hasattr(ks, "finalize_stats"):
        _wrap(ks, monkeypatch, "finalize_stats", make_stats)
    else:
        _wrap(ks, monkeypatch, "finalize", make)


@fault("stats-count", "bwd")
def _(ks, monkeypatch, hits):
    def make(orig):
        def bn_backward_coefficients(*args, **kwargs):
            training = _arg(args, kwargs, 5, "training")
            if training:
                hits.append("bn_backward_coefficients")
                args, kwargs = _set_arg(args, kwargs, 4, "count", _arg(args, kwargs, 4, "count") + 1)
            return orig(*args, **kwargs)
        return bn_backward_coefficients
    _wrap(ks, monkeypatch, "bn_backward_coefficients", make)


@fault("shortcut-twice", "add")
def _(ks, monkeypatch, hits):
    def make(orig):
        def bn_backward_apply(*args, **kwargs):
            shortcut_grad = _arg(args, kwargs, 3, "shortcut_grad") if len(args) > 3 or "shortcut_grad" in kwargs \
                else None
            if shortcut_grad is not None:
                hits.append("bn_backward_apply")
                args, kwargs = _set_arg(args, kwargs, 3, "shortcut_grad", shortcut_grad * 2)
            return orig(*args, **kwargs)
        return bn_backward_apply
    _wrap(ks, monkeypatch, "bn_backward_apply", make)


@fault("shortcut-twice", "proj")
def _(ks, monkeypatch, hits):
    def make(orig):
        def conv_dgrad(*args, **kwargs):
            if kwargs.get("second_grad") is not None:
                hits.append("conv_dgrad")
                kwargs = dict(kwargs, second_grad=kwargs["second_grad"] * 2)
            return orig(*args, **kwargs)
        return conv_dgrad
    _wrap(ks, monkeypatch, "conv_dgrad", make)


@fault("wgrad-x1.05", "raw")
def _(ks, monkeypatch, hits):
    def make(orig):
        def plain_conv_wgrad(*args, **kwargs):
            hits.append("plain_conv_wgrad")
            return orig(*args, **kwargs) * 1.05
        return plain_conv_wgrad
    _wrap(ks, monkeypatch, "plain_conv_wgrad", make)


@fault("shortcut-twice", "closing-fwd")
def _(ks, monkeypatch, hits):
    def make(orig):
        def postact_out(y, scale, shift, sc, *args, **kwargs):
            hits.append("postact_out")
            return orig(y, scale, shift, sc * 2, *args, **kwargs)
        return postact_out
    _wrap(ks, monkeypatch, "postact_out", make)


@fault("relu-mask", "closing-bwd")
def _(ks, monkeypatch, hits):
    """g' = grad * [z <= 0] on channel 0: the closing ReLU's mask inverted there."""
    def make(orig):
        def postact_out_backward(grad, *args, **kwargs):
            hits.append("postact_out_backward")
            g_z, part, part_d = orig(grad, *args, **kwargs)
            g_z = g_z.clone()
            g_z[:, 0] = grad[:, 0] - g_z[:, 0]
            return g_z, part, part_d
        return postact_out_backward
    _wrap(ks, monkeypatch, "postact_out_backward", make)


@fault("sums-x1.05", "closing-bwd")
def _(ks, monkeypatch, hits):
    def make(orig):
        def postact_out_backward(*args, **kwargs):
            hits.append("postact_out_backward")
            g_z, part, part_d = orig(*args, **kwargs)
            return g_z, part * 1.05, part_d
        return postact_out_backward
    _wrap(ks, monkeypatch, "postact_out_backward", make)


def kernel_set(backend: str):
    if backend == "cuda":
        from resnet_fused.cuda.kernel_set import CUDA
        return CUDA
    from resnet_fused.triton.kernel_set import TRITON
    return TRITON


#: Faults whose path only the post-activation blocks run (their closing pass, raw-input wgrad).
POSTACT_ONLY = {("wgrad-x1.05", "raw"), ("shortcut-twice", "closing-fwd"), ("relu-mask", "closing-bwd"),
                ("sums-x1.05", "closing-bwd")}


#: Which cases can run a path (the hook decides; this only keeps CI's cycle on cases that do).
def _runs(path_key, case: str) -> bool:
    if case in POSTACT_CASES:
        kind = POSTACT_CASES[case][0]
        if path_key == ("wgrad-x1.05", "1x1"):  # conv1 and the projection are raw-input wgrads
            return kind == "bottleneck"
        if path_key == ("shortcut-twice", "add"):  # the identity's gradient is added by the op
            return False
        if path_key == ("shortcut-twice", "proj"):
            return postact_projection(case)
        return True
    if path_key in POSTACT_ONLY:
        return False
    kind, shortcut = CASES[case][0], shortcut_of(case)
    if path_key == ("wgrad-x1.05", "1x1"):
        return kind == "bottleneck" or shortcut == "projection"
    if path_key == ("shortcut-twice", "add"):
        return shortcut in ("identity", "subsample")
    if path_key == ("shortcut-twice", "proj"):
        return shortcut == "projection"
    return True


BACKEND_DTYPES = [("triton", torch.float32), ("triton", torch.float16),
                  ("cuda", torch.float32), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


POSTACT_BACKEND_DTYPES = [("triton", torch.float32), ("triton", torch.float16),
                          ("cuda", torch.float32), ("cuda", torch.float16)]


def _ci_matrix():
    """Pre-activation: each fault x path x backend x dtype once; post-activation: each fault x
    path once per backend, fp32 and fp16 alternating; train mode, cycling through the cases
    that run it."""
    rows, counter = [], itertools.count()
    for key in FAULTS:
        eligible = [c for c in CASES if _runs(key, c)]
        for backend, dtype in BACKEND_DTYPES if eligible else ():
            rows.append((key, backend, dtype, eligible[next(counter) % len(eligible)], "train"))
    post = itertools.count()
    for f, key in enumerate(FAULTS):
        eligible = [c for c in POSTACT_CASES if _runs(key, c)]
        # The post-activation kernels' faults on both backends; the shared kernels' faults (their
        # Triton kernels are the pre-activation rows' above, the orchestration is backend-blind)
        # on the fast host emulator only.
        backends = ("triton", "cuda") if key in POSTACT_ONLY else ("cuda",)
        for b, backend in enumerate(backends if eligible else ()):
            rows.append((key, backend, (torch.float32, torch.float16)[(f + b) % 2],
                         eligible[next(post) % len(eligible)], "train"))
    return rows


def _full_matrix():
    pre = [(key, backend, dtype, case, mode) for key in FAULTS for backend, dtype in BACKEND_DTYPES
           for case in CASES if _runs(key, case) for mode in ("train", "frozen")]
    post = [(key, backend, dtype, case, mode) for key in FAULTS for backend, dtype in POSTACT_BACKEND_DTYPES
            for case in POSTACT_CASES if _runs(key, case) for mode in ("train", "frozen")]
    return pre + post


MATRIX = _full_matrix() if os.environ.get("RESNET_FUSED_MUTATIONS") == "all" else _ci_matrix()


def _needs(backend: str):
    if backend == "cuda" and not _extension.is_available():
        if os.environ.get("RESNET_FUSED_REQUIRE_C") == "1":
            pytest.fail(f"RESNET_FUSED_REQUIRE_C=1 but resnet_fused._C is missing: {_extension.unavailable_reason()}")
        pytest.skip(f"resnet_fused._C is not available: {_extension.unavailable_reason()}")


@requires_triton
@pytest.mark.parametrize("key,backend,dtype,case,mode", MATRIX,
                         ids=[f"{k[0]}-{k[1]}-{b}-{DTYPE_IDS[d]}-{c}-{m}" for k, b, d, c, m in MATRIX])
def test_fault_fails_the_parity_check(key, backend, dtype, case, mode, monkeypatch, gen):
    _needs(backend)
    hits: list = []
    FAULTS[key](kernel_set(backend), monkeypatch, hits)
    check = check_postact_backward if case in POSTACT_CASES else check_backward
    try:
        check(case, backend, mode, dtype, gen)
    except AssertionError as failure:
        assert hits, f"the check failed without the fault firing: {failure}"
        return
    if not hits:
        pytest.skip(f"{case} {mode} does not run the {key} path")
    pytest.fail(f"fault {key} ({len(hits)} hits) passed the {backend} {DTYPE_IDS[dtype]} parity check of {case} {mode}")


@requires_triton
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_unmutated_check_passes(backend, gen):
    """The control: the same check, no fault (the cases above fail because of the fault)."""
    _needs(backend)
    check_backward("bottleneck-projection-s2", backend, "train", torch.float16, gen)
    check_postact_backward("postact-bottleneck-projection-s2", backend, "train", torch.float16, gen)
