#!/usr/bin/env bash
# Installs (once) the services the tests run on private 127.0.0.1 ports: Prometheus, the
# Pushgateway and promtool, and PostgreSQL, from the distribution's packages. Idempotent.
# Nothing is started here: each test starts its own private instance and stops it by pid.
set -euo pipefail
missing=()
for cmd in prometheus prometheus-pushgateway promtool; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
packages=()
[ ${#missing[@]} -eq 0 ] || packages+=(prometheus prometheus-pushgateway)
# the server binaries (initdb, postgres) live under /usr/lib/postgresql/VERSION/bin
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && command -v psql >/dev/null 2>&1 || packages+=(postgresql)
if [ ${#packages[@]} -gt 0 ]; then
  echo "==> installing ${packages[*]} (apt)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}" >&2 \
    || { $sudo apt-get update >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}" >&2; }
fi
