#!/usr/bin/env bash
# One production Dagster process on the PostgreSQL-backed instance (docs/operations.md):
#   scripts/run-dagster.sh daemon      sensors, schedules, run queue, backfills, monitoring:
#                                      exactly one per instance
#   scripts/run-dagster.sh webserver   the UI and GraphQL on HOST:PORT (127.0.0.1:3000)
# Needs DAGSTER_HOME (created on first use, with a link to this checkout's dagster.yaml
# unless it holds a dagster.yaml already), DAGSTER_PG_USER, DAGSTER_PG_PASSWORD (may be
# empty), DAGSTER_PG_HOST, DAGSTER_PG_PORT, DAGSTER_PG_DB and CCAT_OPS_DB_URL. The Dagster
# commands come from DAGSTER_BIN, else this checkout's .venv/bin, else PATH.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
process="${1:-}"
case "$process" in
  daemon | webserver) ;;
  *) echo "usage: $0 daemon|webserver" >&2; exit 2 ;;
esac

missing=()
for name in DAGSTER_HOME DAGSTER_PG_USER DAGSTER_PG_PASSWORD DAGSTER_PG_HOST DAGSTER_PG_PORT \
  DAGSTER_PG_DB CCAT_OPS_DB_URL; do
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
exec "$bin/dagster-webserver" -w "$repo/workspace.yaml" -h "${HOST:-127.0.0.1}" -p "${PORT:-3000}"
