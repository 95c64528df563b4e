#!/usr/bin/env bash
# Set up (launchers/setup.sh) and run the test suite. Extra arguments go to pytest,
# e.g. `bash launchers/test.sh --runslow` or `bash launchers/test.sh -k topk`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launchers/setup.sh"
cd "$root"
exec "${DISTK_VENV:-$root/.venv}/bin/python" -m pytest "$@"
