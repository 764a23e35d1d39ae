#!/bin/sh
# C++ compiler wrapper for building horovod 0.28.1 against PyTorch 2.x.
# Horovod's CMake files ask for C++14 (and pass -std=c++11/-std=c++14), but
# current PyTorch headers need C++17; rewriting the flag here is the smallest
# change that does not require patching Horovod's sources.
# The real compiler is $CXX17_REAL_CXX (default g++).
set -eu
real_cxx="${CXX17_REAL_CXX:-g++}"

first=1
for arg in "$@"; do
    if [ "$first" = 1 ]; then
        set --   # rebuild the argument list in place, keeping spaces intact
        first=0
    fi
    case "$arg" in
        -std=c++11|-std=c++14|-std=c++1y|-std=c++0x) arg="-std=c++17" ;;
        -std=gnu++11|-std=gnu++14|-std=gnu++1y|-std=gnu++0x) arg="-std=gnu++17" ;;
    esac
    set -- "$@" "$arg"
done

exec $real_cxx "$@"
