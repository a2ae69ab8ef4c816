#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: installs and starts the services the
# functional tests need (Postgres, Redis, ClickHouse, a Kafka-compatible broker; see
# docker/services.sh), points PostHog's env vars at them, then runs every test of the workspace,
# unit, in-process and black-box functional. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Not `eval "$(...)"`, which would swallow a failed start and let every test fail on its own
# without saying why: the services script has printed its error; stop here.
if ! services_env="$(bash docker/services.sh start)"; then
  echo "functional_tests/run.sh: the services did not start (the error is above); no test ran" >&2
  exit 1
fi
eval "$services_env"
# Every test makes databases of its own (`ps_*`); those of failed or killed runs and of the
# in-crate Postgres tests stay behind, and hundreds of them keep autovacuum from the live ones.
# A run starts without them.
psql -q -At "$DATABASE_URL" \
  -c "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname) FROM pg_database WHERE datname LIKE 'ps\_%'" \
  | psql -q "$DATABASE_URL" >/dev/null
# GeoLite2 City for the GeoIP tests, fetched into a cache outside the repository (its licence
# forbids committing it).
GEOIP_TEST_MMDB="$(bash docker/fetch_geolite2.sh)"
export GEOIP_TEST_MMDB
# Headless Chromium and posthog-js for the browser test (installed or fetched when missing).
if ! browser_env="$(bash docker/fetch_browser.sh)"; then
  echo "functional_tests/run.sh: the browser test's Chromium or posthog-js could not be set up (the error is above); no test ran" >&2
  exit 1
fi
eval "$browser_env"
cargo test --workspace --features plugin-server/functional-tests "$@"

# The whole suite (no filter) also runs the Dockerfile's runtime stage without Docker (no engine
# runs on these machines): a debootstrap of its base, its own RUN/COPY/USER/ENV, the test build
# of the binary as the image's, then a first `docker run`'s checks (see the script).
# Where podman is installed, the runtime stage is also built into a real image and run with it,
# embedded and then against the services above (docker/check_image.sh). docker/compose.yml's
# wiring is checked by docker/check_compose.py.
if [ $# -eq 0 ]; then
  python3 docker/check_runtime_stage.py target/debug/plugin-server
  # The compose file cannot run here (no registry for its store images): its wiring is
  # checked instead, and the image runs against the local services below.
  python3 docker/check_compose.py target/debug/plugin-server
  if command -v podman >/dev/null; then
    bash docker/check_image.sh target/debug/plugin-server
  fi
fi
