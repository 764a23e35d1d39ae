#!/usr/bin/env bash
# One worker on this machine (device 0).
#   bash launch/run_1p.sh                      the CPU demo (--preset sample), outputs under ./runs/sample
#   bash launch/run_1p.sh --preset baseline    any `edsr-dist train` arguments
# Runs in the current directory; PYTHON picks the interpreter (default: python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Lets the script work from a checkout that was not pip-installed; an installed copy is the same code.
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
if [ "$#" -eq 0 ]; then
    set -- --preset sample
fi
exec "${PYTHON:-python}" -m edsr_dist launch --nproc 1 -- "$@"
