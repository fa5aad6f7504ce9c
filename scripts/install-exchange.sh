#!/usr/bin/env bash
# Exchange node tests: a real PostgreSQL server (Debian package `postgresql`).
# The tests start their own throw-away cluster (initdb in a temp dir, `postgres` on a
# free loopback port, as the postgres user); nothing is started here.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
fi
# The package may start a system cluster; the tests do not use it.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
id postgres >/dev/null
