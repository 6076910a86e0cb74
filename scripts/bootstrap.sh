#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: a project-local virtualenv with teefl installed,
# and Fashion-MNIST from Debian where we are allowed to install it. Idempotent and quiet when
# nothing changed, so both commands can be re-run freely.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

apt_install() {
  command -v apt-get >/dev/null || return 1
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock || true)" ]; then
    as_root apt-get update -q >/dev/null 2>&1 || true
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
    as_root apt-get update -q >/dev/null 2>&1 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1
  }
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "teefl needs Python >= 3.11 (none found on PATH)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv .venv with $($PY --version)"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    echo "==> python3-venv missing; installing it through apt"
    apt_install python3-venv || { echo "cannot create a virtualenv: install python3-venv" >&2; exit 1; }
    "$PY" -m venv "$VENV"
  fi
fi

STAMP="$VENV/.teefl-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "==> installing teefl and its dependencies into .venv (first time takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${TEEFL_NO_APT:-}" ]; then
  echo "==> installing Fashion-MNIST from Debian (dataset-fashion-mnist)"
  apt_install dataset-fashion-mnist || echo "    (not installed: teefl falls back to a synthetic dataset and says so)"
fi
