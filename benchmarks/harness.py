"""What the block and model benchmarks share (one module per concern, all re-exported here:
``benchmarks/environment.py``, ``impls.py``, ``timing.py``, ``records.py``, ``cli.py``): environment record, dtype modes, implementations,
timing, peak memory, measured ceilings, the JSON record, tables and plots.

Timing. On a GPU, ``triton.testing.do_bench``: it runs the function once, then warms up, then
times each repetition with CUDA events after zeroing a 256 MB buffer (so every repetition starts
with a cold L2, as a block inside a network does), setting the ``grad_to_none`` tensors' grads to
None before each repetition, outside the events; we take its median and 20th/80th percentiles. On
a CPU, ``time.perf_counter`` around each synchronous call, after a warm-up call, with gradients
cleared between calls outside the timed region. Modules, inputs and upstream gradients are built
before timing starts; the timed function does the measured work and nothing else.

Peak memory (GPU only, "n/a" on a CPU): after the timing, the function runs once more between
``reset_peak_memory_stats`` and ``max_memory_allocated``. ``peak_mib`` is the absolute peak;
``peak_increment_mib`` is that minus what was allocated just before the call (parameters, inputs,
the upstream gradient), i.e. what the call itself needs: activations saved for backward,
temporaries, gradients.

Implementations, by name: ``eager`` (the reference module), ``compile`` (torch.compile of it,
``--compile-mode``), ``compile-cudagraphs`` (torch.compile mode "reduce-overhead"), and each
fused backend of ``resnet_fused.available_backends()`` by its name (``triton``, ``cuda``),
optionally compiled: ``triton+compile``, ``cuda+compile-cudagraphs``. A fused backend that this
version cannot build is recorded as unavailable, with the package's reason, not an error.

Proof of what ran. A fused row counts the kernel launches of its warm-up call (the Triton and
CUDA backends' launch counters); a row whose backend launched nothing, or whose module still has
a block that runs eager (``resnet_fused.describe``), is recorded as an error, never as a timing.
Each row also records ``host_ms``: the wall time of an unsynchronised call (what the host spends
launching), beside the device time.
"""
from __future__ import annotations

from benchmarks.environment import (  # noqa: F401
    REPO_ROOT,
    CPU_BANNER,
    CPU_BANNER_EAGER_ONLY,
    CPU_DEFAULT_BUDGET_S,
    git_commit,
    environment,
    device_slug,
    pick_device,
    synchronize,
    configure_torch,
    print_banner,
    seed_everything,
    short_error,
)
from benchmarks.impls import (  # noqa: F401
    DtypeMode,
    DTYPE_MODES,
    MEMORY_FORMATS,
    parse_choices,
    COMPILE_VARIANTS,
    FUSED_BACKENDS,
    NotMeasured,
    Unavailable,
    BuildFailed,
    Implementation,
    fused_backends,
    default_impls,
    parse_impls,
    build_implementation,
    reset_compiled_state,
    free_memory,
    unfused_blocks,
)
from benchmarks.timing import (  # noqa: F401
    QUANTILES,
    TimingPlan,
    BLOCK_TIMING,
    MODEL_TIMING,
    QUICK_TIMING,
    INTERPRETED_TIMING,
    timing_plan,
    quantile,
    round_significant,
    time_callable,
    time_each_call,
    peak_memory,
    launch_totals,
    host_time_ms,
    measure,
    tflops,
    warm_up,
    measure_ceilings,
    ceiling_for,
)
from benchmarks.records import (  # noqa: F401
    add_speedups,
    RunRecord,
    format_table,
    geometric_mean,
    plot_grouped_bars,
    summary_lines,
    exit_code,
)
from benchmarks.cli import (  # noqa: F401
    Budget,
    add_common_arguments,
    check_common_arguments,
    parse_dtypes,
)
