#!/usr/bin/env bash
# Installs (once) the services the tests run on private 127.0.0.1 ports: Prometheus, the
# Pushgateway and promtool, from the distribution's packages. Idempotent.
set -euo pipefail
missing=()
for cmd in prometheus prometheus-pushgateway promtool; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing prometheus and prometheus-pushgateway (apt)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus prometheus-pushgateway >&2 \
    || { $sudo apt-get update >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus prometheus-pushgateway >&2; }
fi
