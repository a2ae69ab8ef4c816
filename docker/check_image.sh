#!/usr/bin/env bash
# Builds the runtime stage of docker/Dockerfile into a real image with podman and runs it as a
# user would: `docker run` of the embedded default, then the cluster profile against the local
# services (docker/services.sh) with host networking. Checks, each time: it runs as the image's
# non-root user, its HEALTHCHECK passes, and a captured event is stored with the sample plugin's
# greeting (in BASE_DIR, then in ClickHouse through Kafka, with docker/seed.sql's plugin row).
#
# The builder stage (rust:1.95-bookworm) cannot be pulled here (no registry), so the binary is
# built on the host and put where the runtime stage's `COPY --from=builder` takes it; the base
# image is a debootstrap of Debian bookworm imported as debian:bookworm-slim. Podman flags are
# those of ../shared/notes/services.md (runc, cgroupfs, ulimits).
#
# Usage (as root): bash docker/check_image.sh path/to/plugin-server
# Without podman it says so and exits 0: functional_tests/run.sh calls it when podman exists.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:?usage: check_image.sh path/to/plugin-server}
if ! command -v podman >/dev/null; then
    echo "image check: podman is not installed; skipped"
    exit 0
fi
SVC_DIR=${SVC_DIR:-/tmp/plugin-server-services}
P=(podman --runtime runc --cgroup-manager=cgroupfs)
RUN_FLAGS=(--network host --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
IMAGE=localhost/plugin-server:check
say() { echo "image check: $*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}

# ---- the base image ----------------------------------------------------------------------
if ! "${P[@]}" image exists debian:bookworm-slim; then
    ROOTFS="$SVC_DIR/rootfs-bookworm"
    if [ ! -x "$ROOTFS/bin/sh" ]; then
        command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
        say "debootstrap bookworm (minbase) into $ROOTFS"
        debootstrap --variant=minbase bookworm "$ROOTFS" >/dev/null
    fi
    say "importing $ROOTFS as debian:bookworm-slim"
    tar -C "$ROOTFS" -c . | "${P[@]}" import - debian:bookworm-slim >/dev/null
fi

# ---- the runtime stage, built for real -----------------------------------------------------
CONTEXT=$(mktemp -d)
CONTAINERS=()
cleanup() {
    for container in "${CONTAINERS[@]}"; do
        "${P[@]}" rm -f "$container" >/dev/null 2>&1 || true
    done
    rm -rf "$CONTEXT"
}
trap cleanup EXIT
awk '/^FROM debian:bookworm-slim AS runtime/ { runtime = 1 } runtime' docker/Dockerfile |
    sed 's#^COPY --from=builder /build/target/release/plugin-server #COPY plugin-server #' \
        >"$CONTEXT/Dockerfile"
grep -q '^COPY plugin-server /usr/local/bin/plugin-server' "$CONTEXT/Dockerfile" ||
    fail "the runtime stage no longer copies the binary from the builder as expected"
cp -a config plugins "$CONTEXT/"
cp "$BIN" "$CONTEXT/plugin-server"
say "building the runtime stage"
"${P[@]}" build --format docker --pull=never --network host -q -t "$IMAGE" "$CONTEXT" >/dev/null

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits for the container's HEALTHCHECK to pass, and for its /_health to answer 200.
wait_healthy() {
    local container=$1 port=$2
    for _ in $(seq 1 120); do
        if "${P[@]}" healthcheck run "$container" >/dev/null 2>&1 &&
            curl -fsS "http://127.0.0.1:$port/_health" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    "${P[@]}" logs "$container" 2>&1 | tail -20 >&2
    fail "$container never became healthy"
}

# The image's user, not root, runs the server.
check_user() {
    local container=$1
    local uid
    uid=$("${P[@]}" top "$container" huser 2>/dev/null | tail -n +2 | head -1 | tr -d ' ')
    [ "$uid" = "10001" ] || fail "$container runs as ${uid:-?}, not the image's user 10001"
}

capture() {
    local port=$1 token=$2 distinct_id=$3
    curl -fsS "http://127.0.0.1:$port/capture" -H 'Content-Type: application/json' \
        -d "{\"api_key\": \"$token\", \"event\": \"\$pageview\", \"distinct_id\": \"$distinct_id\",
             \"properties\": {\"\$current_url\": \"https://example.com/a\"}}" >/dev/null
}

# ---- 1. the embedded default: `docker run IMAGE` --------------------------------------------
PORT=$(free_port)
NAME=plugin-server-check-$$-embedded
CONTAINERS+=("$NAME")
# (podman logs that it cannot schedule the HEALTHCHECK without systemd; `healthcheck run` below
# runs it.)
"${P[@]}" run -d --name "$NAME" "${RUN_FLAGS[@]}" -e HTTP_SERVER_PORT="$PORT" "$IMAGE" \
    >/dev/null 2>&1
wait_healthy "$NAME" "$PORT"
check_user "$NAME"
capture "$PORT" phc_image_check embedded-user
STORED=""
for _ in $(seq 1 40); do
    STORED=$("${P[@]}" exec "$NAME" sh -c 'cat /app/data/data/events-*.jsonl 2>/dev/null' || true)
    case "$STORED" in *"hello from plugin-server"*) break ;; esac
    sleep 0.25
done
case "$STORED" in
*"hello from plugin-server"*) say "embedded: healthy, user 10001, event stored with the greeting" ;;
*) fail "embedded: no stored event with the sample plugin's greeting: $STORED" ;;
esac
OWNER=$("${P[@]}" exec "$NAME" sh -c 'stat -c %u /app/data/data/events-*.jsonl | head -1')
[ "$OWNER" = "10001" ] || fail "embedded: BASE_DIR files owned by $OWNER"

# ---- 2. the cluster profile against the local services -------------------------------------
eval "$(bash docker/services.sh env)"
SUFFIX=$(date +%s)_$$
DATABASE=image_check_$SUFFIX
DATABASE_URL=${DATABASE_URL%/*}/$DATABASE
psql -q "${DATABASE_URL%/*}/postgres" -c "CREATE DATABASE $DATABASE" >/dev/null
CLUSTER_ENV=(
    -e DATABASE_URL="$DATABASE_URL"
    -e REDIS_URL="$REDIS_URL"
    -e CLICKHOUSE_HOST="$CLICKHOUSE_HOST"
    -e CLICKHOUSE_DATABASE="$DATABASE"
    -e KAFKA_HOSTS="$KAFKA_HOSTS"
    -e KAFKA_PREFIX="image_check_${SUFFIX}_"
    -e KAFKA_FLUSH_FREQUENCY_MS=20
)
"${P[@]}" run --rm "${RUN_FLAGS[@]}" "${CLUSTER_ENV[@]}" "$IMAGE" --migrate >/dev/null 2>&1 ||
    fail "cluster: --migrate failed in the image"
psql -q "$DATABASE_URL" -f docker/seed.sql >/dev/null
PORT=$(free_port)
NAME=plugin-server-check-$$-cluster
CONTAINERS+=("$NAME")
"${P[@]}" run -d --name "$NAME" "${RUN_FLAGS[@]}" "${CLUSTER_ENV[@]}" \
    -e HTTP_SERVER_PORT="$PORT" "$IMAGE" >/dev/null 2>&1
wait_healthy "$NAME" "$PORT"
check_user "$NAME"
capture "$PORT" phc_compose cluster-user
ROWS=""
for _ in $(seq 1 120); do
    ROWS=$(curl -fsS "http://$CLICKHOUSE_HOST/" --data-binary \
        "SELECT properties FROM $DATABASE.events WHERE distinct_id = 'cluster-user' FORMAT TSV" || true)
    case "$ROWS" in *"hello from plugin-server"*) break ;; esac
    sleep 0.5
done
case "$ROWS" in
*"hello from plugin-server"*) ;;
*) "${P[@]}" logs "$NAME" 2>&1 | grep -v ' INFO ' | tail -20 >&2 ;;
esac
"${P[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
curl -fsS "http://$CLICKHOUSE_HOST/" --data-binary "DROP DATABASE IF EXISTS $DATABASE" >/dev/null || true
psql -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS $DATABASE" >/dev/null || true
case "$ROWS" in
*"hello from plugin-server"*) say "cluster: healthy, user 10001, event in ClickHouse with the greeting" ;;
*) fail "cluster: no event in ClickHouse with the sample plugin's greeting: $ROWS" ;;
esac
say "ok"
