#!/usr/bin/env bash
# Sets everything up and runs the default job: NoProp-DT, T = 10 blocks, 2 workers, on a local Ray cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m noprop_dist.run "$@"
