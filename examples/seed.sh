#!/usr/bin/env bash
# Writes example configuration for a demo app under /config/demo/ (etcdctl, v3 API).
set -euo pipefail
endpoints=${1:-http://127.0.0.1:2379}
put() { ETCDCTL_API=3 etcdctl --endpoints "$endpoints" put "$1" "$2" >/dev/null; }
put /config/demo/db/host db.internal
put /config/demo/db/port 5432
put /config/demo/db/pool '{"min": 2, "max": 16}'
put /config/demo/features/new_checkout true
put /config/demo/log_level info
put /config/shared/region eu-west-1
echo "seeded /config/demo/ and /config/shared/" >&2
