"""Build script for resnet_fused: the Python package plus, where a CUDA toolkit
is found, the compiled extension resnet_fused._C (csrc/).

Install (torch first: the extension compiles against the installed torch):

    pip install torch==2.14.1
    pip install --no-build-isolation -e .

A CUDA toolkit is enough; no GPU is needed to build.

Environment switches:
    RESNET_FUSED_BUILD_CUDA  unset: build _C if a CUDA toolkit is found, else
                             install pure Python; 1: build _C or fail; 0: never.
    TORCH_CUDA_ARCH_LIST     GPU targets, default "9.0a" (Hopper with wgmma).
                             ";"-separated, e.g. "8.0;9.0a"; "+PTX" also embeds PTX.
    MAX_JOBS                 parallel compile jobs; default min(cores, free GB / 4).
    NVCC_THREADS             nvcc --threads: compile several archs of one file in parallel.
    CUDA_HOME                toolkit root; default /usr/local/cuda when it has bin/nvcc.
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "9.0a"
TORCH_PIN = "torch==2.14.1"

# Commands that compile. The config is printed and skip notes shown only for
# these: pip runs setup.py several times per install (requirements, metadata,
# build), and one report per install is enough.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
IS_BUILD = any(arg in BUILD_COMMANDS for arg in sys.argv[1:])


def fail(message: str) -> None:
    """Stop the build with a message and exit status 1, without a traceback."""
    sys.exit(f"\nresnet_fused setup.py: error: {message}\n")


def note(message: str) -> None:
    if IS_BUILD:
        print(f"resnet_fused setup.py: {message}", flush=True)


def build_cuda_mode() -> str:
    value = os.environ.get("RESNET_FUSED_BUILD_CUDA", "").strip()
    modes = {"": "auto", "1": "force", "0": "skip"}
    if value not in modes:
        fail(f"RESNET_FUSED_BUILD_CUDA must be 0, 1 or unset, got {value!r}")
    return modes[value]


def import_torch():
    try:
        import torch
    except ImportError:
        fail(
            "torch is not importable in this build environment.\n"
            "The CUDA extension resnet_fused._C compiles against the installed torch, and pip's\n"
            "default build isolation hides it. Install torch, then build without isolation:\n"
            f"    pip install {TORCH_PIN}\n"
            "    pip install --no-build-isolation -e .\n"
            "(RESNET_FUSED_BUILD_CUDA=0 installs the pure-Python package without the extension.)"
        )
    return torch


def arch_gencode_flags(arch_list: str) -> list[str]:
    """Translates TORCH_CUDA_ARCH_LIST into explicit nvcc -gencode flags.

    We pass the flags ourselves (torch then adds none: its cpp_extension skips
    its own arch flags when the nvcc args already mention an arch) so the
    command line has exactly these targets. "9.0a" means SASS for sm_90a only:
    the arch-specific target where wgmma/setmaxnreg exist. A plain "9.0" next
    to "9.0a" is dropped: it would compile every file a second time without
    those instructions, which breaks (or stubs out) Hopper-only kernels, and
    sm_90a code already runs on every CC 9.0 GPU.
    """
    entries = [e for e in re.split(r"[;,\s]+", arch_list.strip()) if e]
    if not entries:
        fail("TORCH_CUDA_ARCH_LIST is empty")
    parsed = []
    for entry in entries:
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if not match:
            fail(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not understood; use compute "
                "capabilities like '8.0', '9.0a' or '9.0a+PTX', separated by ';'"
            )
        major, minor, suffix, ptx = match.groups()
        parsed.append((f"{major}{minor}", suffix.lower(), bool(ptx)))
    specific = {number for number, suffix, _ in parsed if suffix}
    flags = []
    for number, suffix, ptx in parsed:
        if not suffix and number in specific:
            note(f"TORCH_CUDA_ARCH_LIST: dropping plain {number[:-1]}.{number[-1]}, "
                 f"its arch-specific variant is also requested")
            continue
        target = number + suffix
        for flag in (f"-gencode=arch=compute_{target},code=sm_{target}",
                     f"-gencode=arch=compute_{target},code=compute_{target}" if ptx else None):
            if flag and flag not in flags:
                flags.append(flag)
    return flags


def default_max_jobs() -> tuple[int, str]:
    """min(cores, available memory / 4 GB): a heavy nvcc job (CUTLASS/CuTe
    templates) can take several GB, and running out of memory is slower than
    compiling serially."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    available_gb = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available_gb = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    if available_gb is None:
        return cores, f"{cores} cores"
    jobs = max(1, min(cores, int(available_gb // 4)))
    return jobs, f"{cores} cores, {available_gb:.0f} GB available"


def nvidia_wheel_include_dirs(cuda_major: str) -> list[str]:
    """Headers of the pip nvidia wheels (site-packages/nvidia/cu13/include):
    cuBLAS, cuSPARSE, cuRAND... that torch's CUDA headers may include but a
    bare toolkit may lack. Appended after the toolkit's own include dir so the
    toolkit's runtime headers (matching nvcc) take precedence."""
    spec = importlib.util.find_spec("nvidia")
    locations = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    dirs = []
    for location in locations:
        candidate = os.path.join(location, f"cu{cuda_major}", "include")
        if os.path.isdir(candidate) and candidate not in dirs:
            dirs.append(candidate)
    return dirs


def ensure_ninja_on_path() -> bool:
    """torch's BuildExtension looks for `ninja` on PATH; pip run as
    .venv/bin/pip (venv not activated) does not put .venv/bin there, and
    without ninja torch falls back to a slow serial build."""
    if shutil.which("ninja"):
        return True
    candidates = [os.path.dirname(sys.executable)]
    if importlib.util.find_spec("ninja") is not None:
        import ninja

        candidates.append(ninja.BIN_DIR)
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        fail(f"cannot run nvcc from CUDA_HOME={cuda_home}: {exc}")
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def cuda_extensions() -> tuple[list, dict]:
    """Returns (ext_modules, cmdclass): the _C extension, or nothing when the
    CUDA build is skipped."""
    mode = build_cuda_mode()
    if mode == "skip":
        note("RESNET_FUSED_BUILD_CUDA=0: building the pure-Python package without resnet_fused._C")
        return [], {}

    torch = import_torch()
    # torch.utils.cpp_extension resolves CUDA_HOME when it is imported, and on
    # machines where `nvcc` on PATH is a wrapper script its guess is wrong, so
    # set a default before that import.
    if not os.environ.get("CUDA_HOME") and os.path.isfile(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} was built without CUDA"
    elif not CUDA_HOME or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problem = f"no CUDA toolkit found (no bin/nvcc under {CUDA_HOME or DEFAULT_CUDA_HOME})"
    if problem:
        if mode == "force":
            fail(f"RESNET_FUSED_BUILD_CUDA=1 but {problem}. Set CUDA_HOME to a CUDA "
                 f"{torch.version.cuda or ''} toolkit root (the directory with bin/nvcc).")
        note(f"{problem}: building the pure-Python package without resnet_fused._C "
             "(set CUDA_HOME to the toolkit root to build it)")
        return [], {}

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    gencode = arch_gencode_flags(arch_list)

    if os.environ.get("MAX_JOBS"):
        jobs_note = "from MAX_JOBS"
    else:
        jobs, jobs_note = default_max_jobs()
        os.environ["MAX_JOBS"] = str(jobs)  # read by torch's ninja build
    has_ninja = ensure_ninja_on_path()

    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", *gencode]
    nvcc_threads = os.environ.get("NVCC_THREADS", "").strip()
    if nvcc_threads:
        nvcc_flags += ["--threads", nvcc_threads]
    # Torch's headers require C++20 (torch/all.h #errors below it), so the one
    # file that includes them, bindings.cpp, is compiled as C++20; the .cu files
    # include only CUDA headers. No --use_fast_math: the statistics kernels rely
    # on IEEE division and exact rounding for their accuracy.
    cxx_flags = ["-O3", "-std=c++20"]

    sources = ["csrc/bindings.cpp"] + sorted(
        os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    extension = CUDAExtension(
        name="resnet_fused._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    cuda_major = torch.version.cuda.split(".")[0]
    extension.include_dirs.extend(nvidia_wheel_include_dirs(cuda_major))

    if IS_BUILD:
        lines = [
            "resnet_fused build config (extension resnet_fused._C):",
            f"  torch         {torch.__version__} (CUDA {torch.version.cuda})",
            f"  CUDA_HOME     {CUDA_HOME} (nvcc {nvcc_version(CUDA_HOME)})",
            f"  archs         {arch_list} -> {' '.join(gencode)}",
            f"  jobs          MAX_JOBS={os.environ['MAX_JOBS']} ({jobs_note}), "
            f"ninja {'yes' if has_ninja else 'NOT FOUND (slow serial build)'}",
            f"  nvcc flags    {' '.join(nvcc_flags)}",
            f"  cxx flags     {' '.join(cxx_flags)}",
            f"  sources       {' '.join(sources)}",
        ]
        print("\n".join(lines), flush=True)
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
