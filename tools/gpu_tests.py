# SPDX-License-Identifier: Apache-2.0
"""The GPU tests, run so that one crash does not hide the rest:

    python3 tools/gpu_tests.py OUTDIR [--timeout S] [--first NAME]... [--marker M] [--jobs J]
                               [--block K] [PYTEST-ARGS...]

Collects the tests (``-m gpu`` unless --marker says otherwise), puts those whose node id
contains one of the --first names ahead (in the order given, collection order within),
and runs them in a pytest process with ``-v``. Where that process dies (a segfault, an
abort), the test it was in is recorded as crashed and a new process runs the tests after
it. The whole run stops at --timeout seconds (SIGINT, so pytest still prints its
failures); what did not run is listed. --jobs J runs J such processes side by side, their
log lines prefixed [jN]: a fresh GPU machine spends most of a test's time compiling
Triton kernels on one CPU core. The ordered list is dealt to them in blocks of --block
consecutive tests (default 8; the --first tests still start first): neighbouring tests,
often one test's parametrizations, mostly need the same kernels, which a process then
compiles once instead of several processes compiling them at the same time.

Writes OUTDIR/pytest_gpu.log (every process's output, one after the other) and
OUTDIR/gpu_tests.json: counts, the failed, crashed and not-run node ids, and the 20
slowest tests (wall seconds from one result line to the next). Exit status 0 when every
test ran and none failed or crashed, else 1 (2: nothing collected)."""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

OUTCOMES = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")
# -v prints "nodeid OUTCOME [ 12%]"; an ERROR at setup or teardown repeats the node id
LOG_LOCK = threading.Lock()
RESULT = re.compile(r"^(\S+::\S+) (" + "|".join(OUTCOMES) + r")\b")


def collect(pytest_args: list[str], marker: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    cmd += (["-m", marker] if marker else []) + pytest_args
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


def order(ids: list[str], first: list[str]) -> list[str]:
    ahead = [i for name in first for i in ids if name in i]
    seen = set()
    ahead = [i for i in ahead if not (i in seen or seen.add(i))]
    return ahead + [i for i in ids if i not in seen]


def deal(ids: list[str], jobs: int, block: int) -> list[list[str]]:
    """ids in blocks of ``block`` consecutive ids, dealt round-robin to ``jobs`` lists."""
    shards: list[list[str]] = [[] for _ in range(jobs)]
    for b, start in enumerate(range(0, len(ids), block)):
        shards[b % jobs].extend(ids[start:start + block])
    return shards


def run_once(ids: list[str], log, deadline: float, results: dict, times: dict,
             tag: str = "") -> int | None:
    """One pytest process over ids; fills results (node id -> outcome). Returns its exit
    status, or None when it was stopped at the deadline."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", "--tb=short",
           "-o", "console_output_style=classic", *ids]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()  # a reader thread: a hung test must not block the deadline
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")]
                     + [lines.put(None)], daemon=True).start()
    last, stopped, wanted = time.monotonic(), False, set(ids)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if stopped:
                proc.kill()
                break
            proc.send_signal(signal.SIGINT)
            stopped, deadline = True, time.monotonic() + 30  # then a hard stop
            continue
        try:
            line = lines.get(timeout=min(left, 5.0))
        except queue.Empty:
            continue
        if line is None:
            break
        with LOG_LOCK:  # --jobs: lines from several processes, whole
            log.write(tag + line)
            log.flush()
        m = RESULT.match(line)
        if m and m.group(1) in wanted:
            nid, outcome = m.groups()
            now = time.monotonic()
            times[nid] = times.get(nid, 0.0) + now - last
            last = now
            if results.get(nid) in (None, "PASSED"):  # an ERROR at teardown overrides PASSED
                results[nid] = outcome
    rc = proc.wait()
    return None if stopped else rc


def run_shard(todo: list[str], log, deadline: float, results: dict, times: dict,
              crashed: list, tag: str) -> None:
    """pytest processes over todo, one after another: where one dies, its test is recorded
    as crashed and the next process starts after it."""
    while todo and time.monotonic() < deadline:
        rc = run_once(todo, log, deadline, results, times, tag)
        if rc is None or rc in (0, 1, 5):  # stopped, or pytest ended by itself
            return
        rest = [i for i in todo if i not in results]
        if not rest:
            return
        crashed.append(rest[0])  # the process died in the first test without a result
        results[rest[0]] = "CRASHED"
        with LOG_LOCK:
            log.write(f"\n{tag}=== gpu_tests: the process ended with status {rc} in {rest[0]}; "
                      f"going on with the {len(rest) - 1} tests after it\n")
        todo = rest[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--first", action="append", default=[],
                    help="a node-id substring whose tests run first (repeatable)")
    ap.add_argument("--marker", default="gpu", help='pytest -m expression ("" for none)')
    ap.add_argument("--jobs", type=int, default=1, help="pytest processes side by side")
    ap.add_argument("--block", type=int, default=8, help="consecutive tests dealt to one process")
    args, pytest_args = ap.parse_known_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    deadline = time.monotonic() + args.timeout
    ids = order(collect(pytest_args or ["tests"], args.marker), args.first)
    if not ids:
        print("gpu_tests: no tests collected", file=sys.stderr)
        return 2
    results: dict[str, str] = {}
    times: dict[str, float] = {}
    crashed: list[str] = []
    jobs = max(1, min(args.jobs, len(ids)))
    with open(os.path.join(args.outdir, "pytest_gpu.log"), "w") as log:
        shards = deal(ids, jobs, max(1, args.block))
        tags = [f"[j{j}] " if jobs > 1 else "" for j in range(jobs)]
        threads = [threading.Thread(target=run_shard, args=(shard, log, deadline, results, times,
                                                            crashed, tag))
                   for shard, tag in zip(shards, tags)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    crashed.sort(key=ids.index)
    count = {o: sum(v == o for v in results.values()) for o in OUTCOMES + ("CRASHED",)}
    summary = {
        "collected": len(ids), **{k.lower(): v for k, v in count.items()},
        "failed_ids": [i for i in ids if results.get(i) in ("FAILED", "ERROR")],
        "crashed_ids": crashed,
        "not_run_ids": [i for i in ids if i not in results],
        "slowest_s": dict(sorted(((k, round(v, 2)) for k, v in times.items()),
                                 key=lambda kv: -kv[1])[:20]),
    }
    with open(os.path.join(args.outdir, "gpu_tests.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("gpu_tests: " + ", ".join(f"{v} {k.lower()}" for k, v in count.items() if v)
          + f", {len(summary['not_run_ids'])} not run (of {len(ids)})")
    for key in ("failed_ids", "crashed_ids"):
        for i in summary[key]:
            print(f"  {key[:-4]}: {i}")
    bad = summary["failed_ids"] or crashed or summary["not_run_ids"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
