#!/usr/bin/env bash
# The whole benchmark in one command: builds the release binaries, starts the local services
# (docker/services.sh: PostgreSQL, Redis, ClickHouse, tansu), installs the naive peer's Kafka
# client, and runs `report`, which runs every scenario and writes bench/results/report.md and
# bench/results/report.svg. Extra arguments go to `report` (e.g. --events 500000, --skip-peer).
# Not part of CI: it takes 10-20 minutes on 2 cores after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! services_env="$(bash docker/services.sh start)"; then
  echo "bench/report.sh: the services did not start (the error is above)" >&2
  exit 1
fi
eval "$services_env"
python3 -c 'import confluent_kafka' 2>/dev/null || python3 -m pip install -q confluent-kafka

cargo build --release -p plugin-server -p plugin-server-bench
target="${CARGO_TARGET_DIR:-target}"
"$target/release/report" --server "$target/release/plugin-server" "$@"
