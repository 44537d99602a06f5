# Sourced by scripts/test and scripts/demo: create or reuse .venv and install sfmon into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        # Debian's python3 ships venv separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
            rm -rf .venv && "$PY" -m venv .venv
        else
            echo "python3 -m venv failed: install python3-venv (sudo apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi
stamp=".venv/.sfmon-installed-$1"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[$1]"
    touch "$stamp"
fi
# The C speedups: rebuilt in place when their source is newer than the built module
# (an editable install builds them once).
so=$(ls sfmon/_speedups*.so 2>/dev/null | head -1 || true)
if [ -z "$so" ] || [ sfmon/_speedups.c -nt "$so" ]; then
    .venv/bin/python setup.py -q build_ext --inplace
fi
