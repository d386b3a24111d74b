"""`.ci/find-python`, which picks the interpreter `make test` / `make bench` build the venv with."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "find-python"
CANDIDATES = ("python3.11", "python3.12", "python3.13", "python3.10", "python3")


def _find(tmp_path, working=(), python=None):
    """Runs the script with every candidate name on PATH a stub that fails (a pyenv shim of a
    missing version, or a Python outside 3.10-3.13), except ``working``: this interpreter."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in CANDIDATES:
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n' if name in working else "#!/bin/sh\nexit 127\n")
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", **({"PYTHON": python} if python else {})}
    return subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env)


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.parametrize("working, expected", [(("python3.11", "python3.12"), "python3.11"),
                                               (("python3.12", "python3.13"), "python3.12"),
                                               (("python3.10",), "python3.10"), (("python3",), "python3")])
def test_first_working_candidate(tmp_path, working, expected):
    found = _find(tmp_path, working)
    assert (found.returncode, found.stdout.strip()) == (0, expected)


def test_python_variable_wins(tmp_path):
    found = _find(tmp_path, working=("python3.11", "python3.13"), python="python3.13")
    assert (found.returncode, found.stdout.strip()) == (0, "python3.13")


def test_none_fits_says_what_to_install(tmp_path):
    found = _find(tmp_path)
    assert found.returncode == 1 and found.stdout == ""
    assert "no Python 3.10-3.13 found" in found.stderr and "PYTHON=" in found.stderr


def test_version_outside_range_is_refused(tmp_path):
    """A Python that runs but fails the script's version check (as 3.9 would) is passed over."""
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\ncase "$1" in --version) echo "Python 3.9.18";; *) exit 1;; esac\n')
    old.chmod(0o755)
    found = _find(tmp_path, python=str(old))
    assert found.returncode == 1 and f"tried: {old}" in found.stderr
