"""The GPU check: one call on a GPU machine (torch >= 2.11, triton >= 3.6, nvcc; pytest-xdist if
present; no package registry needed) that builds the extension from source and runs the phases
below, most important first, each under its own time limit. The limits sum to at most
``BUDGET_S`` (9 minutes), so the call ends inside it by construction; a phase that runs out of time
is killed with everything it started, and the next phase runs.

    bash bench/gpu_check.sh              # every phase; the log and results under $OUT
    bash bench/gpu_check.sh grid op      # the environment and the build, then only these phases

Under ``$OUT`` (at most ``MAX_FILES`` files, what the device tool brings back): ``gpu_check.log``
(each phase's section with its command, output, exit status and wall time), ``phases.json`` (the
same, one entry a phase), the op benchmark's ``op.json`` and ``op.md`` (bench/plots.py draws the
plots from op.json), the training steps' ``models.json`` and ``models.md``, and the fixed cost's
``fixed_cost.json`` and ``fixed_cost.md``. tests/test_gpu_check.py checks on a CPU that every test
selection here exists and that the limits add up.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 540
MAX_FILES = 8
LOG, SUMMARY = "gpu_check.log", "phases.json"
# GPU tests that have never passed on a GPU with the code as it is: phase "unverified" runs them first.
UNVERIFIED_TESTS = ROOT / "tests" / "gpu_unverified.txt"
SANITIZER_TESTS = "tests/test_gpu_kernels.py::test_compute_sanitizer_is_clean"
OLDEST_PINS = ROOT / ".ci" / "torch-oldest.txt"  # make test-oldest's
PYTEST_WORKERS = 8  # of the machine's 16 cores: Triton compiles on the host while the GPU runs tests
TAIL_LINES = 12  # of each phase's output, printed to stdout (the device tool returns the last 12,000 characters)
# The op benchmark's tensors on a GPU: a ResNet-50 stage-1 activation (784 MiB in fp32 at batch 256)
# in both dtypes, ViT-B/16 tokens in bf16.
OP_CASES = ("ResNet-50 stage 1:float32", "ResNet-50 stage 1:bfloat16", "ViT-B/16 tokens:bfloat16")
TRAINING_MODELS, TRAINING_BATCH, TRAINING_IMAGE, TRAINING_STEPS = ("ResNet-50", "ViT-B/16"), 128, 224, 10
# The variants timed beside "none" (which always runs): five per model, one more than the phase first had.
TRAINING_VARIANTS = ("sample", "block", "subset-0.4", "dinov2-0.4")


@dataclass(frozen=True)
class Phase:
    """One step of the check: ``argv`` run from the repository root, killed after ``timeout_s``.
    A pytest phase has ``pytest_args`` (its selection) and the least number of tests that selection
    collects (``min_tests``, checked on a CPU)."""
    name: str
    what: str
    timeout_s: int
    argv: tuple[str, ...]
    pytest_args: tuple[str, ...] = ()
    min_tests: int = 0
    outputs: tuple[str, ...] = ()  # files it writes under $OUT


def oldest_torch(path: Path = OLDEST_PINS) -> tuple[int, ...]:
    """The oldest supported torch, from its pin ``torch==X.Y.Z`` in ``path``."""
    pin = next(line for line in path.read_text().splitlines() if line.startswith("torch=="))
    return tuple(int(part) for part in pin.removeprefix("torch==").split("."))


def unverified_tests(path: Path = UNVERIFIED_TESTS) -> list[str]:
    """The node ids in ``path``, one a line; ``#`` starts a comment."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def pytest_argv(python: str, selection: tuple[str, ...], workers: int) -> tuple[str, ...]:
    """pytest over ``selection``, verbose (a killed phase still shows which tests passed), in
    ``workers`` processes when pytest-xdist is there."""
    parallel = ("-n", str(workers)) if workers > 1 and importlib.util.find_spec("xdist") else ()
    return (python, "-m", "pytest", *parallel, "-v", "-rfEs", "--durations=10", "-p", "no:cacheprovider",
            *selection)


def phases(out: Path, python: str = sys.executable, workers: int = PYTEST_WORKERS) -> list[Phase]:
    """The check, in the order it runs."""
    first = (SANITIZER_TESTS, *unverified_tests())  # the slowest first: pytest hands tests out in this order
    unverified = ("-m", "cuda", "--pairwise", *first)
    grid = ("-m", "cuda", "--pairwise", *(f"--deselect={node}" for node in first), "tests")
    op_json, models_json = out / "op.json", out / "models.json"
    oldest = oldest_torch()
    environment = ("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "
                   "nvcc --version | tail -2; "
                   f"{python} -m pip list 2>/dev/null | grep -iE '^(pytest|pytest-xdist|hypothesis|timm|numpy|ninja) '; "
                   f"{python} -c \"import sys, torch, triton; print('python', sys.version.split()[0], 'torch', "
                   "torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); "
                   "found = tuple(int(part) for part in torch.__version__.split('.')[:2]); "
                   f"sys.exit(found < {oldest[:2]} and 'torch ' + torch.__version__ + ' is older than the oldest "
                   f"supported, {'.'.join(map(str, oldest))}: the check stops here')\"")
    return [
        Phase("environment", f"the GPU, driver and versions; stops below torch {'.'.join(map(str, oldest[:2]))}", 10,
              ("bash", "-c", environment)),
        Phase("build", "the extension from source (pip install -e, no build isolation)", 100,
              (python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".")),
        Phase("unverified", f"GPU tests never run on a GPU ({UNVERIFIED_TESTS.relative_to(ROOT)}, grids "
                            "pairwise) and compute-sanitizer memcheck and racecheck", 120,
              pytest_argv(python, unverified, workers), unverified, min_tests=60),
        Phase("grid", "the rest of the GPU suite, every parametrized grid as a pairwise cover", 125,
              pytest_argv(python, grid, workers), grid, min_tests=120),
        Phase("op", "the op benchmark: " + ", ".join(OP_CASES) + "; p = 0.1, ReLU; forward and forward+backward, "
                    "device time and the copy rate", 90,
              (python, "-m", "bench.op", "--case", *OP_CASES, "--p", "0.1", "--activation", "relu",
               "--pass", "forward", "forward+backward", "--no-plots", "--output", str(op_json)),
              outputs=("op.json", "op.md")),  # plots from op.json: few files come back
        Phase("models", f"training steps: {', '.join(TRAINING_MODELS)}, batch {TRAINING_BATCH} at "
                        f"{TRAINING_IMAGE} px, variants {', '.join(TRAINING_VARIANTS)}, {TRAINING_STEPS} timed "
                        "steps each", 80,
              (python, "-m", "bench.models", "--model", *TRAINING_MODELS, "--batch", str(TRAINING_BATCH),
               "--image-size", str(TRAINING_IMAGE), "--samples", str(TRAINING_STEPS), "--variant",
               *TRAINING_VARIANTS, "--output", str(models_json)),
              outputs=("models.json", "models.md")),
        Phase("fixed_cost", "a call's fixed cost: ViT-B/16 tokens bf16 at batch 32 and 256, beside timm's chain, "
                            "and its breakdown", 15,
              (python, "-m", "bench.fixed_cost", "--samples", "15", "--output", str(out / "fixed_cost.json")),
              outputs=("fixed_cost.json", "fixed_cost.md")),
    ]


ALWAYS = ("environment", "build")  # a fresh machine has nothing built; either failing skips the rest


def run_phase(phase: Phase, log, env: dict) -> dict:
    """Runs ``phase`` with its output appended to ``log``; kills its whole process group (pytest's
    workers too) at the time limit. Returns its record: exit status (124 when killed), wall time."""
    log.write(f"\n== phase {phase.name}: {phase.what} (limit {phase.timeout_s} s)\n$ {' '.join(phase.argv)}\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(phase.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        returncode, timed_out = process.wait(timeout=phase.timeout_s), False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        returncode, timed_out = 124, True
    wall = time.monotonic() - start
    log.write(f"== phase {phase.name} rc={returncode} wall={wall:.1f} s{' TIMED OUT' if timed_out else ''}\n")
    log.flush()
    return {"phase": phase.name, "what": phase.what, "command": " ".join(phase.argv), "timeout_s": phase.timeout_s,
            "rc": returncode, "timed_out": timed_out, "wall_s": round(wall, 1)}


def _tail(path: Path, start: int) -> str:
    """The last TAIL_LINES lines of ``path`` written after byte ``start``."""
    with path.open("rb") as handle:
        handle.seek(start)
        return "\n".join(handle.read().decode(errors="replace").splitlines()[-TAIL_LINES:])


def run(selected: list[Phase], out: Path) -> list[dict]:
    """Runs ``selected`` in order; a failed environment (torch too old) or build skips the phases after it.
    Writes the log and the summary under ``out``; prints each phase's tail."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path, records = out / LOG, []
    with log_path.open("a") as log:
        log.write(f"== gpu check {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
                  f"phases: {', '.join(p.name for p in selected)}\n")
        for phase in selected:
            failed = next((r["phase"] for r in records if r["phase"] in ALWAYS and r["rc"] != 0), None)
            if failed:
                records.append({"phase": phase.name, "what": phase.what, "skipped": f"the {failed} failed"})
                log.write(f"\n== phase {phase.name} skipped: the {failed} failed\n")
                continue
            log.flush()
            start = log_path.stat().st_size
            record = run_phase(phase, log, env)
            records.append(record)
            print(f"== {phase.name}: rc={record['rc']} wall={record['wall_s']} s of {phase.timeout_s}"
                  f"{' TIMED OUT' if record['timed_out'] else ''}\n{_tail(log_path, start)}", flush=True)
    (out / SUMMARY).write_text(json.dumps(records, indent=2) + "\n")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phases", nargs="*", help="phases to run after the environment and the build (default: all)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")))
    args = parser.parse_args(argv)
    table = phases(args.out)
    names = [phase.name for phase in table]
    unknown = sorted(set(args.phases) - set(names))
    if unknown:
        parser.error(f"unknown phase {unknown[0]!r}; the phases are {names}")
    selected = [phase for phase in table if not args.phases or phase.name in ALWAYS or phase.name in args.phases]
    records = run(selected, args.out)
    return 0 if all(record.get("rc") == 0 for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
