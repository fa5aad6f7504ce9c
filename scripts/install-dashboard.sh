#!/usr/bin/env bash
# The web dashboard: builds dashboard/web into dashboard/web/dist with the pinned npm
# toolchain (npm ci from package-lock.json), which the ipsx binary embeds at compile
# time; and headless Chromium with its WebDriver for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/../dashboard/web"
need_apt=()
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# Rebuild only when a source, the lock file or the build script is newer than dist.
stamp=dist/index.html
if [ -f "$stamp" ] && [ -z "$(find src package-lock.json build.mjs -newer "$stamp" -print -quit)" ]; then
  exit 0
fi
[ -d node_modules ] && [ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --no-audit --no-fund
npm run build
