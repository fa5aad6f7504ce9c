#!/usr/bin/env python3
"""Builds the MaxMind-format (mmdb) databases the exchange and the gateway check offers
and exits against (ipsx_exchange::geo).

  make-geo-mmdb.py demo OUT_DIR
      The demo databases of `ipsx up`: OUT_DIR/demo-country.mmdb maps each demo exit
      127.0.0.x to its demo country, OUT_DIR/demo-asn.mmdb to its demo ASN
      (64496 + x, the documentation ASN range). Kept in the repo under exchange-client/geo/ (the exchange-client crate embeds them).
  make-geo-mmdb.py asn OUT.mmdb CSV...
      Converts the ASN tables of the ip-location-db project (`start,end,asn,org` per
      line, IPv4 or IPv6) into an ASN mmdb (GeoLite2-ASN record layout).

Record layouts (what the Rust reader expects):
  country: {"country_code": "de"}          (as ip-location-db's country mmdb packages)
  asn:     {"autonomous_system_number": N, "autonomous_system_organization": "..."}

Needs the PyPI packages mmdb-writer and netaddr (scripts/install-geo.sh installs them).
"""

import csv
import sys

from mmdb_writer import MMDBWriter, MmdbU32
from netaddr import IPRange, IPSet

# Must match EXITS in src/up.rs: (last octet, country).
DEMO_EXITS = [
    (2, "de"),
    (3, "de"),
    (4, "us"),
    (5, "us"),
    (6, "fr"),
    (7, "fr"),
    (8, "jp"),
    (9, "jp"),
]
# Addresses the end-to-end tests use as "an exit whose address says another country":
# 127.0.0.40-47 are in Brazil (AS64600) in the demo database.
TEST_MISPLACED = ("127.0.0.40", "127.0.0.47", "br", 64600)
DEMO_ASN_BASE = 64496


def demo(out_dir):
    country = MMDBWriter(4, "ipsx-demo-country", description="ipsx demo countries")
    asn = MMDBWriter(4, "ipsx-demo-asn", description="ipsx demo ASNs")
    for last, cc in DEMO_EXITS:
        net = IPSet([f"127.0.0.{last}/32"])
        country.insert_network(net, {"country_code": cc})
        asn.insert_network(
            net,
            {
                "autonomous_system_number": MmdbU32(DEMO_ASN_BASE + last),
                "autonomous_system_organization": f"ipsx demo {cc}",
            },
        )
    first, last, cc, number = TEST_MISPLACED
    net = IPSet(IPRange(first, last))
    country.insert_network(net, {"country_code": cc})
    asn.insert_network(
        net,
        {
            "autonomous_system_number": MmdbU32(number),
            "autonomous_system_organization": f"ipsx demo {cc}",
        },
    )
    country.to_db_file(f"{out_dir}/demo-country.mmdb")
    asn.to_db_file(f"{out_dir}/demo-asn.mmdb")


def asn_tables(out, paths):
    w = MMDBWriter(6, "ipsx-asn", description="ASN (ip-location-db)", ipv4_compatible=True)
    rows = 0
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) < 3 or not row[2].isdigit():
                    continue
                number = int(row[2])
                if number == 0 or number > 0xFFFFFFFF:
                    continue
                w.insert_network(
                    IPSet(IPRange(row[0], row[1])),
                    {
                        "autonomous_system_number": MmdbU32(number),
                        "autonomous_system_organization": row[3] if len(row) > 3 else "",
                    },
                )
                rows += 1
    w.to_db_file(out)
    print(f"{out}: {rows} ranges")


def main(argv):
    if len(argv) == 3 and argv[1] == "demo":
        demo(argv[2])
    elif len(argv) >= 4 and argv[1] == "asn":
        asn_tables(argv[2], argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
