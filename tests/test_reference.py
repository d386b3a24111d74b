"""The reference op against the formula of docs/design.md written out directly, and the statistics of
its masks."""
import math

import pytest
import torch

from helpers import DTYPES, PROBABILITIES, assert_matches, kept_rows, random_tensor
from stochdepth_kernels import drop_path, fused_drop_path_add, reference


def direct_formula(x, residual, p, seed, *, training, mode, scale_by_keep, relu):
    """docs/design.md in float64, one row at a time."""
    keep = 1.0 - p
    out = torch.empty(x.shape, dtype=torch.float64)
    seed_t = torch.tensor([seed])
    for b in range(x.shape[0]):
        if training and p > 0:
            u = reference.philox_uniform(seed_t, torch.tensor([0 if mode == "batch" else b]))
            kept = bool(u < torch.tensor(keep, dtype=torch.float32))
            factor = (1.0 / keep if scale_by_keep else 1.0) if kept else 0.0
        else:
            factor = 1.0 if scale_by_keep else keep
        row = residual[b].double()
        if factor != 0.0:
            row = row + factor * x[b].double()
        out[b] = torch.relu(row) if relu else row
    return out.to(torch.result_type(x, residual))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", PROBABILITIES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_reference_equals_direct_formula(dtype, p, training, mode, scale_by_keep, relu):
    x, residual = random_tensor((9, 3, 5), dtype), random_tensor((9, 3, 5), dtype)
    seed = 1234567 + int(p * 10)
    out = fused_drop_path_add(x, residual, p, training=training, mode=mode, scale_by_keep=scale_by_keep,
                              activation="relu" if relu else None, seed=seed, backend="reference")
    expected = direct_formula(x, residual, p, seed, training=training, mode=mode,
                              scale_by_keep=scale_by_keep, relu=relu)
    assert_matches(out, expected)


def _binomial_bound(n, p, sigmas=5.0):
    return sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("seed", [3, 2**40 + 11])
def test_row_drop_frequency_within_binomial_bound(p, seed):
    rows = 20000
    out = drop_path(random_tensor((rows, 2)), p, seed=seed, backend="reference")
    dropped = int((~kept_rows(out)).sum())
    assert abs(dropped - p * rows) <= _binomial_bound(rows, p)


def test_batch_mode_drops_all_rows_together_at_rate_p():
    p, trials = 0.3, 2000
    x = random_tensor((4, 3))
    dropped = 0
    for seed in range(trials):
        kept = kept_rows(drop_path(x, p, mode="batch", seed=seed, backend="reference"))
        assert kept.all() or not kept.any()
        dropped += int(not kept.any())
    assert abs(dropped - p * trials) <= _binomial_bound(trials, p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_scaled_output_is_unbiased(p):
    """E[out] = residual + x when scale_by_keep: the mean over many rows of one input row."""
    rows = 40000
    x_row, r_row = random_tensor((1, 8)), random_tensor((1, 8))
    x, residual = x_row.expand(rows, 8).contiguous(), r_row.expand(rows, 8).contiguous()
    out = fused_drop_path_add(x, residual, p, seed=99, backend="reference").double()
    std_of_mean = x_row.double().abs() * math.sqrt(p / (1 - p)) / math.sqrt(rows)
    assert ((out.mean(0, keepdim=True) - (r_row + x_row).double()).abs() <= 5 * std_of_mean + 1e-6).all()
