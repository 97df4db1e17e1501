#!/usr/bin/env bash
# Installs what noprop_dist needs into the current Python: the package with its test extras, and
# (Debian/Ubuntu with root only) the Fashion-MNIST data package and the Prometheus server. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real Fashion-MNIST (IDX files) for the benchmarks and one data test; Prometheus for the monitoring
# end-to-end test (tests/test_prometheus_e2e.py). Everything else works without them.
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -x /usr/bin/prometheus ] || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
    || echo "setup: ${missing[*]} not installed; the tests that need them will be skipped" >&2
fi
python3 -m pip install -q -e ".[test]"
