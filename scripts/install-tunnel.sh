#!/usr/bin/env bash
# Tools the tunnel and provider tests need: wireguard-go and wg (interop peers),
# iproute2 (network namespaces), iptables (NAT routers of the NAT tests) and coturn
# (`turnserver`, the STUN/TURN server of the NAT tests and `ipsx up`). Idempotent; run
# as root.
set -euo pipefail
need_apt=()
command -v wireguard-go >/dev/null || need_apt+=(wireguard-go)
command -v wg >/dev/null || need_apt+=(wireguard-tools)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v turnserver >/dev/null || need_apt+=(coturn)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
