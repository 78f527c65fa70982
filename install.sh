#!/usr/bin/env bash
# Creates .venv (next to this file) with Python 3.12 or 3.13 and installs the pinned requirements.txt.
#
#   bash install.sh            # then: . .venv/bin/activate
#   bash install.sh --which    # only print the interpreter it would use
#
# The interpreter: $PYTHON if set; else the first of python3.12, python3.13 on PATH that runs; else the newest
# pyenv-installed 3.12.x / 3.13.x (a pyenv shim of a version that is not selected does not run, so it is called
# by its path under `pyenv root`). jax 0.12 has no wheels for Python 3.11, whose newest jaxlib is 0.10.2.
set -euo pipefail
cd "$(dirname "$0")"

runs() { "$1" -c 'import sys; assert sys.version_info[:2] in ((3, 12), (3, 13))' >/dev/null 2>&1; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    runs "$PYTHON" || { echo "install.sh: PYTHON=$PYTHON is not a working Python 3.12 or 3.13." >&2; return 1; }
    echo "$PYTHON"; return
  fi
  local v p
  for v in 3.12 3.13; do
    if runs "python$v"; then echo "python$v"; return; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in 3.12 3.13; do
      p="$(pyenv versions --bare 2>/dev/null | grep -E "^${v//./\\.}\.[0-9]+$" | sort -V | tail -n 1 || true)"
      if [ -n "$p" ] && runs "$(pyenv root)/versions/$p/bin/python$v"; then
        echo "$(pyenv root)/versions/$p/bin/python$v"; return
      fi
    done
  fi
  echo "install.sh: no Python 3.12 or 3.13 found (tried python3.12, python3.13 and pyenv). Install one, e.g." \
       "'apt-get install python3.12 python3.12-venv' or 'pyenv install 3.12', or set PYTHON=/path/to/python3.12." >&2
  return 1
}

py="$(find_python)"
if [ "${1:-}" = "--which" ]; then echo "$py"; exit 0; fi
if { [ -e .venv ] || [ -L .venv ]; } && ! runs .venv/bin/python; then  # -L: a dangling link counts too
  echo "install.sh: .venv exists but its python is not a working 3.12/3.13; remove it (rm -rf .venv) and re-run." >&2
  exit 1
fi
if [ ! -e .venv ]; then
  echo "+ $py -m venv .venv"
  "$py" -m venv .venv || { echo "install.sh: '$py -m venv' failed; on Debian/Ubuntu install the venv module" \
                                "(apt-get install python3.12-venv or python3.13-venv)." >&2; exit 1; }
fi
echo "+ .venv/bin/python -m pip install -r requirements.txt"
.venv/bin/python -m pip install -q -r requirements.txt
