"""The op benchmark's own logic on tiny inputs: the case grid, byte counting, buffer rotation, the
result JSON and its schema, the tables and the plots. No timing is asserted anywhere."""
import copy
import json

import pytest

from bench import cases, op, report
from bench.cases import Case, minimal_bytes, rotating_buffers
from bench.implementations import AGAIN, COMPILED, EAGER, TORCHVISION, is_ours
from bench.plots import plot_bandwidth, plot_speedups, shown_setting

MIB = 2**20


def test_case_grid_is_every_tensor_dtype_p_and_activation():
    grid = cases.case_grid("cpu")
    assert len(grid) == len(cases.MODEL_TENSORS) * 2 * len(cases.PROBABILITIES) * len(cases.ACTIVATIONS)
    assert len(set(grid)) == len(grid)
    assert {case.dtype for case in grid} == {"float32", "bfloat16"}
    assert {case.dtype for case in cases.case_grid("cuda")} == {"float32", "bfloat16", "float16"}
    stage1 = next(case for case in grid if case.label == "ResNet-50 stage 1")
    assert stage1.shape == (cases.BATCH["cpu"], 256, 56, 56)
    # Cases on one tensor are adjacent, so that each tensor's buffers are made once.
    labels = [(case.label, case.dtype) for case in grid]
    assert labels == sorted(labels, key=lambda key: labels.index(key))


def test_quick_grid_is_two_tensors_at_one_setting():
    grid = cases.case_grid("cpu", quick=True, batch=3)
    assert [(c.label, c.shape[0], c.dtype, c.p, c.activation) for c in grid] == [
        ("ResNet-50 stage 2", 3, "float32", 0.1, "relu"), ("ViT-B/16 tokens", 3, "float32", 0.1, "relu")]


def test_grid_narrows_to_the_chosen_tensors_dtypes_and_probabilities():
    grid = cases.case_grid("cuda", tensors=("Swin-T stage 1",), dtypes=("bfloat16",), probabilities=(0.5,))
    assert [(c.label, c.shape, c.dtype, c.p, c.activation) for c in grid] == [
        ("Swin-T stage 1", (256, 56, 56, 96), "bfloat16", 0.5, "relu"),
        ("Swin-T stage 1", (256, 56, 56, 96), "bfloat16", 0.5, "none")]


@pytest.mark.parametrize("activation, backward, sign_bits", [("relu", 3 + 1 / 32, 1 / 32), ("none", 1.75, 0.0)])
def test_minimal_bytes_follow_the_design_floor(activation, backward, sign_bits):
    case = Case("t", (4, MIB // 16), "float32", 0.25, activation)  # a 1 MiB tensor: 1/32 MiB of sign bits
    assert case.tensor_bytes == MIB
    assert minimal_bytes("forward", case) == 2.75 * MIB  # keep*|x| + |r| + |out|
    assert minimal_bytes("backward", case) == backward * MIB  # ReLU: g, bits, g_r, g_x; none: keep*|g| + |g_x|
    assert minimal_bytes("forward+backward", case) == (2.75 + sign_bits + backward) * MIB


def test_rotating_buffers_span_twice_the_cache():
    assert rotating_buffers(set_bytes=10 * MIB, cache_bytes=32 * MIB) == 7
    assert rotating_buffers(set_bytes=100 * MIB, cache_bytes=32 * MIB) == 1
    assert rotating_buffers(set_bytes=1, cache_bytes=32 * MIB) == 8  # capped


@pytest.fixture(scope="module")
def tiny_result():
    args = op.parse_args(["--quick", "--batch", "1", "--samples", "2", "--no-compile", "--backend", "cpu"])
    args.command = "test"
    return op.run(args)


def test_tiny_run_gives_every_pass_and_implementation(tiny_result):
    report.check_op_schema(tiny_result)
    json.loads(json.dumps(tiny_result))
    assert [t["label"] for t in tiny_result["tensors"]] == list(cases.QUICK_TENSORS)
    for tensor in tiny_result["tensors"]:
        assert tensor["buffers"] == rotating_buffers(3 * tensor["tensor_mib"] * MIB, cases.last_level_cache_bytes(
            op.torch.device("cpu")))
    by_pass = {}
    for row in tiny_result["rows"]:
        by_pass.setdefault((row["label"], row["pass"]), set()).add(row["implementation"])
        assert row["gbps"] == pytest.approx(minimal_bytes(row["pass"], Case(
            row["label"], tuple(row["shape"]), row["dtype"], row["p"], row["activation"])) / row["median_ms"] / 1e6)
        assert row["speedup_vs_eager"] > 0 and "speedup_vs_compile" not in row
    expected = {"stochdepth cpu", "stochdepth cpu" + AGAIN, EAGER, TORCHVISION}
    assert by_pass and all(names == expected for names in by_pass.values())


def test_schema_check_names_the_bad_key(tiny_result):
    broken = copy.deepcopy(tiny_result)
    del broken["rows"][3]["gbps"]
    with pytest.raises(ValueError, match=r"rows\[3\]: missing key 'gbps'"):
        report.check_op_schema(broken)
    broken = copy.deepcopy(tiny_result)
    broken["tensors"][0]["buffers"] = "8"
    with pytest.raises(ValueError, match=r"tensors\[0\]: buffers='8' is not"):
        report.check_op_schema(broken)
    with pytest.raises(ValueError, match="result: missing key 'device'"):
        report.check_op_schema({k: v for k, v in tiny_result.items() if k != "device"})


def _row(implementation, median_ms, **case):
    fields = {"label": "ViT-B/16 tokens", "shape": [8, 197, 768], "dtype": "float32", "p": 0.1, "activation": "relu",
              "tensor_mib": 4.6, "pass": "forward", **case}
    return {**fields, "implementation": implementation, "median_ms": median_ms, "min_ms": median_ms,
            "calls_per_sample": 1, "gbps": 10 / median_ms, "pct_of_copy": 50 / median_ms}


def _result(rows):
    return {"benchmark": "op", "date": "2026-11-22T00:00:00+00:00", "device": "Test CPU", "device_type": "cpu",
            "threads": 2, "thp_mem_alloc_enable": "", "torch": "2.x", "triton": None, "command": "python -m bench",
            "samples": 5, "rows": rows,
            "tensors": [{"label": "ViT-B/16 tokens", "shape": [8, 197, 768], "dtype": "float32", "tensor_mib": 4.6,
                         "buffers": 8, "copy": {"median_ms": 0.5}, "allocation_ms": 0.25, "copy_gbps": 20.0}]}


def test_summary_takes_the_fastest_backend_and_reports_noise_and_speedups():
    result = _result([_row("stochdepth cpu", 2.0), _row("stochdepth triton", 1.0), _row("stochdepth cpu" + AGAIN, 2.2),
                      _row(EAGER, 4.0), _row(TORCHVISION, 3.0), _row(COMPILED, 1.5)])
    [line] = report.summary_rows(result)
    assert line["implementation"] == "stochdepth triton"
    assert (line["vs_eager"], line["vs_torchvision"], line["vs_compile"]) == (4.0, 3.0, 1.5)
    assert line["noise"] == pytest.approx(0.1)
    table = report.summary_table(result)
    assert ("| ViT-B/16 tokens | float32 | 0.1 | relu | forward | triton | 1.000 | 10.0 | 50% | 4.00x | 3.00x | 1.50x "
            "| +10.0% |") in table
    markdown = report.op_markdown(result)
    assert "| ViT-B/16 tokens | (8, 197, 768) | float32 | 4.6 | 8 | 0.500 | 20.0 | 0.25 |" in markdown
    assert "| ViT-B/16 tokens | float32 | 0.1 | relu | forward | torchvision | 3.000 | 3.000 | 3.3 | 17% | - | - |" in markdown
    assert markdown.startswith("Op benchmark: Test CPU, 2 threads, THP_MEM_ALLOC_ENABLE off; torch 2.x, triton None")


def test_summary_without_baselines_shows_dashes():
    table = report.summary_table(_result([_row("stochdepth cpu", 2.0)]))
    assert table.splitlines()[-1].endswith("| - | - | - | - |")
    assert is_ours("stochdepth cpu") and not is_ours("stochdepth cpu" + AGAIN) and not is_ours(EAGER)


def test_written_results_are_json_markdown_and_png(tiny_result, tmp_path, capsys):
    written = report.write_op_results(tiny_result, tmp_path / "op.json")
    assert [path.name for path in written] == ["op.json", "op.md", "op_bandwidth.png", "op_speedup.png"]
    assert json.loads((tmp_path / "op.json").read_text()) == tiny_result
    assert "Every implementation:" in (tmp_path / "op.md").read_text()
    for png in written[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert report.summary_table(tiny_result) in printed and "written:" in printed


def test_plots_show_p_0_1_relu_or_the_first_setting(tmp_path):
    rows = [_row("stochdepth cpu", 2.0, p=0.5), _row(EAGER, 4.0, p=0.5), _row("stochdepth cpu", 2.0, p=0.0),
            _row(EAGER, 4.0, p=0.0)]
    result = _result(rows)
    assert shown_setting(result) == (0.0, "relu")
    assert shown_setting(_result(rows + [_row(EAGER, 4.0, p=0.1)])) == (0.1, "relu")
    assert plot_bandwidth(result, tmp_path / "b.png").stat().st_size > 0
    assert plot_speedups(result, tmp_path / "s.png").stat().st_size > 0


def test_grid_of_chosen_tensor_dtype_pairs_and_activations():
    grid = cases.case_grid("cuda", tensor_dtypes=(("ResNet-50 stage 1", "float32"), ("ViT-B/16 tokens", "bfloat16")),
                           probabilities=(0.1,), activations=("relu",))
    assert [(c.label, c.shape, c.dtype, c.p, c.activation) for c in grid] == [
        ("ResNet-50 stage 1", (256, 256, 56, 56), "float32", 0.1, "relu"),
        ("ViT-B/16 tokens", (256, 197, 768), "bfloat16", 0.1, "relu")]


def test_case_option_reads_tensor_dtype_pairs_and_rejects_others(capsys):
    args = op.parse_args(["--case", "ViT-B/16 tokens:bfloat16", "ResNet-50 stage 1:float32", "--pass", "forward"])
    assert args.case == [("ViT-B/16 tokens", "bfloat16"), ("ResNet-50 stage 1", "float32")]
    assert args.passes == ["forward"]
    for bad in (["--case", "ViT-B/16 tokens:int8"], ["--case", "ViT-B/16 tokens"], ["--case", "ViT:float32"]):
        with pytest.raises(SystemExit):
            op.parse_args(bad)
        assert f"expected TENSOR:DTYPE with TENSOR in {list(cases.MODEL_TENSORS)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        op.parse_args(["--case", "ViT-B/16 tokens:float32", "--dtype", "bfloat16"])
    assert "--case replaces --tensor and --dtype: give one or the other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        op.parse_args(["--pass", "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_run_times_only_the_passes_asked_for():
    args = op.parse_args(["--case", "ViT-B/16 tokens:float32", "--batch", "1", "--samples", "2", "--no-compile",
                          "--backend", "cpu", "--p", "0.1", "--activation", "none", "--pass", "forward", "forward+backward"])
    args.command = "test"
    result = op.run(args)
    report.check_op_schema(result)
    assert {(row["label"], row["dtype"], row["activation"]) for row in result["rows"]} == {
        ("ViT-B/16 tokens", "float32", "none")}
    assert {row["pass"] for row in result["rows"]} == {"forward", "forward+backward"}
