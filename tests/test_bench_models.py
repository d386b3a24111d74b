"""The training-step benchmark's own logic (no timing): the expected share of skipped FLOPs and the
table."""
import torch

from bench import models


def test_expected_skipped_fraction_is_the_rate_weighted_branch_share():
    model, report = models.resnet50(torch.device("cpu"), "block", 0.5)
    fraction = models.expected_skipped_fraction(model, report, torch.randn(1, 3, 32, 32))
    # Branches are most of ResNet-50's FLOPs and the linear rates average (L + 1) / 2L * 0.5 = 0.27.
    assert 0.15 < fraction < 0.27
    assert model.training  # left as it was found


def test_markdown_reports_each_row_and_the_block_saving():
    result = {"device": "cpu", "device_type": "cpu", "threads": 2, "torch": "2.x", "date": "today",
              "command": "python -m bench.models", "model": "torchvision resnet50", "batch": 8, "image_size": 128,
              "samples": 3, "expected_skipped_flops_fraction": 0.25, "block_saving_vs_expected": 0.8,
              "rows": [{"name": models.NONE, "median_ms": 100.0, "mean_ms": 101.0, "min_ms": 99.0, "change_vs_none": 0.0,
                        "mean_change_vs_none": 0.0},
                       {"name": models.BLOCK, "median_ms": 80.0, "mean_ms": 75.75, "min_ms": 70.0,
                        "change_vs_none": -0.2, "mean_change_vs_none": -0.25}]}
    table = models.markdown(result)
    assert "| block-wise, drop_rate 0.5 | 80.0 | -20.0% | 75.8 | -25.0% | 70.0 |" in table
    assert "expected share of FLOPs skipped 25.0%; the mean step time saved is 80% of that" in table
