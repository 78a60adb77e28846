#!/usr/bin/env bash
# Create .venv (once) and install mmtts with its test extras into it. Idempotent and quiet when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.mmtts-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision must be a matching pair; these are the pairs known to import together on these machines.
case "$(uname -m)" in
  x86_64)  TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  aarch64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)       TORCH="torch torchvision" ;;
esac
"$VENV/bin/python" -m pip install -q $TORCH
"$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
echo "$WANT" > "$STAMP"
