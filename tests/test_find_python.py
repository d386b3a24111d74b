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


def test_an_installed_pyenv_version_that_is_not_selected_is_found_by_its_path(tmp_path):
    """python3.12's shim fails (3.12 installed but not selected): pyenv's newest 3.12.x runs by path."""
    root = tmp_path / "pyenv"
    for version, works in (("3.12.1", False), ("3.12.4", True), ("3.11.7", True)):
        binary = root / "versions" / version / "bin" / f"python{version[:4]}"
        binary.parent.mkdir(parents=True)
        binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n' if works else "#!/bin/sh\nexit 1\n")
        binary.chmod(0o755)
    pyenv = tmp_path / "tools" / "pyenv"
    pyenv.parent.mkdir()
    pyenv.write_text(f'#!/bin/sh\n[ "$1" = root ] && echo "{root}"\n')
    pyenv.chmod(0o755)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3.12").write_text("#!/bin/sh\nexit 127\n")
    (stubs / "python3.12").chmod(0o755)
    env = {"PATH": f"{stubs}:{pyenv.parent}:/usr/bin:/bin", "PYTHON": "python3.12 python3.11"}
    found = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert (found.returncode, found.stdout.strip()) == (0, str(root / "versions" / "3.12.4" / "bin" / "python3.12"))
