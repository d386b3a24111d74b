"""The fixed-cost benchmark's own logic (no timing claims): every pass and implementation computes
the same sums as the reference, the breakdown's steps run, its derived rows are differences, and a
quick run writes its table."""
import pytest
import torch

from bench import fixed_cost
from stochdepth_kernels import reference


def test_every_pass_of_every_implementation_runs_and_matches_torch_add_at_p_zero(monkeypatch):
    monkeypatch.setattr(fixed_cost, "P", 0.0)  # no mask: every implementation is x + r
    x, r, g = fixed_cost._leaves((4, 8), torch.float32, torch.device("cpu"))
    for name, fn in fixed_cost.implementations().items():
        calls = fixed_cost.passes(fn, x, r, g)
        assert set(calls) == set(fixed_cost.PASSES)
        torch.testing.assert_close(calls["forward"](), x.detach() + r.detach(), msg=name)
        for pass_name in ("forward+backward", "forward+backward (engine)"):
            grad_x, grad_r = calls[pass_name]()
            torch.testing.assert_close(grad_x, g, msg=f"{name} {pass_name}")
            torch.testing.assert_close(grad_r, g, msg=f"{name} {pass_name}")


def test_breakdown_steps_compute_the_call():
    x, r, g = fixed_cost._leaves((4, 8), torch.float32, torch.device("cpu"))
    calls = fixed_cost.steps(x, r, g)
    torch.manual_seed(3)
    public = calls["public call, no autograd"]()
    torch.manual_seed(3)
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)
    expected = reference.drop_path_add(x.detach(), r.detach(), seed, torch.tensor(fixed_cost.P, dtype=torch.float64),
                                       True, "row", True, False)
    torch.testing.assert_close(public, expected)
    for name, call in calls.items():
        assert call() is not None, name
    us = {name: float(index + 10) for index, name in enumerate(calls)}
    rows = fixed_cost.derived(us)
    assert rows["= the autograd node (with - without)"] == pytest.approx(
        us["kernel entry with its autograd node"] - us["kernel entry (pybind, output, kernel), no autograd"])


def test_quick_run_and_table():
    args = fixed_cost.parse_args(["--quick", "--samples", "2"])
    args.command = "test"
    result = fixed_cost.run(args)
    assert {row["pass"] for row in result["rows"]} == set(fixed_cost.PASSES)
    assert {row["implementation"] for row in result["rows"]} == set(fixed_cost.implementations())
    assert all(row["median_us"] > 0 for row in result["rows"])
    table = fixed_cost.markdown(result)
    assert "| / timm chain |" in table and "Where the call's time goes" in table
