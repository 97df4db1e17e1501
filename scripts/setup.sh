#!/usr/bin/env bash
# Installs what noprop_dist needs into the current Python: the package with its test extras, and
# (Debian/Ubuntu with root only) the Fashion-MNIST data package. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Real Fashion-MNIST (IDX files) for the benchmarks and one data test; everything else works without it.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    || echo "setup: dataset-fashion-mnist not installed; its test will be skipped" >&2
fi
python3 -m pip install -q -e ".[test]"
