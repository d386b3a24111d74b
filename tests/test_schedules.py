"""Drop-rate schedules (timm's and the paper's conventions, per stage) and the warm-up."""

import pytest
import torch

from stochdepth_kernels import DropPath, DropPathAdd, DropRateWarmup, drop_path_rates


def test_timm_convention_is_timms_linspace():
    assert drop_path_rates(12, 0.1) == [x.item() for x in torch.linspace(0, 0.1, 12)]  # timm's ViT
    depths = [3, 4, 6, 3]  # timm's staged models split one linspace over the stages
    expected = [x.tolist() for x in torch.linspace(0, 0.2, sum(depths)).split(depths)]
    assert drop_path_rates(depths, 0.2) == expected


def test_paper_convention_is_l_plus_one_over_l():
    assert drop_path_rates(4, 0.5, convention="paper") == [0.125, 0.25, 0.375, 0.5]
    assert drop_path_rates([1, 3], 0.4, convention="paper") == [[0.1], [0.2, pytest.approx(0.3), 0.4]]


def test_uniform_and_edge_depths():
    assert drop_path_rates(3, 0.2, distribution="uniform") == [0.2, 0.2, 0.2]
    assert drop_path_rates(1, 0.3) == [0.0] and drop_path_rates(1, 0.3, convention="paper") == [0.3]
    assert drop_path_rates(0, 0.3) == []


def test_warmup_scales_every_rate_from_zero_and_round_trips():
    model = torch.nn.Sequential(DropPath(0.2), torch.nn.Linear(2, 2), DropPathAdd(0.4))
    warmup = DropRateWarmup(model, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append([round(m.drop_prob, 6) for m in warmup.modules])
        warmup.step()
    assert seen == [[0.0, 0.0], [0.05, 0.1], [0.1, 0.2], [0.15, 0.3], [0.2, 0.4], [0.2, 0.4]]
    assert float(model[0].p) == pytest.approx(0.2)  # the buffer a compiled model reads
    state = warmup.state_dict()
    fresh = DropRateWarmup(torch.nn.Sequential(DropPath(0.7), DropPathAdd(0.1)), warmup_steps=1)
    fresh.load_state_dict(state)
    assert [m.drop_prob for m in fresh.modules] == pytest.approx([0.2, 0.4])


def test_warmup_from_a_fraction_of_training():
    warmup = DropRateWarmup.from_fraction([DropPath(0.3)], total_steps=1000, drop_warmup=0.1)
    assert warmup.warmup_steps == 100
