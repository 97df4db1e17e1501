#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (CPU only; starts real Ray clusters on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two test processes (pytest-xdist), each test file whole in one of them (its module fixtures shared): in one
# process the CPU waited on process starts, timeouts and polls for a large share of the run, which the other
# process fills. --no-loadscope-reorder: the files go out in the order tests/conftest.py gives them (the slowest
# first), not xdist's default of the most tests first. --durations: where CI time goes.
python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
