#!/usr/bin/env bash
# Chain tooling for the tests and `ipsx up`: solc-js, OpenZeppelin contracts and the anvil
# binary, all from npm into contracts/node_modules (pinned by contracts/package-lock.json).
# Idempotent: does nothing when the pinned versions are already installed.
set -euo pipefail
cd "$(dirname "$0")/../contracts"
if ! command -v npm >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi
# Installed = every non-optional package of the lock file is present at its locked version.
installed() {
  node -e '
    const fs = require("fs");
    const lock = require("./package-lock.json");
    for (const [p, meta] of Object.entries(lock.packages)) {
      if (p === "") continue;
      const f = p + "/package.json";
      if (!fs.existsSync(f)) { if (meta.optional) continue; process.exit(1); }
      if (JSON.parse(fs.readFileSync(f, "utf8")).version !== meta.version) process.exit(1);
    }' 2>/dev/null
}
installed || npm ci --no-audit --no-fund --loglevel=error
arch=$(uname -m); case "$arch" in x86_64) arch=amd64;; aarch64) arch=arm64;; esac
anvil="node_modules/@foundry-rs/anvil-linux-$arch/bin/anvil"
test -x "$anvil" || { echo "install-chain: $anvil missing after npm ci" >&2; exit 1; }
echo "install-chain: $("$anvil" --version | head -1), solc $(node -e 'console.log(require("solc").version())')"
