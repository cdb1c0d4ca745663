"""Whole-model benchmark: training and inference images/s, eager vs torch.compile vs fused backends.

    python benchmarks/bench_models.py                          # GPU: resnet_v2_50, b256, AMP bf16
    python benchmarks/bench_models.py --models resnet_v2_50,resnext_v2_50_32x4d --modes infer
    python benchmarks/bench_models.py --classic                # also the ResNet-v2-152 b32 forward
    python benchmarks/bench_models.py --quick

Modes: ``train`` is one training step: forward under the dtype mode, cross-entropy against
random labels, backward, SGD (momentum 0.9, weight decay 1e-4) step, gradients set to None;
``infer`` is the eval-mode forward under no_grad. Both channels_last by default. images/s =
batch / median step time; TFLOP/s = 2 x MACs / s with the model's MACs from
``resnet_fused.count_macs`` (a train step counts 3x the forward MACs).

``--classic``: the benchmark of the TF-slim resnet_v2 write-up, ResNet-v2-152 forward in eval
mode at batch 32, 224x224, reported as mean +/- std ms per batch over ``--classic-batches``
batches after 10 burn-in batches, each timed on the host clock with the device synchronised
(launch overhead included: at batch 32 this model is launch-bound, which is why the CUDA-graph
variants are part of it). Its dtypes are ``--classic-dtype`` (the write-up ran fp32).

On a machine without a GPU it runs tiny sizes (batch 2, 64x64 images) in fp32, eager only, and
says so on its first line.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Without a GPU, run the Triton kernels under the interpreter (read when @triton.jit decorates a
# kernel, so before resnet_fused is imported). The device nodes tell, without importing torch.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet_fused

from benchmarks import faults, harness

MODES = ("train", "infer")
CLASSIC_MODEL = "resnet_v2_152"
CLASSIC_BATCH = 32
CLASSIC_BURN_IN = 10

CONVENTIONS = {
    "train": "one step: forward (dtype mode), cross-entropy on random labels, backward, SGD step "
             "(lr 1e-3, momentum 0.9, weight decay 1e-4), zero_grad(set_to_none=True)",
    "infer": "eval-mode forward under torch.no_grad",
    "images_per_s": "batch / median seconds per step",
    "tflops": "2 x MACs / median seconds; MACs from resnet_fused.count_macs on the model; a train step "
              "counts 3 x the forward MACs",
    "speedup": "speedup_vs_X = median ms of X / median ms of this row, same model, dtype and mode, same run",
    "memory": "peak_mib: max_memory_allocated during one step; peak_increment_mib: that minus the memory "
              "allocated just before it; n/a on CPU",
    "classic": "ResNet-v2-152 eval forward, batch 32, 224x224, mean +/- std ms per batch over N batches after "
               "10 burn-in batches, host clock with the device synchronised after each batch",
    "amp": "amp-* modes: fp32 parameters and fp32 images under torch.autocast",
}


TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
_FOREIGN = (TIMM_PREFIX, TORCHVISION_PREFIX)


def create_model(name: str, backend: str = "reference") -> nn.Module:
    """A package model, ``timm:<name>`` (timm's own model: pre-activation ``resnetv2_*`` or
    post-activation ``resnet*``) or ``torchvision:<name>`` (``torchvision.models.<name>()``, e.g.
    resnet50, resnext50_32x4d): eager as the library builds it for the reference, converted in
    place with ``resnet_fused.convert`` for a fused backend."""
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision  # optional: only for torchvision:<name> models

        model = getattr(torchvision.models, name[len(TORCHVISION_PREFIX):])()
    elif name.startswith(TIMM_PREFIX):
        import timm  # optional: only for timm:<name> models

        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False)
    else:
        return resnet_fused.create_model(name, backend=backend)
    if backend != "reference":
        model = resnet_fused.convert(model, backend=backend)
    return model


def check_models(spec: str) -> list[str]:
    """--models: package model names, timm:<name> and torchvision:<name> entries (the library
    checks its own names)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name.startswith(TORCHVISION_PREFIX):
            import torchvision

            if not callable(getattr(torchvision.models, name[len(TORCHVISION_PREFIX):], None)):
                raise ValueError(f"--models: torchvision has no model {name[len(TORCHVISION_PREFIX):]!r}")
    ours = [n for n in names if not n.startswith(_FOREIGN)]
    if ours:
        harness.parse_choices(",".join(ours), resnet_fused.list_models(), "--models")
    return names


class ModelBenchmark:
    """Runs the throughput cases (and the classic benchmark) and fills the run record."""

    def __init__(self, args: argparse.Namespace, device: torch.device, record: harness.RunRecord,
                 batch: int, image_size: int):
        self.args, self.device, self.record = args, device, record
        self.batch, self.image_size = batch, image_size
        self.memory_format = harness.MEMORY_FORMATS[args.memory_format]
        self.timing = harness.QUICK_TIMING if args.quick else harness.MODEL_TIMING
        self.budget = harness.Budget(args.budget_s)
        self.macs: dict[tuple[str, int, int], int] = {}

    def _prepare(self, dtype_mode: harness.DtypeMode) -> Callable[[nn.Module], nn.Module]:
        def prepare(module: nn.Module) -> nn.Module:
            return module.to(device=self.device, dtype=dtype_mode.params).to(memory_format=self.memory_format)
        return prepare

    def _forward_macs(self, model_name: str, batch: int, image_size: int) -> int:
        key = (model_name, batch, image_size)
        if key not in self.macs:
            with torch.device("meta"):
                model = create_model(model_name)
            self.macs[key] = resnet_fused.count_macs(model, (batch, 3, image_size, image_size)).total
        return self.macs[key]

    def _build_case(self, impl: harness.Implementation, model_name: str, dtype_mode: harness.DtypeMode,
                    batch: int, image_size: int) -> tuple[nn.Module, Callable, torch.Tensor]:
        """The module, the callable to time and the image batch; raises harness.NotMeasured."""
        harness.reset_compiled_state()
        # The same seed for every implementation: the same weights and images everywhere.
        harness.seed_everything(self.args.seed)
        prepare = self._prepare(dtype_mode)
        reference = prepare(create_model(model_name))
        images = torch.randn(batch, 3, image_size, image_size, device=self.device, dtype=dtype_mode.image_dtype)
        images = images.contiguous(memory_format=self.memory_format)
        module, run = harness.build_implementation(
            impl, lambda backend: create_model(model_name, backend), reference, prepare,
            self.device, self.args.compile_mode, cuda_on_cpu=self.args.dry_run)
        if impl.backend != "reference":
            if self.args.dry_run and faults.wants("model:eager-block"):
                faults.leave_one_block_eager(module)
            unfused = harness.unfused_blocks(module)
            if unfused is not None:
                raise harness.BuildFailed(unfused)
        return module, run, images

    def _skip_or_build(self, impl: harness.Implementation, budget_key: str, rows: list[dict],
                       first_case_s: float, *build_args):
        """Build a case, or mark its rows skipped (budget), unavailable or error and return None.
        ``budget_key`` names the kind of case whose past durations predict this one's."""
        reason = self.budget.refusal(budget_key, first_case_s)
        status = "skipped"
        if reason is None:
            try:
                return self._build_case(impl, *build_args)
            except harness.NotMeasured as exc:
                reason, status = str(exc), exc.status
            except Exception as exc:  # a case that cannot be set up must not lose the rest of the run
                reason, status = harness.short_error(exc), "error"
                harness.free_memory(self.device)
        for row in rows:
            row.update(status=status, reason=reason)
        self.record.rows.extend(rows)
        print(f"  {impl.name}: {status}: {reason}", flush=True)
        return None

    # -- throughput ---------------------------------------------------------------------------

    def run_throughput(self, models: list[str], dtype_modes: list[harness.DtypeMode], modes: list[str],
                       impls: list[harness.Implementation]) -> None:
        # Implementation-major, as in bench_blocks: under a budget the compiled variants, which
        # run last, are the ones left out.
        for impl in impls:
            for dtype_mode in dtype_modes:
                for model_name in models:
                    print(f"# {impl.name} {dtype_mode.name} {model_name} (batch {self.batch}, "
                          f"{self.image_size}x{self.image_size})", flush=True)
                    self._throughput_case(impl, model_name, dtype_mode, modes)
                    self.record.write()

    def _throughput_case(self, impl: harness.Implementation, model_name: str, dtype_mode: harness.DtypeMode,
                         modes: list[str]) -> None:
        rows = [{"what": "throughput", "model": model_name, "mode": mode, "dtype": dtype_mode.name,
                 "impl": impl.name, "batch": self.batch, "image_size": self.image_size,
                 "memory_format": self.args.memory_format, "status": None} for mode in modes]
        # A whole compiled ResNet-50 takes one to two minutes to compile per mode on an H100.
        built = self._skip_or_build(impl, impl.name, rows, 120.0 * len(modes) if impl.is_compiled else 20.0,
                                    model_name, dtype_mode, self.batch, self.image_size)
        if built is None:
            return
        module, run, images = built
        macs = self._forward_macs(model_name, self.batch, self.image_size)
        started = time.perf_counter()
        for row, mode in zip(rows, modes):
            fn = self._train_step(module, run, images, dtype_mode) if mode == "train" else \
                self._inference(module, run, images, dtype_mode)
            row.update(harness.measure(fn, self.device, self.timing,
                                       backend=impl.backend if impl.backend != "reference" else None))
            if row["status"] == "ok":
                row["images_per_s"] = harness.round_significant(self.batch / (row["median_ms"] * 1e-3))
                row["gmacs_per_image"] = round(macs / self.batch / 1e9, 4)
                row["tflops"] = harness.tflops(macs * (3 if mode == "train" else 1), row["median_ms"])
            self.record.rows.append(row)
            print("  " + _progress_line(row), flush=True)
        self.budget.observe(impl.name, time.perf_counter() - started)
        del module, run, images
        harness.free_memory(self.device)

    def _train_step(self, module: nn.Module, run: Callable, images: torch.Tensor,
                    dtype_mode: harness.DtypeMode) -> Callable[[], None]:
        module.train()
        labels = torch.randint(0, module.num_classes, (images.shape[0],), device=self.device)
        # A small learning rate: hundreds of steps on random data must not drive the weights to
        # inf/NaN, which would change what is being timed.
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def train_step() -> None:
            with dtype_mode.context(self.device):
                loss = F.cross_entropy(run(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return train_step

    def _inference(self, module: nn.Module, run: Callable, images: torch.Tensor,
                   dtype_mode: harness.DtypeMode) -> Callable[[], torch.Tensor]:
        module.eval()

        def inference() -> torch.Tensor:
            with torch.no_grad(), dtype_mode.context(self.device):
                return run(images)
        return inference

    # -- classic ------------------------------------------------------------------------------

    def run_classic(self, dtype_modes: list[harness.DtypeMode], impls: list[harness.Implementation],
                    batch: int, image_size: int, batches: int) -> None:
        burn_in = min(CLASSIC_BURN_IN, batches)
        for impl in impls:
            for dtype_mode in dtype_modes:
                print(f"# classic {impl.name} {dtype_mode.name} {CLASSIC_MODEL} (batch {batch}, "
                      f"{image_size}x{image_size}, {batches} batches)", flush=True)
                row = {"what": "classic", "model": CLASSIC_MODEL, "mode": "classic", "dtype": dtype_mode.name,
                       "impl": impl.name, "batch": batch, "image_size": image_size, "batches": batches,
                       "burn_in": burn_in, "memory_format": self.args.memory_format, "status": None}
                built = self._skip_or_build(impl, f"classic {impl.name}", [row],
                                            180.0 if impl.is_compiled else 20.0,
                                            CLASSIC_MODEL, dtype_mode, batch, image_size)
                if built is None:
                    self.record.write()
                    continue
                module, run, images = built
                started = time.perf_counter()
                fn = self._inference(module, run, images, dtype_mode)
                try:
                    warmup_s = harness.warm_up(fn, self.device)
                    times_ms = harness.time_each_call(fn, self.device, batches, burn_in)
                except Exception as exc:  # one failing variant must not lose the others
                    row.update(status="error", reason=harness.short_error(exc))
                else:
                    row.update(status="ok", warmup_s=round(warmup_s, 3),
                               mean_ms=harness.round_significant(statistics.fmean(times_ms)),
                               std_ms=harness.round_significant(statistics.stdev(times_ms)) if batches > 1 else 0.0,
                               median_ms=harness.round_significant(statistics.median(times_ms)),
                               images_per_s=harness.round_significant(batch / (statistics.fmean(times_ms) * 1e-3)))
                self.record.rows.append(row)
                print("  " + _progress_line(row), flush=True)
                self.budget.observe(f"classic {impl.name}", time.perf_counter() - started)
                del module, run, images
                harness.free_memory(self.device)
                self.record.write()


def _progress_line(row: dict) -> str:
    head = f"{row['mode']:<7} {row['impl']:<28}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('reason', '')}"
    if row["what"] == "classic":
        return f"{head} {row['mean_ms']:.2f} +/- {row['std_ms']:.2f} ms/batch  warm-up {row['warmup_s']:.1f} s"
    return (f"{head} {row['median_ms']:.2f} ms [{row['q20_ms']:.2f}, {row['q80_ms']:.2f}]  "
            f"{row['images_per_s']:.0f} img/s  warm-up {row['warmup_s']:.1f} s")


THROUGHPUT_COLUMNS = [
    ("model", "model", ""), ("dtype", "dtype", ""), ("mode", "mode", ""), ("impl", "impl", ""),
    ("batch", "batch", "d"), ("median ms", "median_ms", ".2f"), ("q20 ms", "q20_ms", ".2f"),
    ("q80 ms", "q80_ms", ".2f"), ("img/s", "images_per_s", ".0f"), ("TFLOP/s", "tflops", ".3g"),
    ("peak MiB", "peak_mib", ".0f"), ("x eager", "speedup_vs_eager", ".3g"),
    ("x compile", "speedup_vs_compile", ".3g"),
]
CLASSIC_COLUMNS = [
    ("classic", "model", ""), ("dtype", "dtype", ""), ("impl", "impl", ""), ("batch", "batch", "d"),
    ("mean ms", "mean_ms", ".2f"), ("std ms", "std_ms", ".2f"), ("median ms", "median_ms", ".2f"),
    ("img/s", "images_per_s", ".0f"), ("x eager", "speedup_vs_eager", ".3g"),
    ("x compile", "speedup_vs_compile", ".3g"),
]


def plot(record: harness.RunRecord) -> str:
    panels: dict = {}
    for row in record.rows:
        if row["status"] != "ok":
            continue
        if row["what"] == "classic":
            panel, group = f"classic {CLASSIC_MODEL} b{row['batch']} infer", row["dtype"]
        else:
            panel, group = f"{row['dtype']} {row['mode']}", row["model"]
        panels.setdefault(panel, {}).setdefault(group, {})[row["impl"]] = row["images_per_s"]
    env = record.data["environment"]
    title = (f"resnet_fused models, {env['device_name']}, commit {env['commit'][:12]}"
             + (" (CPU: not GPU performance)" if env["device"] == "cpu" else ""))
    return harness.plot_grouped_bars(panels, record.png_path, "images/s", title)


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        description="Benchmark whole pre-activation ResNets: training and inference images/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="resnet_v2_50",
                        help=f"comma-separated, from {', '.join(resnet_fused.list_models())}, timm:<name> or "
                             "torchvision:<name> (the library's model, converted with resnet_fused.convert for the "
                             "fused rows; e.g. timm:resnetv2_50, timm:resnet50, torchvision:resnet50); 'none' runs "
                             "only --classic")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on a GPU, 64 on a CPU")
    parser.add_argument("--classic", action="store_true",
                        help=f"also run the classic benchmark: {CLASSIC_MODEL} eval forward, batch "
                             f"{CLASSIC_BATCH}, 224x224, mean +/- std ms per batch")
    parser.add_argument("--classic-dtype", default=None,
                        help="dtype modes of the classic benchmark. Default: fp32,amp-bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--classic-impls", default=None,
                        help="implementations of the classic benchmark. Default: as --impls plus the "
                             "CUDA-graph variants (compile-cudagraphs, <backend>+compile-cudagraphs)")
    parser.add_argument("--classic-batches", type=int, default=None,
                        help="timed batches of the classic benchmark (default 100; --quick or CPU: 5)")
    harness.add_common_arguments(parser, default_dtype="amp-bf16", default_modes=",".join(MODES), modes=MODES)
    return parser.parse_args(argv), parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, parser = parse_args(argv)
    device = harness.pick_device(args.device)
    harness.print_banner(device, harness.CPU_BANNER_EAGER_ONLY)
    # Interpreted Triton kernels take minutes per whole-model step: never by default here.
    dtype_modes, modes, impls = harness.check_common_arguments(parser, args, device, MODES, "amp-bf16",
                                                               interpreted_triton=False)
    try:
        injected = faults.install(args.dry_run)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        models = [] if args.models == "none" else check_models(args.models)
        classic_dtypes = [harness.DTYPE_MODES[m] for m in harness.parse_dtypes(
            args.classic_dtype, device, "fp32,amp-bf16", "--classic-dtype")]
        classic_impls = harness.parse_impls(args.classic_impls, device, with_cudagraphs=True,
                                            interpreted_triton=False)
    except ValueError as exc:
        parser.error(str(exc))
    if not models and not args.classic:
        parser.error("--models none: nothing to run without --classic")
    if args.image_size is not None and args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (five stride-2 stages), got {args.image_size}")
    if args.classic_batches is not None and args.classic_batches < 2:
        parser.error(f"--classic-batches must be at least 2 (a standard deviation needs two), got {args.classic_batches}")
    gpu = device.type == "cuda"
    batch = args.batch or (256 if gpu else 2)
    image_size = args.image_size or (224 if gpu else 64)
    classic_batch, classic_size = (CLASSIC_BATCH, 224) if gpu else (2, 64)
    classic_batches = args.classic_batches or (5 if args.quick or not gpu else 100)
    harness.configure_torch(device, args.cpu_threads)

    record = harness.RunRecord("bench_models", args, device, CONVENTIONS)
    record.data["config"]["resolved"] = {
        "batch": batch, "image_size": image_size, "models": models, "dtypes": [m.name for m in dtype_modes],
        "modes": modes, "impls": [i.name for i in impls],
        "classic": {"batch": classic_batch, "image_size": classic_size, "batches": classic_batches,
                    "dtypes": [m.name for m in classic_dtypes], "impls": [i.name for i in classic_impls]}
        if args.classic else None,
        "timing": vars(harness.QUICK_TIMING if args.quick else harness.MODEL_TIMING),
    }
    if not gpu:
        record.note(harness.CPU_BANNER)
    if injected or (args.dry_run and faults.wants("model:eager-block")):
        record.data["fault_injected"] = ", ".join(filter(None, [injected, args.dry_run and faults.wants(
            "model:eager-block") and "model:eager-block"]))
    print(f"device {record.data['environment']['device_name']}, torch {torch.__version__}, "
          f"backends {list(resnet_fused.available_backends())}, batch {batch}, image {image_size}, "
          f"dtypes {[m.name for m in dtype_modes]}, impls {[i.name for i in impls]}", flush=True)

    # The ceilings say whether this machine was itself (clocks, throttling) when runs disagree.
    record.data["ceilings"] = harness.measure_ceilings(
        device, [m.compute for m in dtype_modes + (classic_dtypes if args.classic else [])])
    print(f"ceilings: matmul {record.data['ceilings']['matmul_tflops']} TFLOP/s, "
          f"copy {record.data['ceilings']['copy_tbps']} TB/s", flush=True)
    bench = ModelBenchmark(args, device, record, batch, image_size)
    if models:
        bench.run_throughput(models, dtype_modes, modes, impls)
    if args.classic:
        bench.run_classic(classic_dtypes, classic_impls, classic_batch, classic_size, classic_batches)
    throughput = [r for r in record.rows if r["what"] == "throughput"]
    classic = [r for r in record.rows if r["what"] == "classic"]
    harness.add_speedups(throughput, ("model", "dtype", "mode"))
    harness.add_speedups(classic, ("dtype",), value="mean_ms")
    path = record.write(complete=True)

    if throughput:
        print(harness.format_table([r for r in throughput if r["status"] in ("ok", "error")], THROUGHPUT_COLUMNS))
    if classic:
        print(harness.format_table([r for r in classic if r["status"] in ("ok", "error")], CLASSIC_COLUMNS))
    plot_note = "no plot: --no-plot" if args.no_plot else plot(record)
    for line in harness.summary_lines(record.rows, list(dict.fromkeys(impls + classic_impls)), "mode"):
        print(line)
    print(f"JSON: {path}")
    print(plot_note)
    if not gpu:
        print("(CPU-only machine: tiny sizes; these numbers are not GPU performance.)")
    return harness.exit_code(record.rows)


if __name__ == "__main__":
    raise SystemExit(main())
