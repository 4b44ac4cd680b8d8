#!/usr/bin/env bash
# `make up`'s Prometheus (deploy/prometheus/): it scrapes the stack and evaluates our alert rules,
# when Debian's prometheus package is installed; otherwise the stack runs without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null; then
  echo "Prometheus is not installed (sudo apt-get install -y --no-install-recommends prometheus); the stack runs without it"
  exec sleep infinity
fi
mkdir -p .run/prometheus
exec prometheus --config.file=deploy/prometheus/prometheus.yml --storage.tsdb.path=.run/prometheus \
  --storage.tsdb.retention.time=7d --web.listen-address="127.0.0.1:${PROMETHEUS_PORT:-9090}"
