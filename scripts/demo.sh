#!/usr/bin/env bash
# Set up (once) and run the embedded default: `mmtts demo` on the toy-gmm task.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/mmtts" demo "$@"
