"""The model-level byte table of benchmarks/roofline.py: eager's plan, per block, stage-fused."""
import pytest

from benchmarks import roofline
from resnet_fused.configs import MODEL_CONFIGS, resnet50_stage_units, stage_units


def test_eager_moves_what_the_design_says_over_the_plan():
    # docs/design.md section 7: eager moves 2.7-3.4x the bytes of the plan (train forward, identity
    # units): the low end against the per-block plan (with K0), the high end against the stage plan.
    for unit in resnet50_stage_units(kinds=("identity",)):
        eager = sum(k.bytes for k in roofline.eager_kernels(unit, 256, "train_fwd"))
        with_k0 = sum(k.bytes for k in roofline.plan_kernels(unit, 256, "train_fwd"))
        without_k0 = sum(k.bytes for k in roofline.plan_kernels(unit, 256, "train_fwd", include_bn1_stats=False))
        assert 2.6 <= eager / with_k0 <= 2.75, (unit.name, eager / with_k0)
        assert 3.25 <= eager / without_k0 <= 3.4, (unit.name, eager / without_k0)


def test_stage_fusion_saves_exactly_the_k0_reads():
    batch = 8
    totals = roofline.model_bytes("resnet_v2_50", batch, "train_fwd_bwd")
    units = [u for _, _, u in stage_units(MODEL_CONFIGS["resnet_v2_50"])]
    k0 = [k.bytes for u in units[1:] for k in roofline.plan_kernels(u, batch, "train_fwd") if k.name.startswith("K0")]
    assert len(k0) == len(units) - 1 == 15
    assert totals["fused per block"] - totals["fused stages"] == pytest.approx(sum(k0))
    assert totals["fused stages"] < totals["fused per block"] < totals["eager"]
    # eval needs no statistics: the two fused plans agree
    evals = roofline.model_bytes("resnet_v2_50", batch, "eval_fwd")
    assert evals["fused stages"] == evals["fused per block"]


def test_model_table_cli(capsys):
    assert roofline.main(["--model", "resnet_v2_50", "--batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "fused stages" in out and "train_fwd_bwd" in out
    with pytest.raises(ValueError, match="model must be one of"):
        roofline.model_bytes("resnet_v9", 1)
