#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (CPU only; starts real local Ray clusters on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # keeps every listener of a local Ray cluster on 127.0.0.1
python3 -m pytest -q -p no:cacheprovider "$@"
