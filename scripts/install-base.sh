#!/usr/bin/env bash
# Base tools every test needs: curl, the mold linker (make test links with it), Python
# requests with PySocks, cargo-nextest.
set -euo pipefail
need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v mold >/dev/null || need_apt+=(mold)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if ! python3 -c 'import requests, socks' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check requests PySocks
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
