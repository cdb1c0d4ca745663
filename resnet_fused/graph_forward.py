"""The fused blocks' forward as graph tools see it: TorchScript's op-call forward, FX's leaf call.

FX: a fused block called with an ``torch.fx.Proxy`` (``torch.fx.symbolic_trace`` or any tracer,
torchvision's and timm's feature extractors included) records itself as one ``call_module``
node (:func:`fx_leaf_call`), so the traced GraphModule calls the block, which runs its fused op
on real tensors with every per-call decision (backend, folding, running statistics) made then.
The stage containers are traced through (their children become nodes, so feature extractors
find ``layer1``, ``stages.0``, ...); inside a traced graph stage fusion does not chain.

TorchScript: ``torch.jit.script`` of a model holding fused blocks compiles each block's ``forward``, which
under scripting returns ``self._script_forward(x)``: one of the methods below, attached to the
block classes. They gather the block's tensors and flags, apply the same rules as the eager
forward (running statistics moved by the training norms, eval-mode folding when nothing needs a
gradient, PyTorch's one-value-per-channel check, the input's memory format back) and call the
registered ops ``torch.ops.resnet_fused.*`` by their schemas, so a scripted model runs the same
fused kernels and autograd formulas, and a saved one runs wherever ``resnet_fused`` is imported
(which registers the ops).

What the scripted forward does not do: ``torch.autocast`` casts (TorchScript applies none to a
custom op; a scripted block handed autocast's half-precision activations raises, naming the
block and ``torch.export``, the supported path there; asking TorchScript whether CPU autocast is
on crashes torch 2.14's interpreter, so the dtype mismatch is the signal), the
``backend="auto"`` device table (a CUDA tensor runs Triton, a CPU tensor the reference), and
stage fusion (a scripted stage runs its blocks one by one; same result).

This module imports only torch: it sits below the module classes that use it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fx_leaf_call", "is_fx_proxy", "PreActBottleneckScript", "PreActBasicScript", "PostActScript",
           "SequentialScript"]


# ---------------------------------------------------------------------------------------
# FX
# ---------------------------------------------------------------------------------------


def is_fx_proxy(x: object) -> bool:
    """Whether ``x`` is an FX tracing Proxy (the module is being symbolically traced)."""
    return isinstance(x, torch.fx.Proxy)


def fx_leaf_call(module: torch.nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record ``module(x)`` as one ``call_module`` node of the graph ``x`` is traced into."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


# ---------------------------------------------------------------------------------------
# TorchScript: shared rules (TorchScript-compiled free functions)
# ---------------------------------------------------------------------------------------


def _op_backend(backend: str, x: Tensor, block: str) -> str:
    """The backend the op runs for one call; ``auto`` resolves by device (see the module doc)."""
    if backend == "auto":
        return "triton" if x.is_cuda else "reference"
    return backend


def _check_input(x: Tensor, in_chs: int, block: str) -> None:
    if x.dim() != 4:
        raise ValueError(block + " expects a 4-D (N, C, H, W) input, got " + str(x.dim()) + " dimensions")
    if x.shape[1] != in_chs:
        raise ValueError(block + " was built for " + str(in_chs) + " input channels, got an input with "
                         + str(x.shape[1]))
    if not x.is_floating_point():
        raise TypeError(block + " expects a floating-point input")


def _check_weight(x: Tensor, w: Tensor, block: str) -> None:
    if w.dtype != x.dtype:
        raise TypeError(
            block + " (TorchScript): input dtype and weight dtype differ. A scripted fused block runs in its "
            "module's dtype: convert the model with .to(dtype). Under torch.autocast TorchScript cannot apply "
            "autocast's casts to the fused op; torch.export and torch.compile are the supported paths there")
    if w.device != x.device:
        raise RuntimeError(block + ": input and parameters are on different devices")


def _trains(training: bool, running_mean: Optional[Tensor]) -> bool:
    return training or running_mean is None


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    if t is None:
        return torch.empty([0], dtype=dtype, device=like.device)
    return t


def _momentum(momentum: Optional[float]) -> float:
    return -1.0 if momentum is None else momentum


def _check_counts(training: List[bool], counts: List[int], block: str) -> None:
    for i in range(len(training)):
        if training[i] and counts[i] == 1:
            raise ValueError("Expected more than 1 value per channel when training (" + block
                             + ": a norm sees one value per channel)")


def _fold(training: List[bool], x: Tensor, params: List[Tensor]) -> bool:
    for t in training:
        if t:
            return False
    if not torch.is_grad_enabled():
        return True
    if x.requires_grad:
        return False
    for p in params:
        if p.requires_grad:
            return False
    return True


def _output_format(x: Tensor, out: Tensor) -> Tensor:
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous()
    return out


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


# ---------------------------------------------------------------------------------------
# Pre-activation blocks (FusedBottleneck / FusedBasicBlock): norm1..3 are BatchNormReLU2d
# ---------------------------------------------------------------------------------------


def _preact_norms(means: List[Optional[Tensor]], vars_: List[Optional[Tensor]], counters: List[Optional[Tensor]],
                  trains_mode: List[bool], x: Tensor) -> Tuple[List[Tensor], List[Tensor], List[bool], bool]:
    """(running_means [+ counters], running_vars, training, update_stats) as the op takes them."""
    training: List[bool] = []
    update = False
    for i in range(len(means)):
        t = _trains(trains_mode[i], means[i])
        training.append(t)
        if trains_mode[i] and means[i] is not None:
            update = True
    rm: List[Tensor] = [_or_empty(m, x, torch.float32) for m in means]
    if update:
        for c in counters:
            rm.append(_or_empty(c, x, torch.long))
    rv: List[Tensor] = [_or_empty(v, x, torch.float32) for v in vars_]
    return rm, rv, training, update


class PreActBottleneckScript:
    """Holder of the TorchScript forward (the block class takes ``_script_forward`` from here)."""

    def _script_forward(self, x: Tensor) -> Tensor:
        """``FusedBottleneck``'s forward under TorchScript."""
        block = "FusedBottleneck"
        _check_input(x, self.in_chs, block)
        backend = _op_backend(self.backend, x, block)
        _check_weight(x, self.conv1.weight, block)
        w_proj: Optional[Tensor] = None
        params = [self.conv1.weight, self.conv2.weight, self.conv3.weight, self.norm1.weight, self.norm1.bias,
                  self.norm2.weight, self.norm2.bias, self.norm3.weight, self.norm3.bias]
        if self.downsample is not None:
            w_proj = self.downsample.conv.weight
            params.append(self.downsample.conv.weight)
        means: List[Optional[Tensor]] = [self.norm1.running_mean, self.norm2.running_mean, self.norm3.running_mean]
        vars_: List[Optional[Tensor]] = [self.norm1.running_var, self.norm2.running_var, self.norm3.running_var]
        counters: List[Optional[Tensor]] = [self.norm1.num_batches_tracked, self.norm2.num_batches_tracked,
                                            self.norm3.num_batches_tracked]
        rm, rv, training, update = _preact_norms(
            means, vars_, counters, [self.norm1.training, self.norm2.training, self.norm3.training], x)
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        s1 = self.stride if self.stride_on == "1x1" else 1
        _check_counts(training, [n * h * w, n * _out_size(h, s1) * _out_size(w, s1),
                                 n * _out_size(h, self.stride) * _out_size(w, self.stride)], block)
        outs = torch.ops.resnet_fused.bottleneck_forward(
            x, self.conv1.weight, self.conv2.weight, self.conv3.weight, w_proj,
            [self.norm1.weight, self.norm2.weight, self.norm3.weight], [self.norm1.bias, self.norm2.bias, self.norm3.bias],
            rm, rv, training, [self.norm1.eps, self.norm2.eps, self.norm3.eps],
            self.stride, self.groups, self.shortcut, self.stride_on, _fold(training, x, params), backend,
            [_momentum(self.norm1.momentum), _momentum(self.norm2.momentum), _momentum(self.norm3.momentum)],
            update, None, False)
        return _output_format(x, outs[0])


class PreActBasicScript:
    """Holder of the TorchScript forward (the block class takes ``_script_forward`` from here)."""

    def _script_forward(self, x: Tensor) -> Tensor:
        """``FusedBasicBlock``'s forward under TorchScript."""
        block = "FusedBasicBlock"
        _check_input(x, self.in_chs, block)
        backend = _op_backend(self.backend, x, block)
        _check_weight(x, self.conv1.weight, block)
        w_proj: Optional[Tensor] = None
        params = [self.conv1.weight, self.conv2.weight, self.norm1.weight, self.norm1.bias,
                  self.norm2.weight, self.norm2.bias]
        if self.downsample is not None:
            w_proj = self.downsample.conv.weight
            params.append(self.downsample.conv.weight)
        means: List[Optional[Tensor]] = [self.norm1.running_mean, self.norm2.running_mean]
        vars_: List[Optional[Tensor]] = [self.norm1.running_var, self.norm2.running_var]
        counters: List[Optional[Tensor]] = [self.norm1.num_batches_tracked, self.norm2.num_batches_tracked]
        rm, rv, training, update = _preact_norms(
            means, vars_, counters, [self.norm1.training, self.norm2.training], x)
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        _check_counts(training, [n * h * w, n * _out_size(h, self.stride) * _out_size(w, self.stride)], block)
        outs = torch.ops.resnet_fused.basic_block_forward(
            x, self.conv1.weight, self.conv2.weight, w_proj,
            [self.norm1.weight, self.norm2.weight], [self.norm1.bias, self.norm2.bias],
            rm, rv, training, [self.norm1.eps, self.norm2.eps],
            self.stride, self.groups, self.shortcut, _fold(training, x, params), backend,
            [_momentum(self.norm1.momentum), _momentum(self.norm2.momentum)], update, None, False)
        return _output_format(x, outs[0])


# ---------------------------------------------------------------------------------------
# Post-activation blocks (FusedPostAct*, FusedTimm*): conv_i -> bn_i, closing relu(bn + shortcut)
# ---------------------------------------------------------------------------------------


class PostActScript:
    """Holder of the TorchScript forward (the block class takes ``_script_forward`` from here)."""

    def _script_forward(self, x: Tensor) -> Tensor:
        """The post-activation blocks' forward under TorchScript. Norms are BatchNorm2d or
        FrozenBatchNorm2d (no ``momentum``: a constant affine), told apart when the block is compiled."""
        block = "FusedPostActBlock"
        if x.dim() != 4:
            raise ValueError(block + " expects a 4-D (N, C, H, W) tensor")
        backend = _op_backend(self.backend, x, block)
        _check_weight(x, self.conv1.weight, block)
        weights = [self.conv1.weight, self.conv2.weight]
        strides = [self.conv1.stride[0], self.conv2.stride[0]]
        groups = [self.conv1.groups, self.conv2.groups]
        bn_w: List[Tensor] = [self.bn1.weight, self.bn2.weight]
        bn_b: List[Tensor] = [self.bn1.bias, self.bn2.bias]
        eps: List[float] = [self.bn1.eps, self.bn2.eps]
        means: List[Optional[Tensor]] = [self.bn1.running_mean, self.bn2.running_mean]
        vars_: List[Optional[Tensor]] = [self.bn1.running_var, self.bn2.running_var]
        frozen: List[bool] = [not hasattr(self.bn1, "momentum"), not hasattr(self.bn2, "momentum")]
        modes: List[bool] = [self.bn1.training, self.bn2.training]
        counters: List[Optional[Tensor]] = [None, None]
        moms: List[Optional[float]] = [None, None]
        if hasattr(self.bn1, "momentum"):
            counters[0], moms[0] = self.bn1.num_batches_tracked, self.bn1.momentum
        if hasattr(self.bn2, "momentum"):
            counters[1], moms[1] = self.bn2.num_batches_tracked, self.bn2.momentum
        if hasattr(self, "conv3"):
            weights.append(self.conv3.weight)
            strides.append(self.conv3.stride[0])
            groups.append(self.conv3.groups)
            bn_w.append(self.bn3.weight)
            bn_b.append(self.bn3.bias)
            eps.append(self.bn3.eps)
            means.append(self.bn3.running_mean)
            vars_.append(self.bn3.running_var)
            frozen.append(not hasattr(self.bn3, "momentum"))
            modes.append(self.bn3.training)
            if hasattr(self.bn3, "momentum"):
                counters.append(self.bn3.num_batches_tracked)
                moms.append(self.bn3.momentum)
            else:
                counters.append(None)
                moms.append(None)
        w_proj: Optional[Tensor] = None
        if self.downsample is not None:
            w_proj = self.downsample[0].weight
            bn_w.append(self.downsample[1].weight)
            bn_b.append(self.downsample[1].bias)
            eps.append(self.downsample[1].eps)
            means.append(self.downsample[1].running_mean)
            vars_.append(self.downsample[1].running_var)
            frozen.append(not hasattr(self.downsample[1], "momentum"))
            modes.append(self.downsample[1].training)
            if hasattr(self.downsample[1], "momentum"):
                counters.append(self.downsample[1].num_batches_tracked)
                moms.append(self.downsample[1].momentum)
            else:
                counters.append(None)
                moms.append(None)
        training: List[bool] = []
        for i in range(len(modes)):
            training.append((not frozen[i]) and _trains(modes[i], means[i]))
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        counts: List[int] = []
        for s in strides:
            h, w = _out_size(h, s), _out_size(w, s)
            counts.append(n * h * w)
        if w_proj is not None:
            counts.append(counts[-1])
        _check_counts(training, counts, block)
        params: List[Tensor] = weights + bn_w + bn_b
        if w_proj is not None:
            params.append(w_proj)
        update = False
        for i in range(len(training)):
            if training[i] and modes[i] and means[i] is not None:
                update = True
        rm: List[Tensor] = [_or_empty(m, x, torch.float32) for m in means]
        if update:
            for c in counters:
                rm.append(_or_empty(c, x, torch.long))
        mom: List[float] = [_momentum(m) for m in moms]
        outs = torch.ops.resnet_fused.postact_block_forward(
            x, weights, w_proj, bn_w, bn_b, rm, [_or_empty(v, x, torch.float32) for v in vars_], training, eps,
            strides, groups, _fold(training, x, params), backend, mom, update)
        return _output_format(x, outs[0])


# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------


class SequentialScript:
    """Holder of the TorchScript forward (the block class takes ``_script_forward`` from here)."""

    def _script_forward(self, x: Tensor) -> Tensor:
        """A stage container under TorchScript: its children in order (no statistics chaining)."""
        for module in self:
            x = module(x)
        return x

