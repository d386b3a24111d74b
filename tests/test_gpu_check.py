"""The GPU check (bench/gpu_check.py) guarded on a CPU: its limits add up to the budget, every test it
selects exists, its pairwise grids cover every value and pair, its results fit what the device
tool brings back, and its runner kills a phase at the limit and goes on with the next."""
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check
from pairwise import pairwise_cover

ROOT = Path(__file__).resolve().parents[1]
PHASES = gpu_check.phases(Path("/nonexistent/out"))
PYTEST_PHASES = [phase for phase in PHASES if phase.pytest_args]


def test_limits_sum_to_the_budget_and_the_outputs_fit_the_device_tool():
    assert sum(phase.timeout_s for phase in PHASES) <= gpu_check.BUDGET_S == 540
    assert [phase.name for phase in PHASES] == ["environment", "build", "unverified", "grid", "op", "models",
                                                "fixed_cost"]
    files = [gpu_check.LOG, gpu_check.SUMMARY, *(name for phase in PHASES for name in phase.outputs)]
    assert len(files) == len(set(files)) <= gpu_check.MAX_FILES
    build = next(phase for phase in PHASES if phase.name == "build")
    assert build.argv[1:] == ("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".")
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "TORCH_CUDA_ARCH_LIST:-9.0" in script and "MAX_JOBS:-16" in script and "-m bench.gpu_check" in script


def _collected(pytest_args) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *pytest_args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def collected() -> dict:
    return {phase.name: _collected(phase.pytest_args) for phase in PYTEST_PHASES}


@pytest.mark.parametrize("phase", PYTEST_PHASES, ids=lambda phase: phase.name)
def test_each_test_phase_collects_its_tests(phase, collected):
    assert len(collected[phase.name]) >= phase.min_tests


def test_every_unverified_test_is_collected_once_and_on_the_gpu_only(collected):
    listed = gpu_check.unverified_tests()
    assert listed and len(listed) == len(set(listed))
    for node in listed:
        assert any(test.startswith(node + "[") or test == node for test in collected["unverified"]), node
    ours = [test for test in collected["unverified"] if not test.startswith(gpu_check.SANITIZER_TESTS)]
    assert not set(ours) & set(collected["grid"]), "the grid phase runs an unverified test again"
    assert any(test.startswith(gpu_check.SANITIZER_TESTS + "[") for test in collected["unverified"])


def test_unverified_list_reads_node_ids_and_skips_comments(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("# a comment\n\ntests/a.py::test_b  # why\n  tests/c.py::test_d\n")
    assert gpu_check.unverified_tests(listed) == ["tests/a.py::test_b", "tests/c.py::test_d"]


# Runs pytest's collection of the GPU suite with --pairwise and prints, as JSON, the grid position of
# each GPU test before the cover thins it (tryfirst: before -m too) and the node ids that remain.
RECORD_GRID = """
import json, sys, pytest
sys.path.insert(0, "tests")
from pairwise import grid_position

class Record:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items):
        self.all = [(item.nodeid, repr(grid_position(item)[0]), grid_position(item)[1]) for item in items
                    if "cuda" in item.keywords]

    def pytest_collection_finish(self, session):
        self.kept = [item.nodeid for item in session.items]

record = Record()
code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "-m", "cuda", "--pairwise", "tests"],
                   plugins=[record])
print("RESULT" + json.dumps({"code": int(code), "all": record.all, "kept": record.kept}))
"""


def _pairs(rows) -> set:
    """Every (axis, value) and every pair of them that some row holds."""
    rows = list(rows)
    return ({pair for row in rows for pair in itertools.combinations(enumerate(row), 2)}
            | {single for row in rows for single in enumerate(row)})


def test_pairwise_selection_of_the_gpu_suite_covers_every_value_and_pair():
    result = subprocess.run([sys.executable, "-c", RECORD_GRID], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    record = json.loads(line[len("RESULT"):])
    assert record["code"] == 0
    kept = set(record["kept"])
    groups = {}
    for node, group, row in record["all"]:
        groups.setdefault(group, []).append((node, tuple(row)))
    thinned = 0
    for group, members in groups.items():
        chosen = [row for node, row in members if node in kept]
        assert chosen, f"{group}: no test left"
        assert _pairs(chosen) == _pairs(row for _, row in members), group
        thinned += len(members) - len(chosen)
    forward = [members for group, members in groups.items() if "test_forward_matches_reference" in group]
    assert len(forward) == 2 and all(len(members) == 512 for members in forward)  # triton-cuda and cuda
    assert all(sum(node in kept for node, _ in members) <= 40 for members in forward)
    assert thinned > 1000


@pytest.mark.parametrize("sizes", [(4, 4, 4, 2, 2, 2), (10, 4), (3,), (2, 2, 2, 2, 2, 2, 2, 2), ()])
def test_pairwise_cover_holds_every_value_and_pair_of_a_full_grid(sizes):
    rows = list(itertools.product(*(range(size) for size in sizes)))
    chosen = pairwise_cover(rows)
    assert chosen == sorted(set(chosen)) and chosen
    assert _pairs(rows[i] for i in chosen) == _pairs(rows)
    if len(sizes) >= 2:
        largest = sorted(sizes)[-2:]
        assert largest[0] * largest[1] <= len(chosen) <= len(rows)


def test_pairwise_cover_of_a_partial_grid_covers_what_it_holds():
    rows = [(0, "a", None), (1, "b", None), (0, "b", 2.0), (2, "a", 2.0)]
    chosen = pairwise_cover(rows)
    assert _pairs(rows[i] for i in chosen) == _pairs(rows)
    assert pairwise_cover([(1, 2)] * 3) == [0]


def _phase(name, command, timeout_s=5):
    return gpu_check.Phase(name, f"test phase {name}", timeout_s, ("bash", "-c", command))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a killed process may linger as a zombie until its new parent reaps it)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.02)
    return True


def test_runner_kills_a_phase_at_its_limit_with_its_children_and_runs_the_next(tmp_path):
    child = tmp_path / "child.pid"
    phases = [_phase("slow", f"sleep 60 & echo $! > {child}; echo started; wait", timeout_s=2),
              _phase("next", "echo next ran; exit 3")]
    start = time.monotonic()
    records = gpu_check.run(phases, tmp_path)
    assert time.monotonic() - start < 10
    slow, following = records
    assert (slow["rc"], slow["timed_out"]) == (124, True) and 2 <= slow["wall_s"] < 5
    assert (following["rc"], following["timed_out"]) == (3, False)
    assert not _alive(int(child.read_text())), "the phase's child outlived it"
    log = (tmp_path / gpu_check.LOG).read_text()
    assert "== phase slow: test phase slow (limit 2 s)" in log and "started" in log and "TIMED OUT" in log
    assert "next ran" in log and "== phase next rc=3 wall=" in log
    assert json.loads((tmp_path / gpu_check.SUMMARY).read_text()) == records


def test_a_failed_build_skips_the_phases_that_need_it(tmp_path, capsys):
    records = gpu_check.run([_phase("build", "echo compiler error; exit 1"), _phase("grid", "echo ran")], tmp_path)
    assert records[0]["rc"] == 1 and records[1] == {"phase": "grid", "what": "test phase grid",
                                                    "skipped": "the build failed"}
    assert "compiler error" in capsys.readouterr().out  # each phase's tail reaches the device tool's output


@pytest.mark.parametrize("torch_version, stops", [("2.10.1+cu130", True), ("2.11.0+cu130", False)])
def test_the_environment_phase_stops_the_check_below_the_oldest_torch(tmp_path, monkeypatch, torch_version, stops):
    """Its versions line printed; on a torch older than .ci/torch-oldest.txt's, the phase fails with
    a message that says so and the build does not run."""
    fake = tmp_path / "fake"
    for name, text in (("torch", f"__version__ = {torch_version!r}\nclass version:\n    cuda = '13.0'\n"),
                       ("triton", "__version__ = '3.6.0'\n")):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    environment = next(phase for phase in gpu_check.phases(tmp_path) if phase.name == "environment")
    records = gpu_check.run([environment, _phase("build", "echo built")], tmp_path)
    log = (tmp_path / gpu_check.LOG).read_text()
    assert f"torch {torch_version} triton 3.6.0 cuda 13.0" in log
    if stops:
        assert records[0]["rc"] == 1 and records[1]["skipped"] == "the environment failed"
        assert f"torch {torch_version} is older than the oldest supported, 2.11.0: the check stops here" in log
    else:
        assert records[0]["rc"] == 0 and records[1]["rc"] == 0


def test_the_package_and_the_check_name_the_same_oldest_torch():
    import stochdepth_kernels

    assert stochdepth_kernels.OLDEST_TORCH == gpu_check.oldest_torch()[:2]


def test_main_rejects_an_unknown_phase(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "/nonexistent", "benchmarks"])
    assert "unknown phase 'benchmarks'; the phases are ['environment', 'build', 'unverified', 'grid', 'op', " \
           "'models', 'fixed_cost']" in capsys.readouterr().err
