#!/usr/bin/env bash
# Create or reuse ./.venv and install distk with all extras.
# torch==2.13.0 (a CPU build on this kind of machine) is installed first when no torch
# is importable: an unpinned torch would pull a multi-GB CUDA build. A machine whose
# Python already has torch (e.g. a CUDA box) keeps it: set DISTK_VENV_SYSTEM=1 to build
# the venv with --system-site-packages so that torch is reused.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DISTK_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    if [ "${DISTK_VENV_SYSTEM:-0}" = 1 ]; then
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
py="$venv/bin/python"
stamp="$venv/.distk-installed"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "[distk setup] installing torch==2.13.0" >&2
    "$py" -m pip install -q "torch==2.13.0"
fi
# Reinstall only when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "[distk setup] installing distk[all] into $venv" >&2
    "$py" -m pip install -q -e "$root[all]"
    touch "$stamp"
fi
