"""install.sh picks a Python 3.12/3.13 as a new user's machine has it: on PATH, or pyenv-installed but unselected."""
import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(path, text):
  path.write_text("#!/bin/sh\n" + text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def fake_python(path, supported: bool):
  """An interpreter stand-in: install.sh only asks it to run its version check, which passes iff `supported`."""
  script(path, "exit 0\n" if supported else "exit 1\n")


def install(bindir, script_path, *args):
  """Runs install.sh with a PATH of only the tools it needs and the fakes in `bindir`: no real python."""
  for tool in ("grep", "sort", "tail", "dirname"):
    (bindir / tool).symlink_to(shutil.which(tool))
  return subprocess.run([shutil.which("bash"), str(script_path), *args], env={"PATH": str(bindir)},
                        capture_output=True, text=True, timeout=60)


def which(tmp_path):
  return install(tmp_path / "bin", os.path.join(ROOT, "install.sh"), "--which")


@pytest.fixture
def bindir(tmp_path):
  (tmp_path / "bin").mkdir()
  return tmp_path / "bin"


def test_a_python312_on_path_is_used(tmp_path, bindir):
  fake_python(bindir / "python3.12", True)
  out = which(tmp_path)
  assert out.returncode == 0 and out.stdout.strip() == "python3.12", out.stderr


def test_an_unselected_pyenv_version_is_called_by_its_path(tmp_path, bindir):
  script(bindir / "python3.12", 'echo "pyenv: python3.12: command not found" >&2; exit 127\n')  # a shim
  root = tmp_path / "pyenv"
  (root / "versions" / "3.12.9" / "bin").mkdir(parents=True)
  (root / "versions" / "3.12.10" / "bin").mkdir(parents=True)
  fake_python(root / "versions" / "3.12.9" / "bin" / "python3.12", True)
  fake_python(root / "versions" / "3.12.10" / "bin" / "python3.12", True)
  script(bindir / "pyenv", f'case "$1" in root) echo {root};; versions) printf "3.11.7\\n3.12.9\\n3.12.10\\n";; '
                           'esac\n')
  out = which(tmp_path)
  assert out.returncode == 0 and out.stdout.strip() == f"{root}/versions/3.12.10/bin/python3.12", out.stderr


def test_no_usable_python_is_a_clear_error(tmp_path, bindir):
  fake_python(bindir / "python3.13", False)  # a python3.13 that fails the version check does not count
  out = which(tmp_path)
  assert out.returncode != 0 and "no Python 3.12 or 3.13 found" in out.stderr and "PYTHON=" in out.stderr


def test_a_broken_venv_is_named_not_silently_reused(tmp_path, bindir):
  fake_python(bindir / "python3.12", True)
  shutil.copy(os.path.join(ROOT, "install.sh"), tmp_path / "install.sh")
  (tmp_path / ".venv").symlink_to(tmp_path / "nowhere")  # e.g. a link left from another checkout
  out = install(bindir, tmp_path / "install.sh")
  assert out.returncode != 0 and ".venv exists but its python is not a working 3.12/3.13" in out.stderr
