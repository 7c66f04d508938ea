#!/usr/bin/env python3
"""Receive benchmark (issue 2): smtp-source into mailsys, smtp-sink and a stock Postfix.

Every case runs against every system in the same invocation, interleaved
(mailsys, smtp-sink, postfix, mailsys, smtp-sink, postfix, ...), N runs each, so
that the noise of a shared machine hits all of them alike; the table reports
medians and the ratios of medians.  See bench/README.rst.

    python3 bench/receive.py [--quick] [--runs N] [--cases 4k-20 1m-5 ...]
                             [--systems mailsys sink postfix] [--json FILE] [--keep]

Standard library only.  Needs smtp-source and smtp-sink (Debian's postfix
package) and, for the Postfix comparison point, root (../shared/anchors/postfix.sh).
Only 127.0.0.1 is ever contacted.
"""
import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANCHORS = os.path.normpath(os.path.join(REPO, "..", "shared", "anchors"))
POSTFIX_SH = os.path.join(ANCHORS, "postfix.sh")

KIB = 1024
MIB = 1024 * 1024

# name: (payload bytes, parallel sessions, messages, reuse connections, quick messages, meaning)
CASES = {
    "4k-20": (4 * KIB, 20, 5000, False, 1000,
              "4 KiB, 20 parallel sessions, a new connection per message (smtp-source's default)"),
    "4k-1": (4 * KIB, 1, 500, False, 200,
             "4 KiB, 1 session, a new connection per message: latency of one transaction"),
    "1m-5": (1 * MIB, 5, 200, False, 50,
             "1 MiB, 5 parallel sessions, a new connection per message: bulk data path"),
    "4k-20-reuse": (4 * KIB, 20, 3000, True, 1000,
                    "4 KiB, 20 parallel sessions, many messages per connection (smtp-source -d)"),
}
DEFAULT_CASES = ["4k-20", "4k-1", "1m-5", "4k-20-reuse"]
SYSTEMS = ["mailsys", "sink", "postfix"]
LABEL = {"mailsys": "mailsys", "sink": "smtp-sink", "postfix": "postfix"}

SENDER = "bench@example.org"
HELO = "client.example.org"
MAILSYS_RCPT = "postmaster@example.com"   # always accepted (RFC 5321 4.5.1), no account needed
POSTFIX_RCPT = "joe@example.com"          # the anchor's one mailbox
SINK_RCPT = "joe@example.com"


class BenchError(Exception):
    pass


def say(*args):
    print(*args, flush=True)


# -- machine facts --------------------------------------------------------------------------

def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _cmd_out(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts(workdir):
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = ""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            mem = line.split(":", 1)[1].strip()
            break
    try:
        import twisted
        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "not importable"
    fstype = ""
    best = ""
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and (workdir == parts[1] or workdir.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) >= len(best):
                best, fstype = parts[1], f"{parts[2]} on {parts[1]} ({parts[0]})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version() + " (" + sys.executable + ")",
        "twisted": twisted_version,
        "postfix": _cmd_out(["postconf", "-d", "-h", "mail_version"]) or "not found",
        "filesystem": fstype,
        "loadavg_start": _read("/proc/loadavg").strip(),
    }


# -- helpers --------------------------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=30.0, what="server"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def tree_cpu(pid):
    """CPU seconds (user+system) of a process and all its live descendants,
    including what their reaped children used (cutime/cstime): mailsys's worker
    processes, Postfix's smtpd processes that come and go during a run."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    fields = data.rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in _read(f"/proc/{pid}/task/{task}/children").split():
                total += tree_cpu(int(child)) or 0.0
    return total


def tail(path, n=30):
    lines = _read(path).splitlines()
    return "\n".join("    " + x for x in lines[-n:])


def stop_process(proc, timeout=30):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def smtp_source_argv(case, port, rcpt, messages=None):
    size, sessions, count, reuse, _, _ = CASES[case["name"]]
    argv = ["smtp-source"]
    if reuse:
        argv.append("-d")          # don't disconnect: next message over the same connection
    argv += ["-s", str(sessions), "-m", str(messages if messages is not None else case["messages"]),
             "-l", str(size), "-M", HELO, "-f", SENDER, "-t", rcpt, f"127.0.0.1:{port}"]
    return argv


def run_source(argv, timeout):
    """Run smtp-source; wall time from just before the fork to its exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish within {timeout:.0f}s: {shlex.join(argv)}")
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise BenchError(f"smtp-source exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return t0, elapsed, client_cpu


def source_timeout(case):
    return 60 + case["messages"] / 25 + case["messages"] * case["size"] / MIB / 2


# -- the systems ----------------------------------------------------------------------------

MAILSYS_CONFIG = """\
# written by bench/receive.py
[server]
hostname = "bench.example.com"
state_dir = "{state}"

[listen]
mta = ["tcp:{port}:interface=127.0.0.1"]
submission = []
submissions = []
lmtp = []
pop3 = []
pop3s = []

[tls]
certificate = "{base}/no-tls/fullchain.pem"
key = "{base}/no-tls/privkey.pem"

[domains]
local = ["example.com"]

[accounts]
users = "{base}/users"
aliases = "{base}/aliases"

[mailbox]
root = "{base}/mail"

[dns]
nameservers = ["127.0.0.1:1"]
"""



def derive_config(script, replacements):
    """MAILSYS_CONFIG with ``replacements`` (old, new) applied, for the other
    benchmarks: one configuration to keep current.  Every ``old`` must be there."""
    text = MAILSYS_CONFIG.replace("# written by bench/receive.py", f"# written by bench/{script}")
    for old, new in replacements:
        if old not in text:
            raise SystemExit(f"bench/receive.py's MAILSYS_CONFIG changed: {old!r} not found")
        text = text.replace(old, new)
    return text

# -- clearing between runs without deleting ---------------------------------------------------
#
# Deleting a file frees its inode.  On an ext4 file system without a journal
# (this machine's root: /sys/fs/ext4/<device>/journal_task reads "<none>"),
# ext4 avoids handing out an inode freed in the last minute (longer while its
# inode-table block is dirty), and finding a free inode for a new file walks
# past every such inode in the block group, one buffer lookup each
# (fs/ext4/ialloc.c: find_inode_bit, recently_deleted).  Deleting one run's
# 5,000 files just before the next run therefore made every file the next run
# created walk past 5,000 inodes: `perf record -a` of an end-to-end run put a
# quarter of the delivering process's CPU there, a cost of the benchmark's own
# cleanup, not of the system measured.  So nothing is deleted while a benchmark
# runs: files and directories are renamed into a "set-aside" directory (a
# rename frees no inode), which interleave() deletes when every run is over.

_aside = {"root": None, "n": 0}


def _aside_slot():
    os.makedirs(_aside["root"], exist_ok=True)
    _aside["n"] += 1
    return os.path.join(_aside["root"], str(_aside["n"]))


def set_aside(path):
    """Move ``path`` (a file or a directory tree) out of the way: renamed into
    the set-aside directory during interleave(), deleted outside it."""
    if _aside["root"] is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, _aside_slot())


def clear_dir(directory):
    """Empty ``directory`` (a Maildir's new/) the same way, entry by entry, so
    that the directory itself stays where a running server expects it."""
    entries = []
    with contextlib.suppress(FileNotFoundError):
        entries = list(os.scandir(directory))
    if not entries:
        return
    if _aside["root"] is None:
        for entry in entries:
            os.unlink(entry.path)
        return
    slot = _aside_slot()
    os.mkdir(slot)
    for entry in entries:
        os.rename(entry.path, os.path.join(slot, entry.name))


class Mailsys:
    """Our server, started by twistd with a fresh state directory for every run."""

    name = "mailsys"
    rcpt = MAILSYS_RCPT

    def __init__(self, workdir, keep):
        self.workdir = os.path.join(workdir, "mailsys")
        self.keep = keep
        self.proc = None
        self.port = None
        self.base = None
        self.log = None
        self.warmup = 0
        self.twistd = shutil.which("twistd")
        try:
            sys.path.insert(0, REPO)
            from mailsys.spool import read_spool
            self.read_spool = read_spool
        except Exception as e:   # noqa: BLE001 - any import problem is fatal for this system
            raise BenchError(f"cannot import mailsys.spool.read_spool from {REPO}: {e!r}")
        finally:
            if sys.path and sys.path[0] == REPO:
                sys.path.pop(0)

    def command(self, cfg):
        # PYTHONPATH makes the checkout's twisted/plugins and mailsys importable without
        # installing; twistd from PATH if there is one, else the same interpreter as this script.
        prefix = [self.twistd] if self.twistd else [sys.executable, "-c",
                                                    "from twisted.scripts.twistd import run; run()"]
        return prefix + ["-n", "--pidfile=", f"--logfile={self.log}", "mailsys", "--config", cfg]

    def start_case(self, case):
        pass

    def stop_case(self):
        self._stop()

    def start_run(self, case, run):
        self.warmup = 0
        self.base = os.path.join(self.workdir, case["name"], f"run{run}")
        set_aside(self.base)
        os.makedirs(self.base)
        for name in ("users", "aliases"):
            open(os.path.join(self.base, name), "w").close()
        self.port = free_port()
        cfg = os.path.join(self.base, "mailsys.toml")
        with open(cfg, "w") as f:
            f.write(MAILSYS_CONFIG.format(state=os.path.join(self.base, "state"), port=self.port,
                                          base=self.base))
        self.log = os.path.join(self.base, "mailsys.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.argv = self.command(cfg)
        out = open(os.path.join(self.base, "twistd.out"), "w")
        self.proc = subprocess.Popen(self.argv, cwd=self.base, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        try:
            wait_port(self.port, self.proc, what="mailsys (twistd)")
        except BenchError as e:
            raise BenchError(f"{e}\n  command: {shlex.join(self.argv)}\n  twistd output:\n"
                             f"{tail(os.path.join(self.base, 'twistd.out'))}\n  log:\n{tail(self.log)}")
        # Warm up (untimed): first connections, lazy imports, the first spool segment.
        self.warmup = 2 * case["sessions"]
        try:
            run_source(smtp_source_argv(case, self.port, self.rcpt, messages=self.warmup), 120)
        except BenchError as e:
            raise BenchError(f"warm-up failed: {e}\n  log:\n{tail(self.log)}")

    def cpu(self):
        return tree_cpu(self.proc.pid) if self.proc else None

    def _stop(self):
        stop_process(self.proc)
        self.proc = None

    def finish_run(self, case, result, expected):
        """Stop the server, then count what is durably in its spool."""
        expected += self.warmup
        alive = self.proc is not None and self.proc.poll() is None
        status = self.proc.returncode if self.proc is not None else None
        self._stop()
        log_lines = self.log_lines()
        if not alive:
            why = f"exit status {status}"
            if status is not None and status < 0:
                why = f"killed by signal {-status}"
            if any("Received SIGTERM" in line for line in log_lines):
                why += ("; its log says 'Received SIGTERM' although this benchmark had not sent one: "
                        "something else on the machine killed it")
            result["problems"].append(f"mailsys exited during the run ({why})")
        spool = os.path.join(self.base, "state", "spool")
        try:
            spooled = len(self.read_spool(spool))
        except Exception as e:   # noqa: BLE001
            spooled = -1
            result["problems"].append(f"read_spool({spool}) failed: {e!r}")
        result["spooled"] = spooled
        if spooled < expected:
            result["problems"].append(f"only {spooled} messages in the spool of {expected} that smtp-source "
                                      f"was told to send ({self.warmup} of them warm-up)")
        elif spooled > expected:
            result["problems"].append(f"{spooled} messages in the spool, but smtp-source sent only "
                                      f"{expected} ({self.warmup} of them warm-up)")
        errors = [line for line in log_lines
                  if "#error]" in line or "#critical]" in line or "#failure]" in line
                  or "Traceback" in line or "Unhandled" in line]
        warnings = [line for line in log_lines if "#warn]" in line]
        result["log_errors"] = len(errors)
        result["log_warnings"] = sorted(set(line.split("] ", 1)[-1] for line in warnings))[:10]
        if errors:
            result["problems"].append(f"{len(errors)} error lines in {self.log}*, first: "
                                      + " | ".join(errors[:3]))
        if result["problems"]:
            # the routine per-connection lines say nothing about a failure; show the rest
            notable = [line for line in log_lines if "[mailsys.smtpd#info]" not in line]
            result["log_tail"] = "\n".join("    " + line[:300] for line in notable[-25:])
        elif not self.keep:
            set_aside(self.base)

    def log_lines(self):
        """The run's log, twistd's rotated files (FILE.N, 1 MB each) included, oldest first."""
        d, name = os.path.split(self.log)
        rotated = []
        for f in os.listdir(d):
            if f.startswith(name + ".") and f[len(name) + 1:].isdigit():
                rotated.append((int(f[len(name) + 1:]), f))
        lines = []
        for _, f in sorted(rotated, reverse=True):
            lines.extend(_read(os.path.join(d, f)).splitlines())
        lines.extend(_read(self.log).splitlines())
        return lines


class Sink:
    """Postfix's smtp-sink: the protocol ceiling of a C server, no disk."""

    name = "sink"
    rcpt = SINK_RCPT

    def __init__(self, workdir, keep):
        self.proc = None
        self.port = None
        if not shutil.which("smtp-sink"):
            raise BenchError("smtp-sink not found (Debian package postfix)")

    def start_case(self, case):
        self.port = free_port()
        argv = ["smtp-sink"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"127.0.0.1:{self.port}", "1024"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        wait_port(self.port, self.proc, what="smtp-sink")

    def stop_case(self):
        stop_process(self.proc)
        self.proc = None

    def start_run(self, case, run):
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("smtp-sink is not running")

    def cpu(self):
        return tree_cpu(self.proc.pid) if self.proc else None

    def finish_run(self, case, result, expected):
        pass


class Postfix:
    """A stock Postfix from ../shared/anchors/postfix.sh: smtpd, queue, virtual -> Maildir."""

    name = "postfix"
    rcpt = POSTFIX_RCPT

    def __init__(self, workdir, keep, wait):
        if not os.path.exists(POSTFIX_SH):
            raise BenchError(f"{POSTFIX_SH} not found")
        if os.geteuid() != 0:
            raise BenchError("the Postfix anchor needs root")
        # A fixed directory: the anchor registers each base directory in
        # /etc/postfix/main.cf (alternate_config_directories), so do not invent new ones.
        self.base = os.path.join(os.path.dirname(workdir), "postfix")
        self.new = os.path.join(self.base, "vmail", "example.com", "joe", "new")
        self.keep = keep
        self.wait = wait
        self.port = None
        self.running = False

    def _anchor(self, *args):
        p = subprocess.run(["bash", POSTFIX_SH, *args], capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise BenchError(f"postfix.sh {' '.join(args)} failed: {(p.stderr or p.stdout).strip()}\n"
                             f"  maillog:\n{tail(os.path.join(self.base, 'maillog'))}")

    def start_case(self, case):
        self._anchor("stop", self.base)
        set_aside(self.base)
        self.port = free_port()
        self._anchor("start", self.base, str(self.port))
        self.running = True
        # Warm up: let master spawn its smtpd processes and deliver once before timing.
        argv = smtp_source_argv(case, self.port, self.rcpt, messages=2 * case["sessions"])
        run_source(argv, 120)
        self._wait_delivered(2 * case["sessions"], time.perf_counter(), self.wait)
        self._clear()

    def stop_case(self):
        if self.running:
            self._anchor("stop", self.base)
            self.running = False
        if not self.keep:
            set_aside(self.base)

    def _count(self):
        try:
            return sum(1 for _ in os.scandir(self.new))
        except FileNotFoundError:
            return 0

    def _clear(self):
        clear_dir(self.new)

    def _wait_delivered(self, n, t0, timeout):
        """Seconds from t0 until n files are in Maildir/new, or None after the bounded wait."""
        deadline = time.perf_counter() + timeout
        while True:
            got = self._count()
            now = time.perf_counter()
            if got >= n:
                return now - t0, got
            if now > deadline:
                return None, got
            time.sleep(0.01)

    def start_run(self, case, run):
        self._clear()

    def cpu(self):
        return None

    def finish_run(self, case, result, expected):
        e2e, got = self._wait_delivered(expected, result["t0"], self.wait)
        result["delivered"] = got
        if e2e is None:
            result["problems"].append(f"only {got} of {expected} messages in Maildir/new after "
                                      f"waiting {self.wait:.0f}s")
        else:
            result["e2e_seconds"] = e2e
            result["e2e_msgs_per_s"] = expected / e2e
        self._clear()


# -- running --------------------------------------------------------------------------------

def run_one(system, case, run):
    result = {"case": case["name"], "system": system.name, "run": run, "messages": case["messages"],
              "size": case["size"], "sessions": case["sessions"], "reuse": case["reuse"],
              "problems": []}
    try:
        system.start_run(case, run)
        argv = smtp_source_argv(case, system.port, system.rcpt)
        result["command"] = shlex.join(argv)
        cpu0 = system.cpu()
        t0, elapsed, client_cpu = run_source(argv, source_timeout(case))
        cpu1 = system.cpu()
        result.update(t0=t0, seconds=elapsed, msgs_per_s=case["messages"] / elapsed,
                      mb_per_s=case["messages"] * case["size"] / elapsed / 1e6,
                      client_cpu_s=client_cpu)
        if cpu0 is not None and cpu1 is not None:
            result["server_cpu_s"] = cpu1 - cpu0
    except BenchError as e:
        result["problems"].append(str(e))
    try:
        system.finish_run(case, result, case["messages"])
    except BenchError as e:
        result["problems"].append(str(e))
    result.pop("t0", None)
    result["ok"] = not result["problems"]
    line = f"  {case['name']:<12} run {run}  {LABEL[system.name]:<10}"
    if "msgs_per_s" in result:
        line += f" {result['msgs_per_s']:9.1f} msg/s {result['mb_per_s']:8.2f} MB/s ({result['seconds']:.2f}s)"
        if "server_cpu_s" in result:
            line += f"  server CPU {100 * result['server_cpu_s'] / result['seconds']:.0f}%"
        if "e2e_msgs_per_s" in result:
            line += f"  end to end {result['e2e_msgs_per_s']:.1f} msg/s ({result['e2e_seconds']:.2f}s)"
    say(line)
    if result["problems"]:
        say(f"  !!! FAILED: {LABEL[system.name]} {case['name']} run {run}:")
        for p in result["problems"]:
            say("  !!!   " + p.replace("\n", "\n  !!!   "))
        if result.get("log_tail"):
            say("  !!!   log tail:\n" + result["log_tail"])
    return result


def summarise(results, cases, systems):
    """Rows of the table: per case and system the medians, min and max, plus ratios."""
    rows, ratios = [], []
    for case in cases:
        med = {}
        for sysname in systems:
            for key, label in (("msgs_per_s", LABEL[sysname]),
                               ("e2e_msgs_per_s", "postfix end to end")):
                if key == "e2e_msgs_per_s" and sysname != "postfix":
                    continue
                ok = [r for r in results if r["case"] == case["name"] and r["system"] == sysname
                      and r["ok"] and key in r]
                failed = sum(1 for r in results if r["case"] == case["name"]
                             and r["system"] == sysname and not r["ok"])
                if key == "msgs_per_s" and sysname == "postfix":
                    label = "postfix receive"
                if not ok:
                    rows.append(dict(case=case["name"], system=label, n=0, failed=failed))
                    continue
                rates = [r[key] for r in ok]
                m = statistics.median(rates)
                med[label] = m
                row = dict(case=case["name"], system=label, n=len(ok), failed=failed,
                           median_msgs=m, median_mb=m * case["size"] / 1e6,
                           min_msgs=min(rates), max_msgs=max(rates))
                cpus = [100 * r["server_cpu_s"] / r["seconds"] for r in ok if "server_cpu_s" in r]
                if cpus:
                    row["server_cpu_pct"] = statistics.median(cpus)
                rows.append(row)
        ours = med.get("mailsys")
        ratio = dict(case=case["name"])
        for label, key in (("postfix receive", "mailsys/postfix receive"),
                           ("postfix end to end", "mailsys/postfix end to end"),
                           ("smtp-sink", "mailsys/smtp-sink")):
            if ours is not None and med.get(label):
                ratio[key] = ours / med[label]
        ratios.append(ratio)
    return rows, ratios


def format_table(rows, ratios):
    out = []
    head = f"{'case':<12} {'system':<19} {'median msg/s':>12} {'median MB/s':>11} {'min..max msg/s':>19} {'runs':>5} {'srv CPU':>7}"
    out.append(head)
    out.append("-" * len(head))
    for r in rows:
        runs = f"{r['n']}" + (f"+{r['failed']}F" if r["failed"] else "")
        if r["n"] == 0:
            out.append(f"{r['case']:<12} {r['system']:<19} {'FAILED':>12} {'':>11} {'':>19} {runs:>5}")
            continue
        cpu = f"{r['server_cpu_pct']:.0f}%" if "server_cpu_pct" in r else ""
        mm = f"{r['min_msgs']:.0f}..{r['max_msgs']:.0f}"
        out.append(f"{r['case']:<12} {r['system']:<19} {r['median_msgs']:>12.1f} {r['median_mb']:>11.2f} "
                   f"{mm:>19} {runs:>5} {cpu:>7}")
    out.append("")
    head = f"{'case':<12} {'mailsys/postfix receive':>24} {'mailsys/postfix end to end':>27} {'mailsys/smtp-sink':>18}"
    out.append(head)
    out.append("-" * len(head))
    for r in ratios:
        def f(k):
            return f"{r[k]:.2f}" if k in r else "-"
        out.append(f"{r['case']:<12} {f('mailsys/postfix receive'):>24} "
                   f"{f('mailsys/postfix end to end'):>27} {f('mailsys/smtp-sink'):>18}")
    return "\n".join(out)


def interleave(systems, cases, runs, measure, problems, *, workdir, keep, label=None, after=None):
    """The measuring loop every benchmark here shares: per case, start each
    system, then ``runs`` rounds of ``measure(system, case, run)`` with every
    system once per round (ABAB: the noise of a shared machine hits all alike),
    then ``after(live_systems, case, results)`` if given, then stop them.  A
    system that cannot start gets failed results and a line in ``problems``.
    ``workdir`` is removed at the end unless ``keep`` or a run failed; what
    the systems cleared between runs waits in ``workdir/set-aside`` until the
    end (see set_aside: deleting during the runs slows the next run).  SIGTERM
    stops cleanly.  Returns the list of results."""
    label = label or (lambda name: name)
    results = []
    _aside["root"] = os.path.join(workdir, "set-aside")
    old_term = signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    try:
        for case in cases:
            say(f"case {case['name']}: {case['meaning']}")
            live = []
            for s in systems:
                try:
                    s.start_case(case)
                    live.append(s)
                except BenchError as e:
                    problems.append(f"{s.name} {case['name']}: could not start: {e}")
                    say(f"  !!! FAILED: {label(s.name) or s.name} could not start for {case['name']}: {e}")
                    with contextlib.suppress(BenchError):
                        s.stop_case()
                    results.extend(dict(case=case["name"], system=s.name, run=run, ok=False,
                                        problems=[f"could not start: {e}"])
                                   for run in range(1, runs + 1))
            try:
                for run in range(1, runs + 1):
                    for s in live:       # ABAB: every system once per round
                        results.append(measure(s, case, run))
                if after is not None:
                    after(live, case, results)
            finally:
                for s in live:
                    try:
                        s.stop_case()
                    except BenchError as e:
                        say(f"  !!! {s.name}: stop failed: {e}")
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for s in systems:
            with contextlib.suppress(Exception):
                s.stop_case()
        shutil.rmtree(_aside["root"], ignore_errors=True)   # every run is over
        _aside["root"] = None
        if keep or any(not r["ok"] for r in results):
            say(f"\nkept {workdir} (state directories and logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases:\n" + "\n".join(
                                     f"  {k:<12} {v[5]} ({v[2]} messages; --quick {v[4]})"
                                     for k, v in CASES.items()))
    ap.add_argument("--quick", action="store_true",
                    help="1 run per system (unless --runs) and fewer messages: a smoke test, not a figure")
    ap.add_argument("--runs", type=int, default=None, help="runs per case and system (default 3, --quick 1)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None, metavar="CASE",
                    help="cases to run (default: %s)" % " ".join(DEFAULT_CASES))
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, metavar="SYSTEM",
                    help="systems to measure (default: mailsys sink postfix)")
    ap.add_argument("--messages", type=int, default=None, help="override the message count of every case")
    ap.add_argument("--postfix-wait", type=float, default=120.0,
                    help="seconds to wait for Postfix's deliveries after smtp-source ends (default 120)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mailsys-bench"),
                    help="scratch directory (default /tmp/mailsys-bench); one run at a time per directory")
    ap.add_argument("--keep", action="store_true", help="keep state dirs, logs and Maildirs")
    ap.add_argument("--json", metavar="FILE", help="write the raw results, facts and summary as JSON")
    args = ap.parse_args(argv)

    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        ap.error("--runs must be at least 1")
    case_names = args.cases or DEFAULT_CASES
    cases = []
    for name in case_names:
        size, sessions, messages, reuse, quick, meaning = CASES[name]
        if args.messages:
            messages = args.messages
        elif args.quick:
            messages = quick
        cases.append(dict(name=name, size=size, sessions=sessions, messages=messages, reuse=reuse,
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
    workdir = tempfile.mkdtemp(prefix="run-", dir=args.workdir)
    os.chmod(workdir, 0o755)

    command = shlex.join(["python3"] + sys.argv) if argv is None else shlex.join(["python3", "bench/receive.py"] + argv)
    facts = machine_facts(os.path.realpath(workdir))
    say("mailsys receive benchmark (issue 2)")
    say(f"command: {command}   (cwd {os.getcwd()})")
    for k in ("date", "nproc", "cpu", "memory", "kernel", "python", "twisted", "postfix", "filesystem"):
        say(f"  {k + ':':<12} {facts[k]}")
    say(f"  {'load:':<12} {facts['loadavg_start']} (1/5/15 min; others share this machine)")
    say(f"runs per system: {runs}, interleaved; work dir {workdir}")
    for c in cases:
        say(f"  {c['name']:<12} {c['messages']} messages of {c['size']} bytes: {c['meaning']}")
    say("")

    systems = []
    problems = []
    for name in args.systems:
        try:
            if name == "mailsys":
                systems.append(Mailsys(workdir, args.keep))
            elif name == "sink":
                systems.append(Sink(workdir, args.keep))
            else:
                systems.append(Postfix(workdir, args.keep, args.postfix_wait))
        except BenchError as e:
            problems.append(f"{name}: not measured: {e}")
            say(f"!!! {name}: not measured: {e}")

    started = time.monotonic()
    results = interleave(systems, cases, runs, run_one, problems, workdir=workdir, keep=args.keep,
                         label=LABEL.get)

    facts["loadavg_end"] = _read("/proc/loadavg").strip()
    facts["duration_s"] = round(time.monotonic() - started, 1)
    rows, ratios = summarise(results, cases, args.systems)
    say("")
    say(f"Results ({runs} run(s) per system, medians; MB = 10^6 bytes of payload; "
        f"took {facts['duration_s']:.0f}s; load at end {facts['loadavg_end']})")
    say(format_table(rows, ratios))
    failed = [r for r in results if not r["ok"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=command, facts=facts, cases=cases, runs=runs, results=results,
                           summary=rows, ratios=ratios, problems=problems), f, indent=2)
        say(f"\nraw results written to {args.json}")
    if failed or problems:
        say("")
        say("!" * 72)
        say(f"FAILED: {len(failed)} run(s) failed" + (f", {len(problems)} system problem(s)" if problems else ""))
        for p in problems:
            say("  " + p)
        for r in failed:
            say(f"  {r['case']} {LABEL.get(r['system'], r['system'])} run {r['run']}: "
                + "; ".join(p.splitlines()[0] for p in r["problems"]))
        say("!" * 72)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
