#!/usr/bin/env bash
# Set up (launchers/setup.sh) and run the test suite. Extra arguments go to pytest,
# e.g. `bash launchers/test.sh --runslow` or `bash launchers/test.sh -k topk`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launchers/setup.sh"
# The emulated-network tests (tests/test_netem.py) shape veth links with tc and turn their
# segmentation offloads off with ethtool: install it as root where apt can (they are
# skipped, with the reason, where it cannot).
if [ "$(id -u)" = 0 ] && ! command -v ethtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "[distk setup] installing ethtool (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q ethtool || { apt-get update -q && apt-get install -y -q ethtool; }; } \
        >/dev/null 2>&1 || echo "[distk setup] could not install ethtool; netem tests will be skipped" >&2
fi
cd "$root"
exec "${DISTK_VENV:-$root/.venv}/bin/python" -m pytest "$@"
