"""The subset benchmarks' own logic (no timing): the subset op's byte counts and table, and the
training-quality check on scikit-learn's digits, run for one short epoch."""
import pytest
import torch

from bench import quality, subset_op


def test_subset_op_bytes_are_the_kept_rows_reads_and_writes():
    size = 1000
    assert subset_op.minimal_bytes("forward", size, 4, 0.875, False, True) == pytest.approx(2.875 * size)
    row_fb = subset_op.minimal_bytes("forward+backward", size, 4, 0.9, False, False)
    subset_fb = subset_op.minimal_bytes("forward+backward", size, 4, 0.875, False, True)
    assert row_fb == pytest.approx((2.9 + 1.9) * size) and subset_fb == pytest.approx((2.875 + 1.75) * size)
    relu = subset_op.minimal_bytes("forward+backward", size, 4, 0.5, True, True)
    assert relu == pytest.approx(2.5 * size + size / 32 + 2 * size + size / 32 + 0.5 * size)


def test_subset_op_quick_run_and_table():
    args = subset_op.parse_args(["--quick", "--batch", "4", "--samples", "2", "--backend", "cpu"])
    args.command = "test"
    result = subset_op.run(args)
    rows = result["rows"]
    assert {row["pass"] for row in rows} == {"forward", "forward+backward"}
    assert all(row["kept_share"] == 0.75 and row["subset_gbps"] > 0 for row in rows)
    assert "| subset / row bandwidth |" in subset_op.markdown(result)


def test_digits_split_and_model_shapes():
    x_train, y_train, x_test, y_test = quality.digits()
    assert x_train.shape == (1297, 64) and x_test.shape == (500, 64) and 0 <= x_train.min() <= x_train.max() <= 1
    assert set(y_train.tolist()) == set(range(10))
    model = quality.residual_mlp("subset", 0.4)
    assert model(x_train[:64]).shape == (64, 10)
    rates = [block.drop_prob for block in model if hasattr(block, "drop_prob")]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)


def test_quality_quick_run_reports_every_variant():
    args = quality.parse_args(["--quick"])
    args.command = "test"
    result = quality.run(args)
    assert set(result["variants"]) == {"none", "sample-wise", "subset"}
    for variant in result["variants"].values():
        assert len(variant["runs"]) == 2 and 0.0 <= variant["accuracy_mean"] <= 1.0
    table = quality.markdown(result)
    assert "| subset |" in table and "seeds' spread of sample-wise" in table
    assert torch.isfinite(torch.tensor([v["loss_mean"] for v in result["variants"].values()])).all()
