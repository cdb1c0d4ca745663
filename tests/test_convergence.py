"""Convergence: examples/train_digits.py trains the same ResNet-v2 eagerly and with fused blocks.

A shortened run of the example (a few SGD steps on scikit-learn's bundled digits, small
batches) with the fused blocks on the Triton path (interpreted on the CPU): the per-step
training losses agree within 1e-3 relative, the test accuracies within 2 points, the fused
kernels really ran, and the example's CLI writes its JSON. The full run is the example itself,
on a GPU.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, requires_triton
from resnet_fused.triton.configs import StatsConfig, forced_configs
from resnet_fused.triton.conv import ConvConfig

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set (pip install scikit-learn)")
pytestmark = requires_triton

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
STEPS, BATCH, EVAL_IMAGES = 10, 8, 64
LOSS_RTOL, ACC_TOL = 1e-3, 2.0
# Tiles for the interpreter's speed (the default statistics config costs ~4 s per forward of
# this model interpreted, these ~0.3 s); M = 8 x 64 = 512 rows still spans several M tiles.
FAST_CONV = ConvConfig(block_m=128, block_n=16, block_k=16, num_warps=4, num_stages=1)
FAST_STATS = StatsConfig(block_m=128, block_c=16, block_p=4)


def load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fused_training_follows_eager(tmp_path, capsys):
    example = load_example()
    out = tmp_path / "curves.json"
    argv = ["--steps", str(STEPS), "--batch-size", str(BATCH), "--backend", "triton", "--device", DEVICE,
            "--lr", "0.1", "--log-every", "1", "--strict-steps", str(STEPS), "--loss-rtol", str(LOSS_RTOL),
            "--acc-tol", str(ACC_TOL), "--eval-size", str(EVAL_IMAGES), "--out", str(out)]
    # The hybrid 3x3 (ATen conv between Triton BN passes) keeps this 10-step run affordable under
    # the interpreter; the fused 3x3 kernels' training steps are tests/test_fused_models.py's.
    with forced_configs(FAST_CONV, FAST_STATS, strategy="hybrid"):
        status = example.main(argv)
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["fused_kernel_launches"] >= STEPS * 10  # 4 convs + 4 finalizes + 2 partials per forward
    eager, fused = torch.tensor(result["loss_eager"]), torch.tensor(result["loss_fused"])
    assert len(eager) == len(fused) == STEPS
    torch.testing.assert_close(fused, eager, rtol=LOSS_RTOL, atol=0.0)
    assert abs(result["acc_fused"] - result["acc_eager"]) <= ACC_TOL
    assert result["config"]["test_images"] == EVAL_IMAGES
    # the run trained something (so agreeing curves mean something)
    assert eager[-3:].mean() < eager[:3].mean() - 0.05, eager
    assert status == 0 and result["passed"] is True
    progress = [line for line in printed.splitlines() if line.startswith("step")]
    assert len(progress) == STEPS and "loss eager" in progress[0] and "fused" in progress[0]
    assert "PASS" in printed


def test_example_rejects_bad_arguments():
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--batch-size", "1"])
    with pytest.raises(SystemExit):
        example.parse_args(["--backend", "gpu"])
