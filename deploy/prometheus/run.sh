#!/usr/bin/env bash
# Run Prometheus on deploy/prometheus/prometheus.yml in the foreground (the Procfile's
# `prometheus:` line, so `make up` starts it) when Debian's prometheus package is installed;
# otherwise say so and stay idle, so the rest of the stack runs without it. The web's scrape
# token is read from METRICS_TOKEN and written where the config expects it, readable by this user
# only; the data lives in PROMETHEUS_DATA (default .run/prometheus/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v prometheus >/dev/null; then
  echo "Prometheus is not installed (sudo apt-get install -y --no-install-recommends prometheus); the stack runs without it"
  exec sleep infinity
fi
(umask 077 && printf '%s' "${METRICS_TOKEN:-}" >"$here/metrics_token")
exec prometheus \
  --config.file="$here/prometheus.yml" \
  --storage.tsdb.path="${PROMETHEUS_DATA:-$here/../../.run/prometheus}" \
  --storage.tsdb.retention.time=7d \
  --web.listen-address="${PROMETHEUS_ADDRESS:-127.0.0.1:9090}" \
  "$@"
