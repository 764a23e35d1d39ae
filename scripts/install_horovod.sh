#!/usr/bin/env bash
# Build and install horovod 0.28.1 from source against the PyTorch already installed
# in $PYTHON (default python3), then check that `horovodrun --gloo` runs 2 ranks.
#
#   scripts/install_horovod.sh            install if missing (no-op when already working), then check
#   scripts/install_horovod.sh --check    only run the check
#   scripts/install_horovod.sh --force    rebuild even when horovod.torch already imports
#
# Environment: PYTHON (interpreter), HOROVOD_GPU_OPERATIONS=NCCL on GPU clusters (passed to the build),
# MAKEFLAGS (default -j<cores, at most 8>), CXX (real compiler behind the C++17 wrapper, default g++).
# See docs/HOROVOD.md.
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON="${PYTHON:-python3}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "[install_horovod] $*"; }
die() { echo "[install_horovod] ERROR: $*" >&2; exit 1; }

mode=install
case "${1:-}" in
    "") ;;
    --check) mode=check ;;
    --force) mode=force ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1'; use --check, --force or nothing" ;;
esac

command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found; set PYTHON=/path/to/python"

horovod_works() {
    # Importing horovod.torch loads the compiled extension, so this also catches a build made
    # against a different torch (undefined symbols after a torch upgrade).
    "$PYTHON" - "$HOROVOD_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
import horovod, horovod.torch
sys.exit(0 if horovod.__version__ == sys.argv[1] else 1)
EOF
}

horovodrun_path() {
    local scripts
    scripts="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    if [ -x "$scripts/horovodrun" ]; then echo "$scripts/horovodrun"; else command -v horovodrun; fi
}

run_check() {
    local hvdrun out expected
    hvdrun="$(horovodrun_path)" || die "horovodrun not found next to $PYTHON or on PATH"
    log "horovodrun --version: $("$hvdrun" --version)"
    "$hvdrun" --check-build
    check_dir="$(mktemp -d)"
    trap 'rm -rf "$check_dir"' EXIT
    cat > "$check_dir/hvd_allreduce_check.py" <<'EOF'
import horovod.torch as hvd
import torch

hvd.init()
summed = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
expected = hvd.size() * (hvd.size() + 1) / 2
assert summed.item() == expected, (summed.item(), expected)
print(f"hvd-check rank={hvd.rank()} size={hvd.size()} allreduce_sum={summed.item():g}", flush=True)
hvd.shutdown()
EOF
    log "running 2 Gloo ranks on localhost"
    # localhost-only jobs are started as local subprocesses: no ssh needed.
    out="$(timeout 180 "$hvdrun" -np 2 -H localhost:2 --gloo "$PYTHON" "$check_dir/hvd_allreduce_check.py" 2>&1)" \
        || { echo "$out"; die "horovodrun -np 2 --gloo failed"; }
    echo "$out"
    expected=2
    [ "$(grep -c 'hvd-check rank=[01] size=2 allreduce_sum=3' <<<"$out")" = "$expected" ] \
        || die "expected $expected ranks to report an allreduce sum of 3"
    log "check passed: horovod $HOROVOD_VERSION, 2 Gloo ranks, allreduce OK"
}

if [ "$mode" = check ]; then
    horovod_works || die "horovod $HOROVOD_VERSION with torch support is not importable by $PYTHON; run $0 first"
    run_check
    exit 0
fi

if [ "$mode" = install ] && horovod_works; then
    log "horovod $HOROVOD_VERSION already installed and importable with torch; nothing to do (--force rebuilds)"
    exit 0
fi

"$PYTHON" -c 'import torch' 2>/dev/null || die "torch is not importable by $PYTHON; install torch first (pip install torch==2.13.0)"

# ---- build prerequisites, installed only when missing ----
apt_packages=()
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}
apt_install() {
    [ "$#" -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "missing build tools ($*) and no apt-get; install them by hand"
    log "installing from apt: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

cmake_major() { "$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\)\..*/\1/p'; }

command -v g++ >/dev/null || apt_packages+=(g++)
command -v make >/dev/null || apt_packages+=(make)
# CMake 4 (what PyPI's `cmake` gives) rejects the cmake_minimum_required of Horovod's bundled gloo.
cmake_bin=""
for candidate in "$(command -v cmake || true)" /usr/bin/cmake; do
    if [ -n "$candidate" ] && [ "$(cmake_major "$candidate")" = 3 ]; then cmake_bin="$candidate"; break; fi
done
[ -n "$cmake_bin" ] || apt_packages+=(cmake)
python_h_present() {
    "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'
}
python_h_present || apt_packages+=(python3-dev)
apt_install "${apt_packages[@]}"

python_h_present || die "Python.h not found for $PYTHON; install its development headers"
if [ -z "$cmake_bin" ]; then
    for candidate in /usr/bin/cmake "$(command -v cmake || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then cmake_bin="$candidate"; break; fi
    done
    [ -n "$cmake_bin" ] || die "cmake not found after installing it"
fi
if [ "$(cmake_major "$cmake_bin")" != 3 ]; then
    # Escape hatch when only CMake 4 is available: accept the old minimum in gloo's CMakeLists.
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    log "using $cmake_bin (not CMake 3); set CMAKE_POLICY_VERSION_MINIMUM=3.5"
fi
export HOROVOD_CMAKE="$cmake_bin"   # horovod's setup.py runs this cmake instead of searching PATH

# --no-build-isolation builds in this environment, so setup.py's own imports must be present.
py_missing=()
"$PYTHON" -c 'import setuptools' 2>/dev/null || py_missing+=(setuptools)
"$PYTHON" -c 'import packaging' 2>/dev/null || py_missing+=(packaging)
if ! "$PYTHON" -c 'import setuptools.command.bdist_wheel' 2>/dev/null; then
    "$PYTHON" -c 'import wheel' 2>/dev/null || py_missing+=(wheel)
fi
if [ "${#py_missing[@]}" -gt 0 ]; then
    log "installing build-time Python packages: ${py_missing[*]}"
    "$PYTHON" -m pip install "${py_missing[@]}"
fi

# ---- build ----
real_cxx="${CXX:-g++}"
case "$real_cxx" in *cxx17_wrapper.sh) real_cxx=g++ ;; esac   # a re-run from a shell that kept our CXX
export CXX17_REAL_CXX="$real_cxx"
export CXX="$SCRIPT_DIR/cxx17_wrapper.sh"
# CMake runs the wrapper directly, so it must keep its executable bit (lost by some copies/checkouts).
[ -x "$CXX" ] || chmod +x "$CXX" 2>/dev/null || die "$CXX is missing or not executable"

# setup.py defaults to make -j8; each torch translation unit needs ~1-2 GB, so follow the core count.
jobs="$(nproc 2>/dev/null || echo 2)"
[ "$jobs" -le 8 ] || jobs=8
export MAKEFLAGS="${MAKEFLAGS:--j$jobs}"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
       HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
log "building horovod $HOROVOD_VERSION: python=$("$PYTHON" -c 'import sys; print(sys.executable)')" \
    "torch=$("$PYTHON" -c 'import torch; print(torch.__version__)') cmake=$cmake_bin" \
    "($("$cmake_bin" --version | head -1)) CXX=$CXX -> $CXX17_REAL_CXX MAKEFLAGS=$MAKEFLAGS" \
    "HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-<unset, CPU build>}"

reinstall=()
[ "$mode" = force ] && reinstall=(--force-reinstall --no-deps)
start=$SECONDS
# --no-binary: the extension must be compiled against this torch, never taken from a prebuilt wheel.
"$PYTHON" -m pip install --no-cache-dir --no-build-isolation --no-binary horovod \
    "${reinstall[@]}" "horovod==$HOROVOD_VERSION"
elapsed=$((SECONDS - start))

horovod_works || die "horovod installed but 'import horovod.torch' fails; see the build log above"
# pyenv keeps shims for console scripts; refresh them so `horovodrun` is on PATH there.
command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true
log "build+install took ${elapsed} s"
run_check
log "done: horovod $HOROVOD_VERSION built in ${elapsed} s"
