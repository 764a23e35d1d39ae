#!/usr/bin/env bash
# Horovod on GPU clusters: horovodrun over the hosts of a hostfile (`hostname slots=N` lines, # comments allowed).
#   HOSTFILE=hosts.txt bash launch/run_hvd.sh --engine horovod --device cuda [train arguments]
# The hostfile defaults to ./hostfile. Needs horovod installed on every host (docs/HOROVOD.md).
# Runs in the current directory; PYTHON picks the interpreter (default: python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m edsr_dist launch --hostfile "${HOSTFILE:-hostfile}" -- "$@"
