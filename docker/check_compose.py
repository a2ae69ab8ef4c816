#!/usr/bin/env python3
"""Checks docker/compose.yml against what it wires together, where no engine can run it (no
registry is reachable for its Kafka, ClickHouse and Postgres images): every variable given to
plugin-server is a setting it reads (a typo would be silently ignored, as PostHog ignores
unknown variables), each connection names a service of the file with the credentials and
port that service is given, the one-shot commands and the health check are ones the binary
accepts, and the published port is the one it listens on. docker/check_image.sh runs the
image itself against local services with docker/seed.sql, the seed this file applies.

Usage: python3 docker/check_compose.py path/to/plugin-server
"""

import pathlib
import subprocess
import sys
import tomllib
import urllib.parse

try:
    import yaml
except ImportError:  # A fresh machine's Python may lack it.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pyyaml"], check=True)
    import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
problems = []


def check(condition, message):
    if not condition:
        problems.append(message)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else None
    compose = yaml.safe_load((ROOT / "docker/compose.yml").read_text())
    services = compose["services"]
    settings = {key.upper() for key in tomllib.loads((ROOT / "config/default.toml").read_text())}

    server = services["plugin-server"]
    env = {key: str(value) for key, value in server["environment"].items()}
    for key in env:
        check(key in settings, f"plugin-server's {key} is not a setting (config/default.toml)")
    check(
        services["migrate"]["environment"] == server["environment"],
        "migrate and plugin-server must share their settings",
    )

    # Postgres: host, port and credentials of the postgres service.
    database = urllib.parse.urlparse(env["DATABASE_URL"])
    postgres = services[database.hostname]["environment"]
    check(database.port == 5432, "DATABASE_URL's port is not Postgres' 5432")
    check(
        (database.username, database.password, database.path.lstrip("/"))
        == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]),
        "DATABASE_URL's user, password or database differ from the postgres service's",
    )
    seed = services["seed"]
    check(
        seed["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
        and "-h" in seed["command"]
        and seed["command"][seed["command"].index("-h") + 1] == database.hostname,
        "seed does not reach the postgres service with its password",
    )
    for volume in seed["volumes"]:
        source = volume.split(":")[0]
        check((ROOT / "docker" / source).is_file(), f"seed mounts {source}, which does not exist")

    # ClickHouse: the HTTP interface of the clickhouse service, as its user.
    clickhouse_host, _, clickhouse_port = env["CLICKHOUSE_HOST"].partition(":")
    clickhouse = services[clickhouse_host]["environment"]
    check(clickhouse_port in ("", "8123"), "CLICKHOUSE_HOST is not the HTTP port 8123")
    check(
        (env["CLICKHOUSE_USER"], env["CLICKHOUSE_PASSWORD"], env["CLICKHOUSE_DATABASE"])
        == (clickhouse["CLICKHOUSE_USER"], clickhouse["CLICKHOUSE_PASSWORD"], clickhouse["CLICKHOUSE_DB"]),
        "CLICKHOUSE_USER, _PASSWORD or _DATABASE differ from the clickhouse service's",
    )

    # Kafka: clients connect to what the broker advertises.
    kafka_host = env["KAFKA_HOSTS"].split(",")[0]
    kafka = services[kafka_host.split(":")[0]]["environment"]
    check(
        f"PLAINTEXT://{kafka_host}" in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","),
        "KAFKA_HOSTS is not the listener the kafka service advertises",
    )

    redis = urllib.parse.urlparse(env["REDIS_URL"])
    check(redis.hostname in services and redis.port == 6379, "REDIS_URL does not name the redis service")

    # The port: published, listened on, and the one --healthcheck asks.
    port = env["HTTP_SERVER_PORT"]
    check(f"{port}:{port}" in server["ports"], f"port {port} is not the one published")
    check(
        server["healthcheck"]["test"] == ["CMD", "plugin-server", "--healthcheck"],
        "plugin-server's health check is not the image's",
    )

    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            check(dependency in services, f"{name} depends on {dependency}, which is not a service")

    if binary:
        help_text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
        for flag in services["migrate"]["command"] + ["--healthcheck"]:
            check(flag in help_text, f"the binary does not take {flag}")

    if problems:
        for problem in problems:
            print(f"compose check: {problem}", file=sys.stderr)
        sys.exit(1)
    print("compose check: docker/compose.yml is consistent")


if __name__ == "__main__":
    main()
