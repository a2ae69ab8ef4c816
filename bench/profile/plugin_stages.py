#!/usr/bin/env python3
"""Each perf sample of the server goes to the first of STAGES (in this order) that a frame
of its stack matches. Usage: bench/profile/plugin_stages.py script.txt.gz  (perf script -F comm,tid,period,ip,sym)"""
import gzip, re, sys, collections
STAGES = [
  ("boa GC", r"boa_gc"),
  ("event into the VM (text_to_js / Plain::to_js)", r"text_to_js|Plain.*to_js|plain::.*to_js"),
  ("result out of the VM (Plain::export)", r"Plain.*export|plain::.*export"),
  ("pipeline: event to JSON for the chain (chain_event)", r"pipeline::chain_event"),
  ("pipeline: parse the plugin's result (run_plugins)", r"run_plugins"),
  ("plugin call (vm.rs, boa interpreter)", r"runtime::vm::|PluginVm|boa_engine|boa_"),
  ("pool / worker / chain glue", r"plugins::pool|plugins::worker|plugins::chain|SyncArbiter|actix::sync"),
  ("ClickHouse sink", r"clickhouse::|lz4_flex|sinks::"),
  ("persons", r"persons::"),
  ("definitions / groups", r"definitions::|groups::"),
  ("build rows (prepare)", r"prepare::|build_batch|build_row"),
  ("parse envelope / normalize / stamp", r"envelope::|normalize|stamp_"),
  ("kafka", r"rdkafka|rd_kafka|consumer::"),
  ("pipeline other", r"ingest::"),
]
STAGES = [(n, re.compile(p)) for n, p in STAGES]
def samples(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt", errors="replace") as f:
        head = None; frames = []
        for line in f:
            if not line.strip():
                if head: yield head, frames
                head = None; frames = []; continue
            if not line.startswith("\t") and not line.startswith(" "):
                head = line.split(); continue
            parts = line.strip().split(" ", 1)
            frames.append(parts[1] if len(parts) > 1 else "")
        if head: yield head, frames
tot = collections.Counter(); total = 0
for head, frames in samples(sys.argv[1]):
    period = int(head[2]) if len(head) > 2 and head[2].isdigit() else 1
    total += period
    stage = "other (kernel, runtime, truncated)"
    for name, rx in STAGES:
        if any(rx.search(f) for f in frames):
            stage = name; break
    tot[stage] += period
for name, n in tot.most_common():
    print(f"{100*n/total:5.1f} %  {name}")
