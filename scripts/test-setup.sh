#!/usr/bin/env bash
# Machine-level prerequisites of the test suite, idempotent: PostgreSQL running on
# 127.0.0.1:5432, OpenSSH's server binary for the tests' own sshd processes, Debian's
# chromium for the end-to-end UI test, strace for watching the tar agent's fsyncs, sshfs for
# the stall tests (a network mount that stops answering), and for the topology tests iproute2
# (namespaces, tc) and RabbitMQ's server binary (the tests start a broker node of their own),
# and InfluxDB 1.x's server binary for the metrics tests (they start an influxd of their own;
# the system service is not started).
set -euo pipefail

if ! command -v pg_isready >/dev/null || ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if ls /etc/postgresql >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not running on 127.0.0.1:5432" >&2; exit 1; }
fi

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v sshfs >/dev/null || missing+=(sshfs)
# The end-to-end test's browser, driven by Playwright (never `playwright install`).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The tar agent's fsyncs are observed with strace (test_tar_agent.py).
command -v strace >/dev/null || missing+=(strace)
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v influxd >/dev/null || missing+=(influxdb)
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Installing a server starts its system service unless policy-rc.d forbids it (Debian's
  # invoke-rc.d convention); the tests start servers of their own and need none of those.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
