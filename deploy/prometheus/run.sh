#!/usr/bin/env bash
# Run Prometheus on deploy/prometheus/prometheus.yml in the foreground (a Procfile line:
# `prometheus: deploy/prometheus/run.sh`). The web's scrape token is read from METRICS_TOKEN and
# written where the config expects it, readable by this user only; the data lives in
# PROMETHEUS_DATA (default deploy/prometheus/data/, ignored by git).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
(umask 077 && printf '%s' "${METRICS_TOKEN:-}" >"$here/metrics_token")
exec prometheus \
  --config.file="$here/prometheus.yml" \
  --storage.tsdb.path="${PROMETHEUS_DATA:-$here/data}" \
  --web.listen-address="${PROMETHEUS_ADDRESS:-127.0.0.1:9090}" \
  "$@"
