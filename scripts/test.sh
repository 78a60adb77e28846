#!/usr/bin/env bash
# Set up (once) and run the test suite. Extra arguments go to pytest (e.g. -m slow).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 MMTTS_PROGRESS=0
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
