#!/usr/bin/env bash
# Creates .venv with an interpreter >= 3.12 and installs megatron_tanuki into it (editable).
# Why a script: on these machines python3.12 lives under pyenv but is not on PATH, and a
# `python3` on PATH may be older; we look on PATH first, then in pyenv's installed versions.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MIN_MINOR=12

version_ok() {  # prints the interpreter's path if it runs and is >= 3.12
  "$1" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_MINOR) else 1)" >/dev/null 2>&1
}

find_python() {
  # Prefer 3.12 (what the project is tested with), then any newer 3.x; PATH before pyenv.
  local c root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && root=$(pyenv root)
  local pyenv_312 pyenv_newer
  pyenv_312=$(ls -d "$root"/versions/3.12.* 2>/dev/null | sort -V -r | sed 's|$|/bin/python3|')
  pyenv_newer=$(ls -d "$root"/versions/3.* 2>/dev/null | sort -V -r | sed 's|$|/bin/python3|')
  for c in "${PYTHON:-}" python3.12 $pyenv_312 python3.13 python3 python $pyenv_newer; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && version_ok "$c"; then command -v "$c"; return 0; fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! version_ok "$VENV/bin/python"; then
  if ! PY=$(find_python); then
    echo "error: megatron_tanuki needs Python >= 3.$MIN_MINOR, and none was found on PATH" >&2
    echo "       (python3.13, python3.12, python3) nor under pyenv (${PYENV_ROOT:-$HOME/.pyenv}/versions)." >&2
    echo "       Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
    exit 1
  fi
  echo "bootstrap: creating $VENV with $PY ($("$PY" --version 2>&1))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "bootstrap: installing megatron_tanuki and its dependencies into $VENV (torch is large: a few minutes the first time)"
"$VENV/bin/python" -m pip install -q -c tools/constraints.txt -e ".[test]"
touch "$VENV/.installed"
echo "bootstrap: done ($("$VENV/bin/python" --version 2>&1))"
