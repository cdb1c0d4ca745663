"""DistributedDataParallel over fused blocks: 2 CPU processes (gloo), fused vs eager reference.

Both ranks train the same tiny model (conv stem, a FusedBottleneck, a strided FusedBasicBlock,
BN+ReLU, pool, linear) for 3 SGD steps on their own shard of each batch, once with the fused
Triton blocks (interpreted on the CPU) and once with the eager reference blocks, from the same
initial state. DDP averages gradients across ranks and, with its default broadcast_buffers=True,
copies rank 0's BN running statistics to every rank before each forward; the fused blocks must
go through both exactly as eager blocks do. Each rank asserts the Triton kernels launched.

The workers keep the model on the CPU on every machine (gloo), so their Triton kernels can only
run interpreted: the workers are spawned with TRITON_INTERPRET=1 also on a GPU machine, where
this process runs compiled kernels (without it the triton backend would take the eager
reference for the CPU tensors and the launch check would fail).
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import resnet_fused as rf
from helpers import SMALL_CONV, SMALL_STATS
from resnet_fused.reference import BatchNormReLU2d
from resnet_fused.triton.configs import forced_configs
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

def _interpreter_broken() -> bool:
    """Triton 3.6's interpreter fails with numpy >= 2.4 ("only 0-dimensional arrays can be
    converted to Python scalars"); the GPU machine's image pairs triton 3.6 with numpy 2.5."""
    import numpy
    import triton

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())

    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.skipif(_interpreter_broken(),
                       reason="the workers run Triton interpreted (CPU tensors), and triton < 3.7's "
                              "interpreter fails with numpy >= 2.4"),
]

WORLD_SIZE = 2
STEPS = 3
SHARD = 4  # images per rank per step
TIMEOUT_S = 150


def build_model(backend: str) -> nn.Module:
    """The tiny model, its weights from a fixed seed (identical for every backend and rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        rf.make_block("bottleneck", backend=backend, in_chs=8, out_chs=8, bottle_ratio=0.5),
        rf.make_block("basic", backend=backend, in_chs=8, out_chs=16, stride=2),
        BatchNormReLU2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    with torch.no_grad():  # non-trivial BN affine, so a dropped term cannot hide
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the global batch of ``step`` (fresh random data, same on every run)."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD_SIZE * SHARD, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (WORLD_SIZE * SHARD,), generator=gen)
    return x[rank * SHARD:(rank + 1) * SHARD], y[rank * SHARD:(rank + 1) * SHARD]


def train(backend: str, rank: int) -> dict:
    model = build_model(backend)
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True (the default)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    losses, launches = [], []
    for step in range(STEPS):
        x, y = batch(step, rank)
        reset_launch_counts()
        with forced_configs(SMALL_CONV, SMALL_STATS):
            loss = F.cross_entropy(ddp(x), y)
            launches.append(dict(launch_counts()))  # the forward's: a fused backward adds its own
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                losses=losses, launches=launches)


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP rank: fused, then reference; results to ``out_dir/rank{rank}.pt``."""
    torch.set_num_threads(1)  # two processes on two cores
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {backend: train(backend, rank) for backend in ("triton", "reference")}
        results["env"] = os.environ.get("TRITON_INTERPRET")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir: str) -> None:
    """Spawn the ranks (with TRITON_INTERPRET=1: their tensors are on the CPU) and wait, killing
    them (by their own handles) past TIMEOUT_S."""
    saved = os.environ.get("TRITON_INTERPRET")
    # A spawned child copies the environment when it starts and imports triton afresh, so
    # setting the variable around the spawn reaches the workers only.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        context = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=False,
                                     start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")


def test_ddp_fused_matches_eager_reference(tmp_path):
    run_ranks(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for rank, results in enumerate(ranks):
        fused, eager = results["triton"], results["reference"]
        assert results["env"] == "1", "the worker was not spawned with TRITON_INTERPRET=1"
        for step, counts in enumerate(fused["launches"]):
            # 5 convs (3 + 2) and 5 train-mode norms per forward on every rank and step
            assert counts.get("_bn_relu_conv_kernel") == 5, (rank, step, counts)
            assert counts.get("_bn_finalize_kernel") == 5, (rank, step, counts)
        assert all(counts == {} for counts in eager["launches"])
        torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(eager["losses"]),
                                   rtol=1e-5, atol=1e-6, msg=f"rank {rank} losses")
        assert list(fused["state"]) == list(eager["state"])
        for key, value in eager["state"].items():
            got = fused["state"][key]
            if key.endswith("num_batches_tracked"):
                assert int(got) == int(value) == STEPS, (rank, key)
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")
    # DDP kept the parameters in sync across ranks (gradients are all-reduced) ...
    params = {name for name, _ in build_model("reference").named_parameters()}
    for key in params:
        torch.testing.assert_close(ranks[0]["triton"]["state"][key], ranks[1]["triton"]["state"][key],
                                   rtol=1e-6, atol=1e-7, msg=key)
    # ... while each rank's last running-statistics update came from its own shard.
    key = "1.norm2.running_mean"
    assert not torch.equal(ranks[0]["triton"]["state"][key], ranks[1]["triton"]["state"][key])
    # and the training did something: the losses and the parameters moved
    first = build_model("reference").state_dict()
    assert not torch.equal(first["2.conv2.weight"], ranks[0]["triton"]["state"]["2.conv2.weight"])
