#!/usr/bin/env bash
# One production Dagster process on the PostgreSQL-backed instance (docs/operations.md):
#   scripts/run-dagster.sh daemon      sensors, schedules, run queue, backfills, monitoring:
#                                      exactly one per instance
#   scripts/run-dagster.sh webserver   the UI and GraphQL on HOST:PORT (127.0.0.1:3000)
#   scripts/run-dagster.sh worker      a Celery run worker at a site (docs/operations.md,
#                                      "Where runs execute"): runs the runs of the queues in
#                                      CCAT_WORKER_QUEUES, e.g. ccat_telescope
# Needs DAGSTER_HOME (created on first use, with a link to this checkout's dagster.yaml
# unless it holds a dagster.yaml already), DAGSTER_PG_USER, DAGSTER_PG_PASSWORD (may be
# empty), DAGSTER_PG_HOST, DAGSTER_PG_PORT, DAGSTER_PG_DB and CCAT_OPS_DB_URL. The Dagster
# commands come from DAGSTER_BIN, else this checkout's .venv/bin, else PATH.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
process="${1:-}"
case "$process" in
  daemon | webserver | worker) ;;
  *) echo "usage: $0 daemon|webserver|worker" >&2; exit 2 ;;
esac

required=(DAGSTER_HOME DAGSTER_PG_USER DAGSTER_PG_PASSWORD DAGSTER_PG_HOST DAGSTER_PG_PORT
  DAGSTER_PG_DB CCAT_OPS_DB_URL)
if [ "$process" = worker ]; then
  required+=(CCAT_CELERY_BROKER_URL CCAT_CELERY_BACKEND_URL CCAT_WORKER_QUEUES)
fi
missing=()
for name in "${required[@]}"; do
  if [ -z "${!name+set}" ] || { [ "$name" != DAGSTER_PG_PASSWORD ] && [ -z "${!name}" ]; }; then
    missing+=("$name")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "$0: set ${missing[*]} (see docs/operations.md)" >&2
  exit 2
fi

bin="${DAGSTER_BIN:-}"
if [ -z "$bin" ]; then
  if [ -x "$repo/.venv/bin/dagster-daemon" ]; then
    bin="$repo/.venv/bin"
  elif command -v dagster-daemon >/dev/null; then
    bin="$(dirname "$(command -v dagster-daemon)")"
  else
    echo "$0: no dagster-daemon: set DAGSTER_BIN or run 'make prod-$process'" >&2
    exit 2
  fi
fi

mkdir -p "$DAGSTER_HOME"
if [ ! -e "$DAGSTER_HOME/dagster.yaml" ]; then
  ln -s "$repo/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
  echo "$0: linked $repo/dagster.yaml into $DAGSTER_HOME" >&2
fi

# exec: the process gets this script's PID, so a service manager's signals reach it.
if [ "$process" = daemon ]; then
  exec "$bin/dagster-daemon" run -w "$repo/workspace.yaml"
fi
if [ "$process" = worker ]; then
  # prefork: the worker answers the launcher's health check while a run executes
  # (ccat_packaging/celery_launcher.py); no gossip or mingle: less chatter over the uplink.
  exec "$bin/celery" -A ccat_packaging.celery_worker worker --pool prefork \
    -Q "$CCAT_WORKER_QUEUES" --hostname "${CCAT_WORKER_NAME:-${CCAT_WORKER_QUEUES//,/_}@%h}" \
    --concurrency "${CCAT_WORKER_CONCURRENCY:-4}" --without-gossip --without-mingle \
    --loglevel INFO
fi
exec "$bin/dagster-webserver" -w "$repo/workspace.yaml" -h "${HOST:-127.0.0.1}" -p "${PORT:-3000}"
