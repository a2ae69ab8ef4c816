#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: installs and starts the services the
# functional tests need (Postgres, Redis, ClickHouse, a Kafka-compatible broker; see
# docker/services.sh), points PostHog's env vars at them, then runs every test of the workspace,
# unit, in-process and black-box functional. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash docker/services.sh start)"
cargo test --workspace --features plugin-server/functional-tests "$@"
