#!/usr/bin/env python3
"""Runs the runtime stage of docker/Dockerfile without a Docker engine, and checks the result.

These machines have the docker CLI but no engine and no registry access, so the image cannot be
built here. What can be checked is the runtime stage itself, from the Dockerfile's own
instructions: FROM debian:bookworm-slim becomes a debootstrap of Debian bookworm (minbase, cached
under $SVC_DIR), each RUN runs in a chroot of it, COPY copies from the repository (COPY --from=builder
copies the binary given on the command line), and ENV, WORKDIR, USER, ENTRYPOINT and HEALTHCHECK
are applied when the entrypoint starts. The checks are those of a first `docker run`:

  * the entrypoint starts as the image's non-root user, with only the image's files and env;
  * the HEALTHCHECK command passes once it is up;
  * the embedded default profile runs the sample plugin: a captured event is stored with the
    plugin's greeting, under BASE_DIR, which that user can write.

Not covered: the builder stage (rust:1.95-bookworm, `cargo build --release --locked`) and Docker
itself (layers, VOLUME initialisation, the compose file).

Usage (as root: chroot, mount): python3 docker/check_runtime_stage.py path/to/plugin-server
"""

import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVC_DIR = os.environ.get("SVC_DIR", "/tmp/plugin-server-services")
BASES = {"debian:bookworm-slim": "bookworm"}


def log(message):
    print(f"runtime stage: {message}", file=sys.stderr, flush=True)


def instructions(dockerfile, stage):
    """The (keyword, argument) pairs of one stage, continuation lines joined."""
    lines, current = [], ""
    for raw in open(dockerfile, encoding="utf-8"):
        line = raw.rstrip("\n")
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    found, result = False, []
    for line in lines:
        keyword, _, argument = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            if found:
                break
            found = re.search(rf"\bAS\s+{stage}\s*$", argument, re.IGNORECASE) is not None
        if found:
            result.append((keyword, argument.strip()))
    if not result:
        sys.exit(f"no stage {stage!r} in {dockerfile}")
    return result


def base_rootfs(image):
    suite = BASES.get(image)
    if suite is None:
        sys.exit(f"no debootstrap equivalent known for {image}")
    cache = os.path.join(SVC_DIR, f"rootfs-{suite}")
    if not os.path.exists(os.path.join(cache, ".complete")):
        if shutil.which("debootstrap") is None:
            log("installing debootstrap")
            subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], check=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                           stdout=subprocess.DEVNULL)
        shutil.rmtree(cache, ignore_errors=True)
        log(f"debootstrap {suite} (minbase) into {cache}")
        subprocess.run(["debootstrap", "--variant=minbase", suite, cache,
                        "http://deb.debian.org/debian"], check=True, stdout=subprocess.DEVNULL)
        open(os.path.join(cache, ".complete"), "w").close()
    return cache


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    steps = instructions(os.path.join(REPO, "docker", "Dockerfile"), "runtime")
    work = tempfile.mkdtemp(prefix="runtime-stage-")
    root = os.path.join(work, "root")
    mounts = []
    server = None
    try:
        env, workdir, user, entrypoint, healthcheck = {}, "/", "0:0", None, None
        for keyword, argument in steps:
            if keyword == "FROM":
                image = argument.split()[0]
                log(f"FROM {image}")
                subprocess.run(["cp", "-a", base_rootfs(image), root], check=True)
                shutil.copy("/etc/resolv.conf", os.path.join(root, "etc", "resolv.conf"))
                # /proc as a container has it; /dev keeps debootstrap's device nodes (a bind
                # mount of the host's /dev would put it in reach of the cleanup below).
                proc = os.path.join(root, "proc")
                subprocess.run(["mount", "-t", "proc", "proc", proc], check=True)
                mounts.append(proc)
            elif keyword == "RUN":
                log(f"RUN {argument[:70]}...")
                subprocess.run(["chroot", root, "/bin/sh", "-c", argument], check=True,
                               stdout=subprocess.DEVNULL,
                               env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
            elif keyword == "COPY":
                words = shlex.split(argument)
                flags = [w for w in words if w.startswith("--")]
                paths = [w for w in words if not w.startswith("--")]
                *sources, destination = paths
                target = os.path.join(root, destination.lstrip("/"))
                chown = next((f.split("=", 1)[1] for f in flags if f.startswith("--chown=")), None)
                if any(f.startswith("--from=") for f in flags):
                    sources = [binary]
                else:
                    sources = [os.path.join(REPO, s) for s in sources]
                log(f"COPY {' '.join(paths)}")
                for source in sources:
                    if os.path.isdir(source):
                        shutil.copytree(source, target, dirs_exist_ok=True)
                    else:
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        shutil.copy2(source, target)
                if chown:
                    subprocess.run(["chroot", root, "chown", "-R", chown, destination], check=True)
            elif keyword == "ENV":
                for pair in shlex.split(argument):
                    key, _, value = pair.partition("=")
                    env[key] = value
            elif keyword == "WORKDIR":
                workdir = argument
                os.makedirs(os.path.join(root, workdir.lstrip("/")), exist_ok=True)
            elif keyword == "USER":
                user = argument
            elif keyword == "ENTRYPOINT":
                entrypoint = json.loads(argument)
            elif keyword == "HEALTHCHECK":
                healthcheck = json.loads(argument.split("CMD", 1)[1])
        if entrypoint is None or healthcheck is None:
            sys.exit("the runtime stage has no ENTRYPOINT or HEALTHCHECK")

        uid, gid = (int(part) for part in user.split(":"))
        port = free_port()
        # As `docker run -e HTTP_SERVER_PORT=...`: the only change to the image's environment.
        run_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/app", **env, "HTTP_SERVER_PORT": str(port)}

        def in_image():
            os.chroot(root)
            os.chdir(workdir)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

        output = open(os.path.join(work, "server.log"), "w")
        log(f"starting {entrypoint} as {user} in {workdir}")
        server = subprocess.Popen(entrypoint, env=run_env, preexec_fn=in_image,
                                  stdout=output, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            check = subprocess.run(healthcheck, env=run_env, preexec_fn=in_image,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if check.returncode == 0:
                log("HEALTHCHECK passes")
                break
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"FAIL: HEALTHCHECK did not pass; server log:\n{open(output.name).read()}")
            time.sleep(0.5)

        # A container is reached from outside it: the image must listen on every interface,
        # not on the embedded default's loopback.
        if f"0.0.0.0:{port}" not in open(output.name).read():
            sys.exit(f"FAIL: the server does not listen on 0.0.0.0:{port}; server log:\n"
                     f"{open(output.name).read()}")
        log(f"listens on 0.0.0.0:{port}")

        body = json.dumps({"api_key": "phc_first", "event": "$pageview", "distinct_id": "me",
                           "properties": {"$current_url": "https://example.com/a"}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/capture", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                sys.exit(f"FAIL: capture answered {response.status}")
        base_dir = os.path.join(root, env.get("BASE_DIR", workdir).lstrip("/"))
        rows = []
        for path in glob.glob(os.path.join(base_dir, "data", "events-*.jsonl")):
            if os.stat(path).st_uid != uid:
                sys.exit(f"FAIL: {path} is not owned by the image's user {uid}")
            rows += [json.loads(line) for line in open(path, encoding="utf-8")]
        if len(rows) != 1:
            sys.exit(f"FAIL: {len(rows)} stored events, want 1; server log:\n{open(output.name).read()}")
        properties = json.loads(rows[0]["properties"])
        if properties.get("greeting") != "hello from plugin-server":
            sys.exit("FAIL: the sample plugin did not run on the event: "
                     f"{properties}\nserver log:\n{open(output.name).read()}")
        log("the sample plugin greeted the first captured event; stored under BASE_DIR as "
            f"uid {uid}")
        print("runtime stage: ok")
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        for path in reversed(mounts):
            subprocess.run(["umount", path], check=False)
        still_mounted = [path for path in mounts if os.path.ismount(path)]
        if still_mounted:
            log(f"left {work} in place: {still_mounted} still mounted")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
