"""What a benchmark runs: dtype modes, implementations by name (eager, torch.compile, the fused
backends), building them, and the proof that a fused module has no block left eager."""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

import resnet_fused

from benchmarks.environment import short_error


@dataclass(frozen=True)
class DtypeMode:
    """How a benchmark runs in a dtype, as eager does it (docs/design.md section 3).

    Pure (``bf16``): the module and its input are ``.to(dtype)``. AMP (``amp-bf16``): fp32
    parameters and buffers under ``torch.autocast``; the input is 16-bit because inside an
    autocast network a block's input is the previous conv's 16-bit output.
    """

    name: str
    storage: torch.dtype              # the input's / activations' dtype
    params: torch.dtype               # parameters and buffers
    autocast: Optional[torch.dtype]   # the autocast dtype, None for pure modes

    @property
    def compute(self) -> torch.dtype:
        """The dtype the matrix units run in: the ceiling a floor is taken against."""
        return self.autocast or self.storage

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype of a batch of images fed to a whole model: fp32 under AMP, as a data
        loader gives it (autocast casts at the first conv); the model's dtype otherwise."""
        return self.params

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.storage).element_size()

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


DTYPE_MODES: dict[str, DtypeMode] = {
    "fp32": DtypeMode("fp32", torch.float32, torch.float32, None),
    "bf16": DtypeMode("bf16", torch.bfloat16, torch.bfloat16, None),
    "fp16": DtypeMode("fp16", torch.float16, torch.float16, None),
    "amp-bf16": DtypeMode("amp-bf16", torch.bfloat16, torch.float32, torch.bfloat16),
    "amp-fp16": DtypeMode("amp-fp16", torch.float16, torch.float32, torch.float16),
}

MEMORY_FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def parse_choices(text: str, allowed: Iterable[str], option: str) -> list[str]:
    """A comma-separated option value, each item checked against ``allowed``, order kept,
    duplicates dropped. Raises ValueError with a message naming the option."""
    allowed = list(allowed)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: expected a comma-separated list from {', '.join(allowed)}; got {text!r}")
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise ValueError(f"{option}: unknown value(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------

#: torch.compile variants an implementation name can end in, and the compile mode each means
#: (None: the --compile-mode option's).
COMPILE_VARIANTS = {"compile": None, "compile-cudagraphs": "reduce-overhead"}
#: Backends of the package that can be benchmarked as fused implementations.
FUSED_BACKENDS = tuple(b for b in resnet_fused.BACKENDS if b not in ("reference", "auto"))


class NotMeasured(Exception):
    """A case that could not be set up; ``status`` is what its rows record."""

    status = "error"


class Unavailable(NotMeasured):
    """An implementation that cannot run here (not in this version, not built, no GPU, a shape
    the backend does not support): recorded, not a failure."""

    status = "unavailable"


class BuildFailed(NotMeasured):
    """An available implementation that failed to build: a failure of the run."""

    status = "error"


@dataclass(frozen=True)
class Implementation:
    """An implementation, by the name --impls gives it: a backend, possibly under torch.compile."""

    name: str
    backend: str                  # "reference" or a fused backend
    compile_variant: Optional[str]

    @classmethod
    def parse(cls, name: str) -> "Implementation":
        base, _, variant = name.partition("+")
        if base in COMPILE_VARIANTS and not variant:
            return cls(name, "reference", base)
        if base == "eager" and not variant:
            return cls(name, "reference", None)
        if base in FUSED_BACKENDS and (not variant or variant in COMPILE_VARIANTS):
            return cls(name, base, variant or None)
        raise ValueError(
            f"--impls: unknown implementation {name!r}; use eager, compile, compile-cudagraphs, a "
            f"fused backend ({', '.join(FUSED_BACKENDS)}) or <backend>+compile[-cudagraphs]")

    @property
    def is_compiled(self) -> bool:
        return self.compile_variant is not None


def fused_backends() -> list[str]:
    """The fused backends this installation can build (picked up automatically as they land)."""
    return [b for b in resnet_fused.available_backends() if b != "reference"]


def default_impls(device: torch.device, with_cudagraphs: bool = False,
                  interpreted_triton: bool = True) -> list[str]:
    """GPU: eager, compile and every available fused backend (``with_cudagraphs``: also under
    CUDA graphs). CPU: eager, plus the Triton backend when TRITON_INTERPRET=1 makes it run
    (interpreted) on the CPU and ``interpreted_triton`` allows it."""
    if device.type == "cpu":
        interpreted = (interpreted_triton and os.environ.get("TRITON_INTERPRET") == "1"
                       and "triton" in fused_backends())
        return ["eager"] + (["triton"] if interpreted else [])
    impls = ["eager", "compile"] + (["compile-cudagraphs"] if with_cudagraphs else [])
    for backend in fused_backends():
        impls.append(backend)
        if with_cudagraphs:
            impls.append(f"{backend}+compile-cudagraphs")
    return impls


def parse_impls(text: Optional[str], device: torch.device, with_cudagraphs: bool = False,
                interpreted_triton: bool = True) -> list[Implementation]:
    """The implementations to run, in the order they run: eager first (every ratio needs it),
    then the fused backends (what the benchmark is for), then the torch.compile variants
    (slowest to warm up: under a budget they are the ones left out)."""
    names = default_impls(device, with_cudagraphs, interpreted_triton) if text is None else \
        list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError("--impls: expected at least one implementation")
    impls = [Implementation.parse(name) for name in names]
    return sorted(impls, key=lambda i: (i.name != "eager", i.is_compiled))


def build_implementation(impl: Implementation, build: Callable[[str], nn.Module], reference: nn.Module,
               prepare: Callable[[nn.Module], nn.Module], device: torch.device,
               compile_mode: str, cuda_on_cpu: bool = False) -> tuple[nn.Module, Callable]:
    """The module (whose parameters get the gradients) and the callable to time.

    ``build(backend)`` makes a fresh module of that backend (CPU, fp32); ``reference`` is the
    eager module, already through ``prepare`` (device, dtype, memory format). A fused module
    gets the reference's weights and BN state, then the same ``prepare``. Raises Unavailable
    for a backend this installation cannot build (or the cuda backend without a GPU) and
    BuildFailed when an available backend fails to build the module. ``cuda_on_cpu`` (the GPU
    check's dry run) lets the cuda backend run its host emulator on CPU tensors.
    """
    if impl.backend == "reference":
        module = reference
    else:
        if impl.backend == "cuda" and device.type != "cuda" and not cuda_on_cpu:
            raise Unavailable("the cuda backend needs a CUDA GPU")
        if impl.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("the triton backend on a CPU needs TRITON_INTERPRET=1 (without it its "
                              "ops run the eager reference, which would be timed under its name)")
        try:
            resnet_fused.resolve_backend(impl.backend)  # the package's own reason when it cannot
        except (NotImplementedError, RuntimeError) as exc:
            raise Unavailable(f"not available in this version: {short_error(exc)}") from None
        try:
            module = build(impl.backend)
            # Same weights and BN state as the eager module: the implementations compute the
            # same function, and a fused module that cannot load them is a bug worth recording.
            module.load_state_dict(reference.state_dict())
            module = prepare(module)
        except NotImplementedError as exc:  # e.g. a shape this backend does not cover
            raise Unavailable(f"not supported: {short_error(exc)}") from None
        except Exception as exc:
            raise BuildFailed(f"building the {impl.backend} module failed: {short_error(exc)}") from None
    if not impl.is_compiled:
        return module, module
    mode = COMPILE_VARIANTS[impl.compile_variant] or compile_mode
    # dynamic=False: each shape gets its own static-shape graph, as a training run with a fixed
    # batch does; automatic dynamic shapes would otherwise kick in from the second shape on.
    compiled = torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)
    return module, compiled


def reset_compiled_state() -> None:
    """Forget compiled graphs between shapes (keeps the recompile counters from piling up)."""
    torch._dynamo.reset()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()



def unfused_blocks(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a fused row's) would not time fused kernels: no block found, or blocks
    that run eager (``resnet_fused.describe``); None when every block is fused."""
    blocks = resnet_fused.describe(module, as_dict=True)
    if not blocks:
        return "proof: no pre- or post-activation block found in the module (it would time eager)"
    eager = [f"{path} ({info.get('runs')})" for path, info in blocks.items() if not info.get("fused")]
    if eager:
        return (f"proof: {len(eager)} of {len(blocks)} blocks run eager, not fused: {', '.join(eager[:4])}"
                + (" ..." if len(eager) > 4 else ""))
    return None
