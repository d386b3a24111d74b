"""The training-step benchmark's own logic (no timing): the expected share of skipped FLOPs, the
variants, the DINOv2-style anchor and the table."""
import math
import os
import statistics

import pytest
import torch
from torch._inductor.runtime import cache_dir_utils

from bench import models
from bench.dinov2_subset import Dinov2StyleSubsetAdd
from bench.subset_controls import AllRowsKeptSubsetAdd
from stochdepth_kernels import DropPathAdd


@pytest.mark.parametrize("model_name", ["resnet50", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_expected_skipped_fraction_is_the_rate_weighted_branch_share(model_name):
    model = models.build(model_name, 32, torch.device("cpu"), models.BLOCK)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPathAdd)]
    fraction = models.expected_skipped_fraction(model, torch.randn(2, 3, 32, 32), 8)
    # Branches are most of the FLOPs and timm's linear rates average 0.5 / 2 = 0.25.
    assert sum(rates) / len(rates) == pytest.approx(models.BLOCK_RATE / 2)
    assert 0.15 < fraction < 0.25
    assert [m.drop_prob for m in model.modules() if isinstance(m, DropPathAdd)] == rates  # left as found


def test_variants_share_weights_and_timm_rates():
    none, timm_droppath, ours = (models.build("resnet50", 32, torch.device("cpu"), name)
                                 for name in (models.NONE, models.TIMM, models.SAMPLE))
    assert all(torch.equal(a, b) for a, b in zip(none.state_dict().values(), ours.state_dict().values())
               if a.dtype.is_floating_point)
    timm_rates = [block.drop_path.drop_prob for stage in (timm_droppath.layer1, timm_droppath.layer2,
                                                          timm_droppath.layer3, timm_droppath.layer4)
                  for block in stage if block.drop_path is not None]
    our_rates = [m.drop_prob for m in ours.modules() if isinstance(m, DropPathAdd) and m.drop_prob > 0]
    assert our_rates == pytest.approx(timm_rates)


def test_subset_fraction_uses_the_effective_rates_at_the_batch():
    model = models.build("vit_small_patch16_224", 32, torch.device("cpu"), models.SUBSET_HIGH)
    drops = [m for m in model.modules() if isinstance(m, DropPathAdd)]
    assert {m.mode for m in drops} == {"subset"}
    x = torch.randn(2, 3, 32, 32)
    at_8, at_64 = (models.expected_skipped_fraction(model, x, batch) for batch in (8, 64))
    # At batch 8 every rate above 0 drops at least one sample of 8: more than the nominal mean 0.2.
    assert at_8 > at_64 and 0.15 < at_64 < 0.25


def test_dinov2_anchor_keeps_k_samples_scaled_by_b_over_k():
    model = models.build("vit_small_patch16_224", 32, torch.device("cpu"), models.DINOV2_HIGH)
    anchors = [m for m in model.modules() if isinstance(m, Dinov2StyleSubsetAdd)]
    assert len(anchors) == 24 and not any(isinstance(m, DropPathAdd) for m in model.modules())
    anchor = anchors[-1]  # rate 0.4: 5 of 8 kept
    residual, h = torch.randn(8, 3), torch.randn(8, 3)
    out = anchor.add_branch(lambda t: t, residual, lambda: [], (h,))
    changed = (out != residual).any(dim=1)
    assert int(changed.sum()) == 5
    torch.testing.assert_close(out[changed], residual[changed] + 8 / 5 * h[changed])
    model(torch.randn(2, 3, 32, 32)).mean().backward()


@pytest.mark.parametrize("activation", [None, "relu"])
def test_all_rows_kept_control_is_the_unscaled_add_through_the_subset_kernels(activation, monkeypatch):
    """Every row runs the branch with factor 1, through the method's gather and fused add; the gradients
    are the plain add's."""
    from stochdepth_kernels import subset

    calls = []
    monkeypatch.setattr(subset, "_kept_rows", lambda impl, t, rows: calls.append(rows) or impl.gather_rows(t, rows))
    control = AllRowsKeptSubsetAdd(DropPathAdd(0.3, activation=activation, mode="subset"))
    weight = torch.randn(5, 5, requires_grad=True)
    residual, h = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    out = control.add_branch(lambda t: t @ weight, residual, lambda: [weight], (h,))
    assert len(calls) == 1 and calls[0].tolist() == list(range(6))
    expected = residual + h @ weight
    expected = torch.relu(expected) if activation == "relu" else expected
    torch.testing.assert_close(out, expected)
    g = torch.randn(6, 5)
    torch.testing.assert_close(torch.autograd.grad(out, (residual, h, weight), g),
                               torch.autograd.grad(expected, (residual, h, weight), g))
    control.eval()
    torch.testing.assert_close(control.add_branch(lambda t: t @ weight, residual, lambda: [weight], (h,)), expected)


def test_controls_run_only_when_named():
    assert models.ALL_KEPT not in models.DEFAULT_VARIANTS and models.ONE_LESS not in models.DEFAULT_VARIANTS
    assert models.parse_args(["--variant", "all-kept", "one-less"]).variant == ["all-kept", "one-less"]
    model = models.build("vit_small_patch16_224", 32, torch.device("cpu"), models.ALL_KEPT)
    assert len([m for m in model.modules() if isinstance(m, AllRowsKeptSubsetAdd)]) == 24
    result = models.bench_model("resnet18", torch.randn(3, 3, 32, 32), 1, (models.ALL_KEPT, models.ONE_LESS))
    assert [row["name"] for row in result["rows"]] == [models.NONE, models.ALL_KEPT, models.ONE_LESS]
    assert not any("expected_skipped_flops_fraction" in row for row in result["rows"])


def test_block_controls_keep_or_drop_every_block_through_the_skip():
    """block-kept and block-dropped: the block-wise model (batch mode, one module a block) with every
    block at rate 0 or 1; only the dropped one skips work, all of its branches' share."""
    assert models.BLOCK_KEPT not in models.DEFAULT_VARIANTS and models.BLOCK_DROPPED not in models.DEFAULT_VARIANTS
    for name, rate in ((models.BLOCK_KEPT, 0.0), (models.BLOCK_DROPPED, 1.0)):
        drops = [m for m in models.build("resnet50", 32, torch.device("cpu"), name).modules()
                 if isinstance(m, DropPathAdd)]
        assert len(drops) == 16 and {(m.mode, m.drop_prob) for m in drops} == {("batch", rate)}
    x = torch.randn(3, 3, 32, 32)
    result = models.bench_model("resnet18", x, 1, (models.BLOCK, models.BLOCK_KEPT, models.BLOCK_DROPPED))
    rows = {row["name"]: row for row in result["rows"]}
    assert "expected_skipped_flops_fraction" not in rows[models.BLOCK_KEPT]
    dropped = models.build("resnet18", 32, torch.device("cpu"), models.BLOCK_DROPPED)
    total = models._forward_flops(models.build("resnet18", 32, torch.device("cpu")), x[:2])
    shortcuts_only = models._forward_flops(dropped, x[:2])
    assert rows[models.BLOCK_DROPPED]["expected_skipped_flops_fraction"] == pytest.approx(1 - shortcuts_only / total)
    assert 2 * rows[models.BLOCK]["expected_skipped_flops_fraction"] < rows[models.BLOCK_DROPPED][
        "expected_skipped_flops_fraction"] < 1
    assert "block_saving_from_controls" in result


def test_block_controls_predict_the_block_wise_saving_per_flop_share():
    """Kept blocks cost nothing and dropped ones save their share: all of the expected saving; a kept
    cost counts with the share of the branches' FLOPs the rates keep."""
    assert models.block_saving_from_controls(0.0, -0.9, 0.9, 0.3) == pytest.approx(1.0)
    assert models.block_saving_from_controls(0.0, -0.45, 0.9, 0.3) == pytest.approx(0.5)
    assert models.block_saving_from_controls(0.1, -0.9, 0.9, 0.3) == pytest.approx((0.3 - 0.1 * 0.6 / 0.9) / 0.3)
    row = {"median_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "change_vs_none": 0.0, "mean_change_vs_none": 0.0,
           "paired_change_vs_none": 0.0, "paired_change_ci95": 0.0}
    result = {"device": "cpu", "device_type": "cpu", "threads": 2, "torch": "2.x", "date": "today",
              "command": "python -m bench.models", "batch": 8, "image_size": 128, "samples": 3,
              "models": {"ResNet-50": {"rows": [{"name": models.NONE, **row}], "block_saving_from_controls": 0.256}}}
    table = models.markdown(result)
    assert "as the two block controls predict it" in table and "FLOPs): 26%" in table


def test_compiled_steps_report_their_compile_time_apart(monkeypatch):
    """``--compile``: every candidate compiled (here AOT autograd without code generation, for speed),
    its first step timed before the rounds; the table gains the compile column."""
    compiled = []

    def compile_eagerly(model, real_compile=torch.compile):
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    assert models.parse_args(["--compile"]).compile and not models.parse_args([]).compile
    torch._dynamo.reset()
    result = models.bench_model("resnet18", torch.randn(2, 3, 32, 32), 2, (models.BLOCK,), compiled=True)
    assert len(compiled) == 2
    for row in result["rows"]:
        assert row["first_step_s"] > row["median_ms"] / 1e3 and row["compile_s"] == pytest.approx(
            row["first_step_s"] - row["median_ms"] / 1e3)
    table = models.markdown({"device": "cpu", "device_type": "cpu", "threads": 2, "torch": "2.x", "date": "today",
                             "command": "python -m bench.models --compile", "batch": 2, "image_size": 32,
                             "samples": 2, "compiled": True, "models": {"ResNet-18": result}})
    assert "compile s |" in table and "torch.compile, inductor" in table


def test_markdown_reports_each_model_row_and_the_skipping_savings():
    rows = [{"name": models.NONE, "median_ms": 100.0, "mean_ms": 101.0, "min_ms": 99.0, "change_vs_none": 0.0,
             "mean_change_vs_none": 0.0, "paired_change_vs_none": 0.0, "paired_change_ci95": 0.0},
            {"name": models.BLOCK, "median_ms": 80.0, "mean_ms": 75.75, "min_ms": 70.0, "change_vs_none": -0.2,
             "mean_change_vs_none": -0.25, "paired_change_vs_none": -0.2, "paired_change_ci95": 0.025,
             "expected_skipped_flops_fraction": 0.25, "saving_vs_expected": 0.8, "saving_vs_expected_ci95": 0.1}]
    result = {"device": "cpu", "device_type": "cpu", "threads": 2, "torch": "2.x", "date": "today",
              "command": "python -m bench.models", "batch": 8, "image_size": 128, "samples": 3,
              "models": {"ResNet-50": {"rows": rows}}}
    table = models.markdown(result)
    assert "ResNet-50:" in table
    assert "| no stochastic depth | 100.0 | +0.0% | 101.0 | +0.0% | 99.0 | +0.0% ± 0.0 |  |  |" in table
    assert "| stochdepth block-wise, 0.5 | 80.0 | -20.0% | 75.8 | -25.0% | 70.0 | -20.0% ± 2.5 | 25.0% | 80% ± 10 |" in table
    assert "paired by round" not in table
    result["models"]["ResNet-50"]["sample_vs_timm"] = (-0.026, 0.033)
    assert f"{models.SAMPLE} against {models.TIMM}, paired by round: -2.6% ± 3.3" in models.markdown(result)


def test_models_default_per_device_and_can_be_chosen(capsys):
    assert models.DEFAULT_MODELS == {"cpu": ("ResNet-50", "ViT-S/16"), "cuda": ("ResNet-50", "ViT-B/16")}
    assert all(label in models.MODELS for labels in models.DEFAULT_MODELS.values() for label in labels)
    assert models.DEFAULT_BATCH["cuda"] == (128, 224)
    assert models.parse_args(["--model", "ViT-B/16"]).model == ["ViT-B/16"]
    assert models.parse_args(["--model", "Swin-T"]).model == ["Swin-T"]
    assert models.parse_args(["--variant", "subset-0.4", "dinov2-0.4"]).variant == ["subset-0.4", "dinov2-0.4"]
    assert sorted(models.BY_ID) == sorted(variant.identifier for variant in models.VARIANTS.values())
    from bench.gpu_check import TRAINING_VARIANTS
    assert set(TRAINING_VARIANTS) <= set(models.BY_ID)
    with pytest.raises(SystemExit):
        models.parse_args(["--model", "ViT-H/14"])
    assert "invalid choice: 'ViT-H/14'" in capsys.readouterr().err


def test_a_training_step_is_one_call_per_sample(monkeypatch):
    """A step lasts longer than a sample needs: min_calls=1 lifts the device's least calls per sample
    (10 on a GPU, here set on the CPU)."""
    import time

    from bench import timing

    monkeypatch.setitem(timing.MIN_CALLS, "cpu", 10)
    step = lambda: time.sleep(timing.SAMPLE_SECONDS["cpu"])  # noqa: E731
    assert timing._calls_per_sample(step, torch.device("cpu"), warmup=1, min_calls=None) == 10
    assert timing._calls_per_sample(step, torch.device("cpu"), warmup=1, min_calls=1) == 1


def test_paired_change_compares_each_round_with_the_base_of_that_round():
    """A drift that slows every candidate alike in a round cancels: the candidate is 10 % faster in
    every round while the rounds' times double, so the pairs agree exactly and the interval is 0."""
    from bench.timing import Timing, paired_change

    base_rounds = (1.0, 2.0, 4.0)
    base = Timing(2.0, 1.0, 7 / 3, 3, 1, base_rounds)
    faster = Timing(1.8, 0.9, 2.1, 3, 1, tuple(0.9 * t for t in base_rounds))
    change, interval = paired_change(faster, base)
    assert change == pytest.approx(-0.1) and interval == pytest.approx(0.0, abs=1e-12)
    noisy = Timing(2.0, 1.0, 7 / 3, 3, 1, (1.1, 1.8, 4.4))
    change, interval = paired_change(noisy, base)
    assert change == pytest.approx((0.1 - 0.1 + 0.1) / 3)
    assert interval == pytest.approx(1.96 * statistics.stdev([0.1, -0.1, 0.1]) / math.sqrt(3))


def test_compile_times_come_from_an_empty_inductor_cache(monkeypatch):
    # Importing the package already made inductor write its default directory into the variable:
    # that one is no user's choice, and the block must not compile into it.
    default = cache_dir_utils.default_cache_dir()
    for before in (None, default):
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        with models.cold_inductor_cache():
            directory = cache_dir_utils.cache_dir()
            assert directory != default and os.listdir(directory) == []
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before and not os.path.exists(directory)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen/by/the/user")
    with models.cold_inductor_cache():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen/by/the/user"
