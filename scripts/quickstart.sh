#!/usr/bin/env bash
# Installs the package into the current Python and runs the default job: NoProp-DT, T = 10 blocks, 2 workers,
# on a local Ray cluster (on 127.0.0.1), on scikit-learn's bundled digits. Arguments go to noprop_dist.run.
# (scripts/setup.sh installs what the tests need besides: the test extras, Prometheus, Fashion-MNIST.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
python3 -m noprop_dist.run "$@"
