#!/usr/bin/env bash
# What the browser test needs: headless Chromium (Debian's package, installed when missing) and
# posthog-js's browser bundle (the npm package, pinned, fetched into a cache outside the
# repository). Prints the env lines for functional_tests/run.sh: CHROMIUM and POSTHOG_JS.
#
# Usage: fetch_browser.sh [CACHE_DIR]
#   CACHE_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/plugin-server.
set -euo pipefail

# The version the browser test was written against (its request shapes are checked there).
VERSION=${POSTHOG_JS_VERSION:-1.449.2}

log() { printf 'fetch_browser: %s\n' "$*" >&2; }

chromium=$(command -v chromium || true)
if [ -z "$chromium" ]; then
  log "installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
  chromium=$(command -v chromium)
fi

cache_dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/plugin-server}
target="$cache_dir/posthog-js-$VERSION/array.js"
if [ ! -s "$target" ]; then
  log "fetching posthog-js $VERSION"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  curl -sSfL "https://registry.npmjs.org/posthog-js/-/posthog-js-$VERSION.tgz" -o "$work/package.tgz"
  tar -xzf "$work/package.tgz" -C "$work" package/dist/array.js
  mkdir -p "$(dirname "$target")"
  # Renamed into place, so an interrupted run never leaves a truncated bundle.
  mv -f "$work/package/dist/array.js" "$target.partial.$$"
  mv -f "$target.partial.$$" "$target"
fi

echo "export CHROMIUM=$chromium"
echo "export POSTHOG_JS=$target"
