#!/usr/bin/env bash
# One worker per device of this server, from an Ascend rank table.
#   bash launch/run_8p.sh [train arguments]            table: $RANK_TABLE_FILE; without one, one worker per
#                                                      visible NPU of this server (HCCL root-info, no table)
#   bash launch/run_8p.sh --nproc 2 [train arguments]  N local workers instead (CPU/GPU rehearsal);
#                                                      with no train arguments: the CPU demo (--preset sample)
#                                                      into runs/sample_<N>p, so it runs after run_1p.sh's
#                                                      demo (runs/sample) instead of being refused
# On a multi-server job run it on every server; each starts the devices of its own entry in the table.
# Runs in the current directory; PYTHON picks the interpreter (default: python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PY="${PYTHON:-python}"

nproc=""
case "${1:-}" in
    --nproc)
        if [ "$#" -lt 2 ]; then
            echo "run_8p.sh: --nproc needs a number, like --nproc 2" >&2
            exit 2
        fi
        nproc="$2"
        shift 2
        ;;
    --nproc=*)
        nproc="${1#--nproc=}"
        shift
        ;;
esac

if [ -n "$nproc" ]; then
    if [ "$#" -eq 0 ]; then
        set -- --preset sample --out "runs/sample_${nproc}p"
    fi
    exec "$PY" -m edsr_dist launch --nproc "$nproc" -- "$@"
fi
if [ -n "${RANK_TABLE_FILE:-}" ]; then
    exec "$PY" -m edsr_dist launch --rank-table "$RANK_TABLE_FILE" -- "$@"
fi
# One server needs no rank table: without RANK_TABLE_FILE torch_npu builds the communicator from HCCL's root info
# (ProcessGroupHCCL.cpp createHCCLCommEx returns false, getHCCLComm falls back to createHCCLCommOrigin).
nproc=$("$PY" -c '
import sys
from edsr_dist.errors import UserError
from edsr_dist.parallel.ascend_env import visible_devices
try:
    cards = visible_devices()
except UserError as exc:
    sys.exit(f"run_8p.sh: error: {exc}")
if not cards:
    sys.exit("run_8p.sh: error: no NPU visible (no /dev/davinciN device node, ASCEND_RT_VISIBLE_DEVICES unset or "
             "empty); check `npu-smi info`, set RANK_TABLE_FILE, or pass --nproc N")
print(len(cards))
') || exit 2
exec "$PY" -m edsr_dist launch --nproc "$nproc" -- "$@"
