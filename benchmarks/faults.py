"""Fault injection for the GPU check's CPU dry run.

``GPU_CHECK_DRY_RUN_FAULT`` holds comma-separated faults, read only on the dry-run paths
(``scripts/gpu_parity.py --dry-run``, the benchmarks' ``--dry-run``):

* ``cuda:<op>[:<kind>]``: one C++ op of the cuda backend fails (``<op>``: a
  ``torch.ops.resnet_fused.<op>_cuda`` op, e.g. ``conv_fwd``; ``<kind>``: ``raise``, the default,
  raises the error string a CUDA fault gives; ``hang`` sleeps until the caller's timeout). The op
  is replaced on the ``torch.ops.resnet_fused`` namespace in this process, the object the cuda
  backend's launchers call, so everything above it (launcher, autograd function, module) runs as
  it would when the kernel itself faults (:func:`install`);
* ``model:eager-block``: the model benchmark's fused models get one block back as eager
  (``resnet_fused.unconvert``), as a ``convert()`` that does not recognise a block leaves it
  (:func:`leave_one_block_eager`): the rows must come out as errors, not timings.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

import resnet_fused

ENV = "GPU_CHECK_DRY_RUN_FAULT"
KINDS = ("raise", "hang")
#: What the injected fault raises: the text a poisoned CUDA context gives, so that the scripts'
#: failure classification is exercised as on the GPU.
MESSAGE = "CUDA error: an illegal memory access was encountered (fault injected by {env}={spec})"


def specs() -> list[str]:
    return [p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()]


def wants(spec: str) -> bool:
    """Whether the fault ``spec`` (e.g. ``model:eager-block``) is asked for."""
    return spec in specs()


def leave_one_block_eager(model: torch.nn.Module) -> str:
    """Swap ``model``'s last fused block back to its eager twin, in place; its path."""
    fused = [path for path, info in resnet_fused.describe(model, as_dict=True).items() if info.get("fused")]
    if not fused:
        raise ValueError("leave_one_block_eager: the model has no fused block")
    path = fused[-1]
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, resnet_fused.unconvert(getattr(parent, name)))
    return path


def parse(spec: str) -> tuple[str, str]:
    """``cuda:<op>[:<kind>]`` -> (op, kind); ValueError saying what is accepted otherwise."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "cuda" or not parts[1]:
        raise ValueError(f"{ENV}={spec!r}: expected cuda:<op>[:raise|hang], e.g. cuda:conv_fwd")
    kind = parts[2] if len(parts) == 3 else "raise"
    if kind not in KINDS:
        raise ValueError(f"{ENV}={spec!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    return parts[1], kind


def install(dry_run: bool) -> Optional[str]:
    """Install the fault named by the environment variable when ``dry_run``; returns what was
    installed (None: nothing asked, or not a dry run)."""
    cuda = [s for s in specs() if s.startswith("cuda:")]
    unknown = [s for s in specs() if not s.startswith("cuda:") and s != "model:eager-block"]
    if not dry_run or not specs():
        return None
    if unknown or len(cuda) > 1:
        raise ValueError(f"{ENV}: {unknown or cuda}: expected at most one cuda:<op>[:raise|hang] and "
                         "model:eager-block")
    if not cuda:
        return None
    spec = cuda[0]
    op_name, kind = parse(spec)
    resnet_fused.available_backends()  # loads the compiled extension when it is there
    namespace = torch.ops.resnet_fused
    name = f"{op_name}_cuda"
    if not hasattr(namespace, name):
        raise ValueError(f"{ENV}={spec!r}: torch.ops.resnet_fused has no op {name!r} (is the extension built?)")
    message = MESSAGE.format(env=ENV, spec=spec)

    def faulty(*args, **kwargs):
        if kind == "hang":
            while True:
                time.sleep(60)
        raise RuntimeError(message)

    setattr(namespace, name, faulty)
    return f"{name}: {kind}"


def classify(text: str, timed_out: bool = False) -> str:
    """The kind of a backend's failure from its error text: ``timeout``, ``cuda error`` (a CUDA
    error string: the context is poisoned), ``crash`` (the process died without an error) or
    ``exception``."""
    if timed_out:
        return "timeout"
    lowered = text.lower()
    if "cuda error" in lowered or "illegal memory access" in lowered or "unspecified launch failure" in lowered \
            or "cudaerror" in lowered or "device-side assert" in lowered:
        return "cuda error"
    if not text.strip() or "core dumped" in lowered or "segmentation fault" in lowered:
        return "crash"
    return "exception"
