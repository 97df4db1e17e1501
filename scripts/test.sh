#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (CPU only; starts real local Ray clusters on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q -p no:cacheprovider --durations=25 "$@"  # the slowest tests: where CI time goes
