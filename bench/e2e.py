#!/usr/bin/env python3
"""End-to-end benchmark (issue 5): smtp-source -> mta -> spool -> queue -> LMTP -> Maildir, beside Postfix.

mailsys (``twistd -n mailsys``: the mta listener on 127.0.0.1, the queue manager,
the LMTP courier and the MDA's LMTP listener on a unix socket, one account
joe@example.com in a Maildir, every other role off) and a stock Postfix
(../shared/anchors/postfix.sh: smtpd, cleanup, qmgr, virtual -> Maildir) take the
same load from Postfix's ``smtp-source``.  A run's clock starts when smtp-source
starts and stops when the N-th file appears in joe's ``Maildir/new`` (counted on
disk).  Every case runs against both systems in the same invocation, interleaved
(mailsys, postfix, mailsys, postfix, ...), N runs each; the table reports medians
and the ratio mailsys/postfix of the medians.  See bench/README.rst.

    python3 bench/e2e.py [--quick] [--runs N] [--cases 4k-20 4k-1 1m-5] [--systems mailsys postfix]
                         [--workers N] [--profile DIR] [--json FILE] [--keep]
    python3 bench/e2e.py --summarise-profile FILE.txt     # areas of a py-spy raw profile

Standard library only (the helpers are bench/receive.py's and bench/lmtp.py's).
Needs smtp-source (Debian's postfix package) and, for the Postfix comparison
point, root.  ``--profile`` needs py-spy.  Only 127.0.0.1 is ever contacted.
"""
import argparse
import collections
import contextlib
import fcntl
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import receive as common  # noqa: E402  (machine facts, smtp-source argv, the Postfix anchor, ...)
import lmtp as lmtpbench  # noqa: E402  (the account made by `mailsys user add`, Maildir counting)

sys.path.pop(0)

RCPT = "joe@example.com"
say = common.say
BenchError = common.BenchError

# name -> (messages, --quick messages); size and sessions are bench/receive.py's cases of that name
CASES = {"4k-20": (5000, 1000), "4k-1": (500, 200), "1m-5": (200, 50)}
DEFAULT_CASES = ["4k-20", "4k-1", "1m-5"]
TARGETS = {"4k-20": 2.0, "1m-5": 1.0}     # issue 5: mailsys/postfix end to end, at least
SYSTEMS = ["mailsys", "postfix"]


# bench/receive.py's configuration with the LMTP role on a unix socket, DNS at an
# unused loopback port and an optional ``server.workers``.
MAILSYS_CONFIG = common.derive_config("e2e.py", (
    ('state_dir = "{state}"\n', 'state_dir = "{state}"\n{workers}'),
    ("lmtp = []", 'lmtp = ["unix:{base}/lmtp.sock"]'),
    ('nameservers = ["127.0.0.1:1"]', 'nameservers = ["127.0.0.1:{dns_port}"]')))


# -- measuring --------------------------------------------------------------------------------

def wait_count(directory, n, deadline):
    """(perf_counter() when ``directory`` first holds ``n`` entries or None, entries seen).

    Polls with os.scandir; the pause shrinks as the count nears ``n`` (assuming no
    more than 4000 deliveries a second: 100 ms while far away, 2 ms for the last few),
    so the scans cost little CPU and the end is seen within a few milliseconds."""
    while True:
        got = lmtpbench.count(directory)
        now = time.perf_counter()
        if got >= n:
            return now, got
        if now > deadline:
            return None, got
        time.sleep(min(0.1, max(0.002, (n - got) / 4000)))


MESSAGE_ID = re.compile(rb"^Message-Id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


def check_files(directory, n, size):
    """Problems with the files in ``directory``: not exactly ``n`` of them, one shorter
    than the payload, or two copies of one message (the same Message-Id).

    smtp-source's payload is lines of 80 bytes with CRLF; Maildir files end lines with
    LF, so a file holds at least 79/80 of the payload (plus the headers)."""
    problems, short, ids = [], [], collections.Counter()
    least = size - size // 80
    entries = list(os.scandir(directory)) if os.path.isdir(directory) else []
    for entry in entries:
        st = entry.stat()
        if st.st_size < least:
            short.append((entry.name, st.st_size))
        with open(entry.path, "rb") as f:
            head = f.read(4096)
        m = MESSAGE_ID.search(head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0])
        if m:
            ids[m.group(1)] += 1
    if len(entries) != n:
        problems.append(f"{len(entries)} files in {directory}, expected exactly {n}")
    if short:
        problems.append(f"{len(short)} files shorter than the {size}-byte payload ({least} bytes "
                        f"with LF line ends), e.g. {short[0]}")
    dups = {k: v for k, v in ids.items() if v > 1}
    if dups:
        problems.append(f"{len(dups)} Message-Ids delivered more than once, e.g. {next(iter(dups))!r}")
    return problems, dict(files=len(entries), with_message_id=sum(ids.values()), duplicates=len(dups))


# -- the systems ------------------------------------------------------------------------------

class Mailsys(lmtpbench.Mailsys):
    """``twistd -n mailsys``, started afresh (new state directory and Maildir) for every run."""

    name = "mailsys"

    def __init__(self, workdir, keep, workers=None):
        super().__init__(workdir, keep)     # makes the account once with `mailsys user add`
        self.workers = workers
        self.warmup = 0

    def start_case(self, case):
        pass

    def start_run(self, case, run):
        self.base = os.path.join(self.workdir, case["name"], f"run{run}")
        common.set_aside(self.base)
        os.makedirs(self.base)
        for name, text in (("users", self.users), ("aliases", "")):
            with open(os.path.join(self.base, name), "w") as f:
                f.write(text)
        os.chmod(os.path.join(self.base, "users"), 0o600)
        self.port = common.free_port()
        cfg = os.path.join(self.base, "mailsys.toml")
        workers = f"workers = {self.workers}\n" if self.workers else ""
        with open(cfg, "w") as f:
            f.write(MAILSYS_CONFIG.format(state=os.path.join(self.base, "state"), port=self.port,
                                          base=self.base, dns_port=common.free_port(), workers=workers))
        self.log = os.path.join(self.base, "mailsys.log")
        self.argv = common.Mailsys.command(self, cfg)
        with open(os.path.join(self.base, "twistd.out"), "w") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.base, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.warmup = 2 * case["sessions"]
        try:
            common.wait_port(self.port, self.proc, what="mailsys (twistd)")
            # Untimed warm-up through the whole path: first connections, lazy imports,
            # the spool's first segment, the courier's first LMTP sessions.
            common.run_source(common.smtp_source_argv(case, self.port, RCPT, self.warmup), 120)
            if wait_count(self.new_dir(), self.warmup, time.perf_counter() + 60)[0] is None:
                raise BenchError(f"warm-up: {lmtpbench.count(self.new_dir())} of {self.warmup} "
                                 f"messages in new/ after 60 s")
        except BenchError as e:
            raise BenchError(f"{e}\n  command: {shlex.join(self.argv)}\n  twistd output:\n"
                             f"{common.tail(os.path.join(self.base, 'twistd.out'))}\n"
                             f"  log:\n{common.tail(self.log)}")
        lmtpbench.clear(self.new_dir())

    def cpu(self):
        return common.tree_cpu(self.proc.pid) if self.proc else None

    def pid(self):
        return self.proc.pid if self.proc else None

    def finish_run(self, case, result):
        """Stop the server, then read its log: every message sent over LMTP exactly
        once, nothing deferred, no error."""
        alive = self.proc is not None and self.proc.poll() is None
        if not alive:
            result["problems"].append(f"mailsys exited during the run (status {self.proc.returncode})")
        common.stop_process(self.proc)
        self.proc = None
        lines = self.log_lines()
        expected = case["messages"] + self.warmup
        by_status = collections.Counter()
        for line in lines:
            if "[mailsys.queue#info]" in line and " to=<" in line:
                m = re.search(r"status=(\w+)", line)
                by_status[m.group(1) if m else "?"] += 1
        result["queue_log"] = dict(by_status)
        if by_status.get("sent", 0) != expected or set(by_status) - {"sent"}:
            result["problems"].append(f"queue log: {dict(by_status)}, expected sent={expected} only "
                                      f"({self.warmup} warm-up)")
        errors = [line for line in lines if "#error]" in line or "#critical]" in line
                  or "#failure]" in line or "Traceback" in line or "Unhandled" in line]
        if errors:
            result["problems"].append(f"{len(errors)} error lines in {self.log}, first: {errors[0][:300]}")
        if not result["problems"] and not self.keep:
            common.set_aside(self.base)

    def stop_case(self):
        common.stop_process(self.proc)
        self.proc = None


class Baseline(Mailsys):
    """The same server from another tree (``--baseline DIR``: a ``git worktree`` of an
    earlier commit, say), measured exactly like ``mailsys`` and interleaved with it, so
    that a change is judged against its base in the same minutes of this noisy machine."""

    name = "baseline"

    def __init__(self, workdir, keep, workers, tree):
        self.tree = os.path.realpath(tree)
        if not os.path.isfile(os.path.join(self.tree, "mailsys", "__init__.py")):
            raise BenchError(f"--baseline {tree}: no mailsys package there")
        super().__init__(os.path.join(workdir, "baseline"), keep, workers)
        self.env = dict(self.env, PYTHONPATH=self.tree)


class Postfix(common.Postfix):
    """The anchor, started once per case (and warmed up) by bench/receive.py's class;
    ``Maildir/new`` emptied before every run."""

    def new_dir(self):
        return self.new

    def start_run(self, case, run):
        self._clear()
        self._log_offset = len(common._read(os.path.join(self.base, "maillog")))

    def pid(self):
        text = common._read(os.path.join(self.base, "spool", "pid", "master.pid")).strip()
        return int(text) if text.isdigit() else None

    def cpu(self):
        pid = self.pid()
        return common.tree_cpu(pid) if pid else None

    def finish_run(self, case, result):
        log = common._read(os.path.join(self.base, "maillog"))[self._log_offset:]
        bad = [line for line in log.splitlines()
               if re.search(r"status=(deferred|bounced)| (fatal|panic|error): ", line)]
        if bad:
            result["problems"].append(f"{len(bad)} problem lines in the maillog, first: {bad[0][:300]}")
        self._clear()


# -- running ----------------------------------------------------------------------------------

class Neighbour:
    """Another tenant of the file system: a thread writing ``mb_per_s`` MB a second of
    buffered data into one file next to the systems' state (rewritten in place every
    256 MiB, so the disk fills no further), never flushing it.  What it shows: how much
    a system's deliveries are slowed by other dirty data on the same file system (a
    flush of the whole file system waits for all of it; a flush of a file does not)."""

    def __init__(self, directory, mb_per_s):
        self.path = os.path.join(directory, "neighbour.dat")
        self.rate = mb_per_s
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def _write(self):
        block = b"n" * (1 << 20)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            start, n = time.monotonic(), 0
            while not self._stop.is_set():
                os.write(fd, block)
                n += 1
                if n % 256 == 0:
                    os.lseek(fd, 0, os.SEEK_SET)
                self._stop.wait(max(0.0, start + n / self.rate - time.monotonic()))
        finally:
            os.close(fd)

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            with contextlib.suppress(FileNotFoundError):     # the thread could not create it
                os.unlink(self.path)


def run_one(system, case, run, wait, settle, profile=None, neighbour=None):
    n = case["messages"]
    result = {"case": case["name"], "system": system.name, "run": run, "messages": n,
              "size": case["size"], "sessions": case["sessions"], "problems": []}
    spy = None
    try:
        system.start_run(case, run)
        argv = common.smtp_source_argv(case, system.port, RCPT)
        result["command"] = shlex.join(argv)
        new = system.new_dir()
        if profile:
            spy = start_profiler(system.pid(), profile, case)
            result["profile"] = profile
        if neighbour is not None:
            neighbour.start()
            result["neighbour_mb_per_s"] = neighbour.rate
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = system.cpu()
        ended = []
        t0 = time.perf_counter()
        source = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        waiter = threading.Thread(target=lambda: (source.wait(), ended.append(time.perf_counter())),
                                  daemon=True)
        waiter.start()
        done, got = wait_count(new, n, t0 + common.source_timeout(case) + wait)
        cpu1 = system.cpu()
        if neighbour is not None:
            neighbour.stop()
        waiter.join(max(1.0, common.source_timeout(case) - (time.perf_counter() - t0)))
        if source.poll() is None:
            source.kill()
            source.wait()
            result["problems"].append("smtp-source did not finish")
        output = source.stdout.read()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if source.returncode != 0:
            result["problems"].append(f"smtp-source exited {source.returncode}: {output.strip()[-500:]}")
        if ended:
            result["source_seconds"] = ended[0] - t0
            result["receive_msgs_per_s"] = n / result["source_seconds"]
        if done is None:
            result["problems"].append(f"only {got} of {n} messages in new/ after the bounded wait "
                                      f"({common.source_timeout(case) + wait:.0f} s)")
        else:
            seconds = done - t0
            result.update(seconds=seconds, msgs_per_s=n / seconds, mb_per_s=n * case["size"] / seconds / 1e6)
            if cpu0 is not None and cpu1 is not None:
                result["server_cpu_s"] = cpu1 - cpu0
        time.sleep(settle)       # a late duplicate would show up here
        problems, files = check_files(new, n, case["size"])
        result["files"] = files
        result["problems"] += problems
    except BenchError as e:
        result["problems"].append(str(e))
    finally:
        if neighbour is not None:
            neighbour.stop()
        if spy is not None:
            stop_profiler(spy, result)
    try:
        system.finish_run(case, result)
    except BenchError as e:
        result["problems"].append(str(e))
    result["ok"] = not result["problems"]
    line = f"  {case['name']:<6} run {run}  {system.name:<8}"
    if "msgs_per_s" in result:
        line += f" {result['msgs_per_s']:8.1f} msg/s {result['mb_per_s']:7.2f} MB/s ({result['seconds']:.2f}s)"
        if "server_cpu_s" in result:
            line += (f"  CPU {result['server_cpu_s']:.2f}s ({100 * result['server_cpu_s'] / result['seconds']:.0f}%"
                     f" of a core, {1000 * result['server_cpu_s'] / n:.2f} ms/msg)")
        if "receive_msgs_per_s" in result:
            line += f"  smtp-source done at {result['source_seconds']:.2f}s"
    if profile:
        line += "  [profiled: not in the medians]"
    say(line)
    for p in result["problems"]:
        say(f"  !!! FAILED: {system.name} {case['name']} run {run}: " + p.replace("\n", "\n  !!!   "))
    return result


# -- profiling (py-spy) -------------------------------------------------------------------------

def start_profiler(pid, directory, case):
    spy = shutil.which("py-spy")
    if not spy:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    os.makedirs(directory, exist_ok=True)
    out = os.path.join(directory, f"mailsys-{case['name']}.txt")
    duration = max(5, int(common.source_timeout(case)))
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "100",
            "-f", "raw", "-o", out, "--duration", str(duration)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)          # let it attach to every process before the load starts
    return proc, out


def stop_profiler(spy, result):
    proc, out = spy
    proc.send_signal(signal.SIGINT)      # py-spy writes what it has on Ctrl-C
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if os.path.exists(out):
        result["profile_summary"] = summarise_profile(out)


# A sample's innermost frame first: waiting (not CPU) is told apart from work.
WAITS = [
    ("idle: epoll wait, threads waiting for work", ("EPollReactor.doPoll", "Condition.wait", "Event.wait",
                                                     "Queue.get", "lock.acquire")),
    ("disk flush: MDA syncfs (Maildir tmp/ and new/)", ("flush (mailsys/mda/durable.py",)),
    ("disk flush: spool writer fdatasync", ("Spool._write_batch (mailsys/spool.py",)),
    ("disk flush: queue journal fdatasync", ("Journal._write (mailsys/journal.py",)),
]
# Then the work, by the first area whose code is anywhere on the stack.
AREAS = [
    ("logging (twisted.logger, log file, log pipe)", ("twisted/logger/", "twisted/python/logfile.py",
                                                       "mailsys/logs.py", "_stdout_observer")),
    ("Maildir syscalls (open/writev/link/unlink)", ("mailsys/mda/maildir.py", "mailsys/mda/durable.py",
                                                    "mailsys/mda/store.py")),
    ("spool writer (CPU)", ("mailsys/spool.py",)),
    ("queue journal (CPU)", ("mailsys/journal.py",)),
    ("LMTP server / MDA", ("mailsys/mda/",)),
    ("LMTP client (courier)", ("mailsys/couriers/",)),
    ("queue manager", ("mailsys/queue.py", "mailsys/delivery.py")),
    ("SMTP receive (mta handler, policy, accounts)", ("mailsys/receive.py", "mailsys/policy.py",
                                                      "mailsys/accounts.py", "mailsys/rdns.py")),
    ("SMTP/LMTP server protocol (both listeners)", ("mailsys/smtp/",)),
    ("worker plumbing (pipes between workers)", ("mailsys/workers.py",)),
]
OTHER = "Twisted dispatch and socket I/O (reactor, unix-socket send/recv, accept/connect/close)"


def _area(frames):
    leaf = frames[-1] if frames else ""
    for name, needles in WAITS:
        if any(n in leaf for n in needles):
            return name
    # Only what runs below the reactor's loop counts (every frame of worker 1.. sits
    # under mailsys/workers.py's main()).
    loop = [i for i, x in enumerate(frames) if x.startswith("ReactorBase.mainLoop ")]
    text = ";".join(frames[loop[-1] + 1:] if loop else frames)
    for name, needles in AREAS:
        if any(n in text for n in needles):
            return name
    return OTHER


def summarise_profile(path):
    """Shares of the samples of a py-spy ``-f raw`` profile (``--subprocesses``): by
    process, and by area -- waits (idle, disk flushes) told apart from CPU work, whose
    shares are also given as a part of the work alone."""
    per_proc, areas, per_proc_area = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            depth = sum(1 for x in frames if x.startswith("process "))
            proc = "worker 0 (twistd: queue, courier, mta, lmtp)" if depth <= 1 else \
                "worker 1.. (mta, lmtp)"
            frames = [x for x in frames if not x.startswith("process ")]
            area = _area(frames)
            total += n
            per_proc[proc] += n
            areas[area] += n
            per_proc_area[(proc, area)] += n
    work = sum(v for k, v in areas.items() if not k.startswith(("idle", "disk flush")))

    def pct(counter, of):
        return {k: round(100 * v / of, 1) for k, v in counter.most_common()} if of else {}

    return dict(samples=total, work_samples=work, processes=pct(per_proc, total), areas=pct(areas, total),
                work_areas=pct(collections.Counter({k: v for k, v in areas.items()
                                                    if not k.startswith(("idle", "disk flush"))}), work),
                by_process={f"{p} / {a}": v for (p, a), v in pct(per_proc_area, total).items()})


def format_profile(summary):
    out = [f"py-spy samples: {summary['samples']} (work, i.e. neither idle nor a disk flush: "
           f"{summary['work_samples']})"]
    for key, title in (("processes", "by process, % of all samples"), ("areas", "by area, % of all samples"),
                       ("work_areas", "work only, % of the work samples"),
                       ("by_process", "by process and area, % of all samples")):
        out.append(f"  {title}:")
        out += [f"    {v:5.1f}%  {k}" for k, v in summary[key].items() if v >= 0.5]
    return "\n".join(out)


# -- the table --------------------------------------------------------------------------------

def summarise(results, cases, systems):
    rows, ratios = [], []
    for case in cases:
        med = {}
        mine = {}
        for name in systems:
            ok = [r for r in results if r["case"] == case["name"] and r["system"] == name and r["ok"]
                  and not r.get("profile")]
            failed = sum(1 for r in results if r["case"] == case["name"] and r["system"] == name
                         and not r["ok"])
            mine[name] = ok
            if not ok:
                rows.append(dict(case=case["name"], system=name, n=0, failed=failed))
                continue
            rates = [r["msgs_per_s"] for r in ok]
            med[name] = statistics.median(rates)
            row = dict(case=case["name"], system=name, n=len(ok), failed=failed,
                       median_msgs=med[name], median_mb=med[name] * case["size"] / 1e6,
                       min_msgs=min(rates), max_msgs=max(rates))
            cpu = [r["server_cpu_s"] for r in ok if "server_cpu_s" in r]
            if cpu:
                row["cpu_s"] = statistics.median(cpu)
                row["cpu_pct"] = statistics.median(100 * r["server_cpu_s"] / r["seconds"] for r in ok
                                                   if "server_cpu_s" in r)
                row["cpu_ms_per_msg"] = 1000 * row["cpu_s"] / case["messages"]
            recv = [r["receive_msgs_per_s"] for r in ok if "receive_msgs_per_s" in r]
            if recv:
                row["receive_msgs"] = statistics.median(recv)
            rows.append(row)
        ratio = dict(case=case["name"], target=TARGETS.get(case["name"]))
        if med.get("mailsys") and med.get("postfix"):
            ratio["mailsys/postfix"] = med["mailsys"] / med["postfix"]
            by_run = {r["run"]: r for r in mine["postfix"]}
            ratio["per_round"] = [round(r["msgs_per_s"] / by_run[r["run"]]["msgs_per_s"], 2)
                                  for r in mine["mailsys"] if r["run"] in by_run]
            if ratio["target"]:
                ratio["met"] = ratio["mailsys/postfix"] >= ratio["target"]
        if med.get("mailsys") and med.get("baseline"):
            by_run = {r["run"]: r for r in mine["baseline"]}
            pairs = [(r, by_run[r["run"]]) for r in mine["mailsys"] if r["run"] in by_run]
            ratio["mailsys/baseline"] = med["mailsys"] / med["baseline"]
            ratio["baseline_per_round"] = [round(a["msgs_per_s"] / b["msgs_per_s"], 2) for a, b in pairs]
            ratio["cpu_per_round"] = [round(a["server_cpu_s"] / b["server_cpu_s"], 2) for a, b in pairs
                                      if "server_cpu_s" in a and "server_cpu_s" in b]
        ratios.append(ratio)
    return rows, ratios


def format_table(rows, ratios):
    out = []
    head = (f"{'case':<6} {'system':<8} {'e2e msg/s':>10} {'MB/s':>7} {'min..max msg/s':>15} "
            f"{'runs':>5} {'CPU s':>6} {'CPU %':>6} {'ms/msg':>7} {'recv msg/s':>10}")
    out += [head, "-" * len(head)]
    for r in rows:
        runs = f"{r['n']}" + (f"+{r['failed']}F" if r["failed"] else "")
        if r["n"] == 0:
            out.append(f"{r['case']:<6} {r['system']:<8} {'FAILED':>10} {'':>7} {'':>15} {runs:>5}")
            continue
        mm = f"{r['min_msgs']:.0f}..{r['max_msgs']:.0f}"
        cpu = (f"{r['cpu_s']:>6.2f} {r['cpu_pct']:>5.0f}% {r['cpu_ms_per_msg']:>7.2f}"
               if "cpu_s" in r else f"{'':>6} {'':>6} {'':>7}")
        recv = f"{r['receive_msgs']:>10.1f}" if "receive_msgs" in r else ""
        out.append(f"{r['case']:<6} {r['system']:<8} {r['median_msgs']:>10.1f} {r['median_mb']:>7.2f} "
                   f"{mm:>15} {runs:>5} {cpu} {recv}")
    out.append("")
    head = f"{'case':<6} {'mailsys/postfix (medians)':>26}  {'per round':<20} target"
    out += [head, "-" * len(head)]
    for r in ratios:
        if "mailsys/postfix" not in r:
            out.append(f"{r['case']:<6} {'-':>26}")
            continue
        verdict = "-" if not r["target"] else (f">= {r['target']:.1f}: " + ("met" if r["met"] else "NOT met"))
        out.append(f"{r['case']:<6} {r['mailsys/postfix']:>26.2f}  "
                   f"{' '.join(f'{x:.2f}' for x in r['per_round']):<20} {verdict}")
    for r in ratios:
        if "mailsys/baseline" in r:
            out.append(f"{r['case']:<6} mailsys/baseline msg/s {r['mailsys/baseline']:.2f} (medians), per round "
                       f"{' '.join(f'{x:.2f}' for x in r['baseline_per_round'])}; server CPU per round "
                       f"{' '.join(f'{x:.2f}' for x in r['cpu_per_round'])}")
    return "\n".join(out)


def other_load():
    """The busiest processes over the last second ("%CPU PID COMMAND"; others share this
    machine): top's second sample, its first one is the average since boot."""
    text = common._cmd_out(["top", "-b", "-n", "2", "-d", "1", "-w", "200"])
    block = text.split("PID USER")[-1].splitlines()[1:]
    busy = []
    for line in block:
        f = line.split()
        if len(f) >= 12 and f[8].replace(".", "").isdigit() and float(f[8]) >= 1.0:
            busy.append(f"{f[8]} {f[0]} {' '.join(f[11:])}")
    return busy[:8] or ["(nothing above 1% of a core)"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases:\n" + "\n".join(
                                     f"  {k:<6} {common.CASES[k][5]} ({v[0]} messages; --quick {v[1]})"
                                     for k, v in CASES.items()))
    ap.add_argument("--quick", action="store_true", help="1 run and fewer messages: a smoke test")
    ap.add_argument("--runs", type=int, default=None, help="runs per case and system (default 3, --quick 1)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=None, metavar="CASE")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, metavar="SYSTEM")
    ap.add_argument("--messages", type=int, default=None, help="override every case's message count")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run mailsys from another tree (e.g. a git worktree of the commit before a "
                         "change) as system 'baseline', interleaved, and print the ratios per round")
    ap.add_argument("--workers", type=int, default=None,
                    help="mailsys server.workers (default: the configuration's default, one per CPU)")
    ap.add_argument("--wait", type=float, default=120.0,
                    help="bounded wait for new/ to fill beyond smtp-source's own time limit (default 120 s)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait after the N-th file before checking for extra files (default 1)")
    ap.add_argument("--neighbour", type=float, default=None, metavar="MB_PER_S",
                    help="during every run, a thread writes this many MB a second of buffered data "
                         "into a file in the work dir (the same file system), never flushed")
    ap.add_argument("--profile", metavar="DIR",
                    help="after the measured runs, one more mailsys run per case with py-spy attached "
                         "(raw profiles in DIR; that run is left out of the medians)")
    ap.add_argument("--summarise-profile", metavar="FILE", help="print the areas of a py-spy raw profile and exit")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mailsys-bench"),
                    help="scratch directory (default /tmp/mailsys-bench, shared with receive.py's lock)")
    ap.add_argument("--keep", action="store_true", help="keep state directories, logs and Maildirs")
    ap.add_argument("--json", metavar="FILE", help="write raw results, machine facts and summary as JSON")
    args = ap.parse_args(argv)

    if args.summarise_profile:
        say(format_profile(summarise_profile(args.summarise_profile)))
        return 0
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        ap.error("--runs must be at least 1")
    if args.neighbour is not None and args.neighbour <= 0:
        ap.error("--neighbour must be above 0")
    cases = []
    for name in args.cases or DEFAULT_CASES:
        size, sessions, _, _, _, meaning = common.CASES[name]
        messages, quick = CASES[name]
        messages = args.messages or (quick if args.quick else messages)
        cases.append(dict(name=name, size=size, sessions=sessions, messages=messages, reuse=False,
                          meaning=meaning))
    if not shutil.which("smtp-source"):
        sys.exit("smtp-source not found: install Debian's postfix package")

    os.makedirs(args.workdir, exist_ok=True)
    lock = open(os.path.join(args.workdir, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"another benchmark holds {args.workdir}/lock; waiting for it to finish ...")
        fcntl.flock(lock, fcntl.LOCK_EX)
    workdir = tempfile.mkdtemp(prefix="e2e-", dir=args.workdir)
    os.chmod(workdir, 0o755)

    command = shlex.join(["python3", "bench/e2e.py"] + (sys.argv[1:] if argv is None else list(argv)))
    facts = common.machine_facts(os.path.realpath(workdir))
    facts["workers"] = args.workers or "default (server.workers = 0: one per CPU, at most 4)"
    facts["neighbour"] = f"{args.neighbour:g} MB/s of buffered writes" if args.neighbour else "none"
    facts["busiest_at_start"] = other_load()
    say("mailsys end-to-end benchmark (issue 5): smtp-source -> mta -> spool -> queue -> LMTP -> Maildir")
    say(f"command: {command}   (cwd {os.getcwd()})")
    for k in ("date", "nproc", "cpu", "memory", "kernel", "python", "twisted", "postfix", "filesystem",
              "workers", "neighbour"):
        say(f"  {k + ':':<12} {facts[k]}")
    say(f"  {'load:':<12} {facts['loadavg_start']} (1/5/15 min; others share this machine)")
    say("  busiest at start (%CPU PID COMMAND, last second): " + " | ".join(x.strip() for x in facts["busiest_at_start"][:5]))
    say(f"runs per system: {runs}, interleaved; work dir {workdir}")
    for c in cases:
        say(f"  {c['name']:<6} {c['messages']} messages of {c['size']} bytes: {c['meaning']}")
    say("")

    names = list(args.systems) + (["baseline"] if args.baseline else [])
    systems, problems = [], []
    for name in names:
        try:
            systems.append(Mailsys(workdir, args.keep, args.workers) if name == "mailsys"
                           else Baseline(workdir, args.keep, args.workers, args.baseline)
                           if name == "baseline" else Postfix(workdir, args.keep, args.wait))
        except BenchError as e:
            problems.append(f"{name}: not measured: {e}")
            say(f"!!! {name}: not measured: {e}")

    profiles = {}

    def profile_run(live, case, results):
        """One extra mailsys run with py-spy attached, left out of the medians."""
        for s in live:
            if args.profile and s.name == "mailsys":
                r = run_one(s, case, runs + 1, args.wait, args.settle, profile=args.profile)
                results.append(r)
                if "profile_summary" in r:
                    profiles[case["name"]] = r["profile_summary"]
                    say(format_profile(r["profile_summary"]))

    started = time.monotonic()
    neighbour = Neighbour(workdir, args.neighbour) if args.neighbour else None
    results = common.interleave(systems, cases, runs,
                                lambda s, case, run: run_one(s, case, run, args.wait, args.settle,
                                                             neighbour=neighbour),
                                problems, workdir=workdir, keep=args.keep, after=profile_run)

    facts["loadavg_end"] = common._read("/proc/loadavg").strip()
    facts["busiest_at_end"] = other_load()
    facts["duration_s"] = round(time.monotonic() - started, 1)
    rows, ratios = summarise(results, cases, names)
    say("")
    say(f"Results ({runs} run(s) per system, medians; clock from smtp-source's start to the N-th file "
        f"in Maildir/new; MB = 10^6 bytes of payload; CPU = the server's process tree; "
        f"took {facts['duration_s']:.0f}s; load at end {facts['loadavg_end']})")
    say(format_table(rows, ratios))
    failed = [r for r in results if not r["ok"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=command, facts=facts, cases=cases, runs=runs, results=results,
                           summary=rows, ratios=ratios, profiles=profiles, problems=problems), f, indent=2)
        say(f"\nraw results written to {args.json}")
    if failed or problems:
        say("\nFAILED: " + "; ".join(problems + [f"{r['case']} {r['system']} run {r['run']}: "
                                                 f"{r['problems'][0].splitlines()[0]}" for r in failed]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
