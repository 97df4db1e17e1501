#!/usr/bin/env bash
# Sets everything up and runs the default job: NoProp-DT, T = 10 blocks, 2 workers, on a local Ray cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
python3 -m noprop_dist.run "$@"
