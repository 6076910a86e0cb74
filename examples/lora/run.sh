#!/usr/bin/env bash
# examples/lora in one command: generate each party's text, then run the federation on this host
# (1 aggregator + 3 collaborator processes). Extra arguments go to `teefl run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# TEEFL/PYTHON: another teefl command or interpreter (e.g. TEEFL="python -m teefl")
${PYTHON:-python3} generate.py --out data
exec ${TEEFL:-teefl} run plan.yaml "$@"
