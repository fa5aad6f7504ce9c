#!/usr/bin/env bash
# GeoIP databases for the exchange's and the gateway's geography checks
# (ipsx_exchange::geo), from the ip-location-db project's npm packages, into geo/
# (git-ignored). Idempotent: does nothing when the files are there.
#
#   geo/geolite2-country.mmdb   npm @ip-location-db/geolite2-country-mmdb (as shipped)
#   geo/asn.mmdb                npm @ip-location-db/asn (CSV) converted by
#                               scripts/make-geo-mmdb.py; slow (minutes), so only with
#                               IPSX_GEO_ASN=1 (or --asn)
#
# Point the exchange at them with `geoip_country = "geo/geolite2-country.mmdb"` and
# `geoip_asn = "geo/asn.mmdb"`; the tests and `ipsx up` use the demo databases the
# exchange-client crate embeds (exchange-client/geo/, built by `make-geo-mmdb.py demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
want_asn="${IPSX_GEO_ASN:-0}"
[ "${1:-}" = "--asn" ] && want_asn=1
mkdir -p geo
if [ ! -s geo/geolite2-country.mmdb ] || { [ "$want_asn" = 1 ] && [ ! -s geo/asn.mmdb ]; }; then
  if ! command -v npm >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
  fi
  pkgs=(@ip-location-db/geolite2-country-mmdb)
  [ "$want_asn" = 1 ] && pkgs+=(@ip-location-db/asn)
  npm install --prefix geo/npm --no-save --no-audit --no-fund --silent "${pkgs[@]}"
  cp geo/npm/node_modules/@ip-location-db/geolite2-country-mmdb/geolite2-country.mmdb geo/
  if [ "$want_asn" = 1 ]; then
    python3 -m pip install -q mmdb-writer==0.2.7 netaddr
    d=geo/npm/node_modules/@ip-location-db/asn
    python3 scripts/make-geo-mmdb.py asn geo/asn.mmdb "$d/asn-ipv4.csv" "$d/asn-ipv6.csv"
  fi
fi
ls -l geo/*.mmdb
