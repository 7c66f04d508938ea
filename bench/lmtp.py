#!/usr/bin/env python3
"""LMTP delivery benchmark (issue 4): smtp-source -L into mailsys's MDA and Dovecot's LMTP.

Both systems deliver into a Maildir (``ROOT/example.com/joe/Maildir/new``) with
their durability on (mailsys: fsync/syncfs before every 250; Dovecot: its default
``mail_fsync = optimized``, as ../shared/anchors/dovecot.sh configures it), driven
by Postfix's ``smtp-source -L`` over TCP on 127.0.0.1.  Every case runs against
both systems in the same invocation, interleaved (mailsys, dovecot, mailsys,
dovecot, ...), N runs each; a run is complete when smtp-source has exited AND
``new/`` holds every message (counted on disk); the table reports medians and the
ratio mailsys/dovecot of the medians.  See bench/README.rst.

    python3 bench/lmtp.py [--quick] [--runs N] [--cases 4k-20 1m-5] [--systems mailsys dovecot]
                          [--messages N] [--json FILE] [--keep]

Standard library only (the helpers are bench/receive.py's).  Needs smtp-source
(Debian's postfix package), and for the Dovecot comparison point root and
Debian's dovecot-lmtpd/-imapd/-pop3d (../shared/anchors/dovecot.sh, called by
path).  Only 127.0.0.1 is ever contacted.
"""
import argparse
import fcntl
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import receive as rb  # noqa: E402  (bench/receive.py: machine facts, smtp-source runner, ...)

sys.path.pop(0)

REPO = rb.REPO
DOVECOT_SH = os.path.join(rb.ANCHORS, "dovecot.sh")
KIB, MIB = rb.KIB, rb.MIB

# name: (payload bytes, parallel sessions, messages, quick messages, meaning)
CASES = {
    "4k-20": (4 * KIB, 20, 5000, 1000,
              "4 KiB, 20 parallel LMTP sessions, a new connection per message"),
    "1m-5": (1 * MIB, 5, 200, 50,
             "1 MiB, 5 parallel LMTP sessions, a new connection per message: bulk data path"),
}
DEFAULT_CASES = ["4k-20", "1m-5"]
SYSTEMS = ["mailsys", "dovecot"]
SENDER = "bench@example.org"
RCPT = "joe@example.com"
HELO = "client.example.org"
say = rb.say
BenchError = rb.BenchError


def source_argv(case, port, messages=None):
    return ["smtp-source", "-L", "-s", str(case["sessions"]),
            "-m", str(messages if messages is not None else case["messages"]),
            "-l", str(case["size"]), "-M", HELO, "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]


def count(directory):
    try:
        return sum(1 for _ in os.scandir(directory))
    except FileNotFoundError:
        return 0


def clear(directory):
    rb.clear_dir(directory)      # renamed aside, deleted when the benchmark ends


def wait_files(directory, n, timeout):
    """perf_counter() when ``directory`` first holds ``n`` entries, or None (bounded)."""
    deadline = time.perf_counter() + timeout
    while True:
        got = count(directory)
        if got >= n:
            return time.perf_counter(), got
        if time.perf_counter() > deadline:
            return None, got
        time.sleep(0.005)


# bench/receive.py's configuration with only the LMTP role, on TCP.
MAILSYS_CONFIG = rb.derive_config("lmtp.py", (
    ('mta = ["tcp:{port}:interface=127.0.0.1"]', "mta = []"),
    ("lmtp = []", 'lmtp = ["tcp:{port}:interface=127.0.0.1"]')))


class Mailsys:
    """twistd -n mailsys with only the LMTP role, on TCP; one account (joe, Maildir)."""

    name = "mailsys"

    def __init__(self, workdir, keep):
        self.workdir = os.path.join(workdir, "mailsys")
        self.keep = keep
        self.proc = self.port = self.base = self.log = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = REPO + (os.pathsep + self.env["PYTHONPATH"]
                                         if self.env.get("PYTHONPATH") else "")
        self.env.pop("MAILSYS_CONFIG", None)
        self.twistd = shutil.which("twistd")
        # The account, made once by the real CLI (Argon2id hashing is slow).
        self.users = self._make_users()

    def _make_users(self):
        base = os.path.join(self.workdir, "accounts")
        os.makedirs(base, exist_ok=True)
        cfg = os.path.join(base, "mailsys.toml")
        with open(cfg, "w") as f:
            f.write(MAILSYS_CONFIG.format(state=os.path.join(base, "state"), port=1, base=base))
        open(os.path.join(base, "aliases"), "w").close()
        p = subprocess.run([sys.executable, "-m", "mailsys", "user", "add", RCPT, "--password-stdin",
                            "--config", cfg], input="bench password\n", capture_output=True, text=True,
                           env=self.env, cwd=base, timeout=120)
        if p.returncode != 0:
            raise BenchError(f"mailsys user add {RCPT} failed ({p.returncode}): {p.stderr or p.stdout}")
        return rb._read(os.path.join(base, "users"))

    def new_dir(self):
        return os.path.join(self.base, "mail", "example.com", "joe", "Maildir", "new")

    def start_case(self, case):
        self.base = os.path.join(self.workdir, case["name"])
        rb.set_aside(self.base)
        os.makedirs(self.base)
        with open(os.path.join(self.base, "users"), "w") as f:
            f.write(self.users)
        os.chmod(os.path.join(self.base, "users"), 0o600)
        open(os.path.join(self.base, "aliases"), "w").close()
        self.port = rb.free_port()
        cfg = os.path.join(self.base, "mailsys.toml")
        with open(cfg, "w") as f:
            f.write(MAILSYS_CONFIG.format(state=os.path.join(self.base, "state"), port=self.port,
                                          base=self.base))
        self.log = os.path.join(self.base, "mailsys.log")
        prefix = [self.twistd] if self.twistd else [sys.executable, "-c",
                                                    "from twisted.scripts.twistd import run; run()"]
        self.argv = prefix + ["-n", "--pidfile=", f"--logfile={self.log}", "mailsys", "--config", cfg]
        out = open(os.path.join(self.base, "twistd.out"), "w")
        self.proc = subprocess.Popen(self.argv, cwd=self.base, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        try:
            rb.wait_port(self.port, self.proc, what="mailsys (twistd)")
            warm = 2 * case["sessions"]
            rb.run_source(source_argv(case, self.port, warm), 120)
            if wait_files(self.new_dir(), warm, 30)[0] is None:
                raise BenchError(f"warm-up: {count(self.new_dir())} of {warm} messages in new/")
        except BenchError as e:
            raise BenchError(f"{e}\n  command: {shlex.join(self.argv)}\n  log:\n{rb.tail(self.log)}")
        clear(self.new_dir())

    def start_run(self, case, run):
        clear(self.new_dir())
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("mailsys is not running")

    def cpu(self):
        return rb.tree_cpu(self.proc.pid) if self.proc else None

    def finish_run(self, case, result):
        if self.proc.poll() is not None:
            result["problems"].append(f"mailsys exited during the run (status {self.proc.returncode})")
        errors = [line for line in self.log_lines()
                  if "#error]" in line or "#critical]" in line or "Traceback" in line]
        if errors:
            result["problems"].append(f"{len(errors)} error lines in {self.log}, first: {errors[0]}")

    def log_lines(self):
        d, name = os.path.split(self.log)
        files = sorted((f for f in os.listdir(d) if f.startswith(name)),
                       key=lambda f: -int(f.rsplit(".", 1)[1]) if f[len(name):].lstrip(".").isdigit() else 0)
        return [line for f in files for line in rb._read(os.path.join(d, f)).splitlines()]

    def stop_case(self):
        rb.stop_process(self.proc)
        self.proc = None
        if not self.keep and self.base:
            rb.set_aside(self.base)


class Dovecot:
    """Dovecot's LMTP from ../shared/anchors/dovecot.sh (called by path, never copied)."""

    name = "dovecot"

    def __init__(self, workdir, keep):
        if not os.path.exists(DOVECOT_SH):
            raise BenchError(f"{DOVECOT_SH} not found")
        if os.geteuid() != 0:
            raise BenchError("the Dovecot anchor needs root")
        if not shutil.which("dovecot"):
            raise BenchError("dovecot not installed (Debian: dovecot-lmtpd dovecot-imapd dovecot-pop3d)")
        self.base = os.path.join(workdir, "dovecot")
        self.root = os.path.join(workdir, "dovecot-mail")
        self.keep = keep
        self.port = None
        self.running = False

    def new_dir(self):
        return os.path.join(self.root, "example.com", "joe", "Maildir", "new")

    def _anchor(self, *args):
        # Dovecot's master daemonizes and keeps its output open: to a file, not a pipe.
        out_path = os.path.join(os.path.dirname(self.base), "dovecot.sh.out")
        with open(out_path, "a") as out:
            try:
                p = subprocess.run(["bash", DOVECOT_SH, *args], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=120)
            except subprocess.TimeoutExpired:
                raise BenchError(f"dovecot.sh {' '.join(args)} did not finish within 120 s")
        if p.returncode != 0:
            raise BenchError(f"dovecot.sh {' '.join(args)} failed: {rb.tail(out_path, 5).strip()}\n"
                             f"  log:\n{rb.tail(os.path.join(self.base, 'dovecot.log'))}")

    def start_case(self, case):
        self._anchor("stop", self.base)
        rb.set_aside(self.base)
        rb.set_aside(self.root)
        os.makedirs(self.root)
        self.port = rb.free_port()
        self.running = True            # from here on, stop_case() must stop it
        self._anchor("start", self.base, self.root, str(self.port), str(rb.free_port()),
                     str(rb.free_port()))
        warm = 2 * case["sessions"]
        rb.run_source(source_argv(case, self.port, warm), 120)
        if wait_files(self.new_dir(), warm, 30)[0] is None:
            raise BenchError(f"warm-up: {count(self.new_dir())} of {warm} messages in new/")
        clear(self.new_dir())

    def start_run(self, case, run):
        clear(self.new_dir())

    def cpu(self):
        return None

    def finish_run(self, case, result):
        log = rb._read(os.path.join(self.base, "dovecot.log"))
        errors = [line for line in log.splitlines() if "Error:" in line or "Fatal:" in line]
        if errors:
            result["problems"].append(f"{len(errors)} error lines in dovecot.log, first: {errors[0]}")

    def stop_case(self):
        if self.running:
            self._anchor("stop", self.base)
            self.running = False
        if not self.keep:
            rb.set_aside(self.base)
            rb.set_aside(self.root)


def run_one(system, case, run, wait):
    result = {"case": case["name"], "system": system.name, "run": run, "messages": case["messages"],
              "size": case["size"], "sessions": case["sessions"], "problems": []}
    try:
        system.start_run(case, run)
        argv = source_argv(case, system.port)
        result["command"] = shlex.join(argv)
        cpu0 = system.cpu()
        t0, elapsed, client_cpu = rb.run_source(argv, rb.source_timeout(case))
        done, got = wait_files(system.new_dir(), case["messages"], wait)
        cpu1 = system.cpu()
        result["delivered"] = count(system.new_dir())
        if done is None:
            result["problems"].append(f"only {got} of {case['messages']} messages in new/ "
                                      f"{wait:.0f}s after smtp-source ended")
        else:
            seconds = max(elapsed, done - t0)
            result.update(seconds=seconds, source_seconds=elapsed, client_cpu_s=client_cpu,
                          msgs_per_s=case["messages"] / seconds,
                          mb_per_s=case["messages"] * case["size"] / seconds / 1e6)
            if result["delivered"] != case["messages"]:
                result["problems"].append(f"{result['delivered']} files in new/, "
                                          f"{case['messages']} messages sent")
            if cpu0 is not None and cpu1 is not None:
                result["server_cpu_s"] = cpu1 - cpu0
    except BenchError as e:
        result["problems"].append(str(e))
    try:
        system.finish_run(case, result)
    except BenchError as e:
        result["problems"].append(str(e))
    result["ok"] = not result["problems"]
    line = f"  {case['name']:<6} run {run}  {system.name:<8}"
    if "msgs_per_s" in result:
        line += (f" {result['msgs_per_s']:9.1f} msg/s {result['mb_per_s']:8.2f} MB/s "
                 f"({result['seconds']:.2f}s)")
        if "server_cpu_s" in result:
            line += f"  server CPU {100 * result['server_cpu_s'] / result['seconds']:.0f}%"
    say(line)
    for p in result["problems"]:
        say(f"  !!! FAILED: {system.name} {case['name']} run {run}: " + p.replace("\n", "\n  !!!   "))
    return result


def summarise(results, cases, systems):
    rows, ratios = [], []
    for case in cases:
        med = {}
        for name in systems:
            ok = [r for r in results if r["case"] == case["name"] and r["system"] == name and r["ok"]]
            failed = sum(1 for r in results if r["case"] == case["name"] and r["system"] == name
                         and not r["ok"])
            if not ok:
                rows.append(dict(case=case["name"], system=name, n=0, failed=failed))
                continue
            rates = [r["msgs_per_s"] for r in ok]
            med[name] = statistics.median(rates)
            row = dict(case=case["name"], system=name, n=len(ok), failed=failed,
                       median_msgs=med[name], median_mb=med[name] * case["size"] / 1e6,
                       min_msgs=min(rates), max_msgs=max(rates))
            cpus = [100 * r["server_cpu_s"] / r["seconds"] for r in ok if "server_cpu_s" in r]
            if cpus:
                row["server_cpu_pct"] = statistics.median(cpus)
            rows.append(row)
        ratio = dict(case=case["name"])
        if med.get("mailsys") and med.get("dovecot"):
            ratio["mailsys/dovecot"] = med["mailsys"] / med["dovecot"]
            ratio["per_run"] = [round(a["msgs_per_s"] / b["msgs_per_s"], 2) for a, b in zip(
                [r for r in results if r["case"] == case["name"] and r["system"] == "mailsys" and r["ok"]],
                [r for r in results if r["case"] == case["name"] and r["system"] == "dovecot" and r["ok"]])]
        ratios.append(ratio)
    return rows, ratios


def format_table(rows, ratios):
    out = []
    head = (f"{'case':<6} {'system':<8} {'median msg/s':>12} {'median MB/s':>11} "
            f"{'min..max msg/s':>15} {'runs':>5} {'srv CPU':>7}")
    out += [head, "-" * len(head)]
    for r in rows:
        runs = f"{r['n']}" + (f"+{r['failed']}F" if r["failed"] else "")
        if r["n"] == 0:
            out.append(f"{r['case']:<6} {r['system']:<8} {'FAILED':>12} {'':>11} {'':>15} {runs:>5}")
            continue
        cpu = f"{r['server_cpu_pct']:.0f}%" if "server_cpu_pct" in r else ""
        mm = f"{r['min_msgs']:.0f}..{r['max_msgs']:.0f}"
        out.append(f"{r['case']:<6} {r['system']:<8} {r['median_msgs']:>12.1f} {r['median_mb']:>11.2f} "
                   f"{mm:>15} {runs:>5} {cpu:>7}")
    out.append("")
    head = f"{'case':<6} {'mailsys/dovecot (medians)':>26}  per run (same round)   target 1.5"
    out += [head, "-" * len(head)]
    for r in ratios:
        if "mailsys/dovecot" in r:
            verdict = "met" if r["mailsys/dovecot"] >= 1.5 else "NOT met"
            out.append(f"{r['case']:<6} {r['mailsys/dovecot']:>26.2f}  "
                       f"{' '.join(f'{x:.2f}' for x in r['per_run']):<22} {verdict}")
        else:
            out.append(f"{r['case']:<6} {'-':>26}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases:\n" + "\n".join(
                                     f"  {k:<6} {v[4]} ({v[2]} messages; --quick {v[3]})"
                                     for k, v in CASES.items()))
    ap.add_argument("--quick", action="store_true", help="1 run and fewer messages: a smoke test")
    ap.add_argument("--runs", type=int, default=None, help="runs per case and system (default 3, --quick 1)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None, metavar="CASE")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, metavar="SYSTEM")
    ap.add_argument("--messages", type=int, default=None, help="override every case's message count")
    ap.add_argument("--wait", type=float, default=120.0,
                    help="bounded wait for new/ to fill after smtp-source ends (default 120 s)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mailsys-bench"))
    ap.add_argument("--keep", action="store_true", help="keep state directories, logs and Maildirs")
    ap.add_argument("--json", metavar="FILE", help="write raw results, machine facts and summary as JSON")
    args = ap.parse_args(argv)

    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        ap.error("--runs must be at least 1")
    cases = []
    for name in args.cases or DEFAULT_CASES:
        size, sessions, messages, quick, meaning = CASES[name]
        messages = args.messages or (quick if args.quick else messages)
        cases.append(dict(name=name, size=size, sessions=sessions, messages=messages, meaning=meaning))
    if not shutil.which("smtp-source"):
        sys.exit("smtp-source not found: install Debian's postfix package")

    os.makedirs(args.workdir, exist_ok=True)
    lock = open(os.path.join(args.workdir, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"another benchmark holds {args.workdir}/lock; waiting for it to finish ...")
        fcntl.flock(lock, fcntl.LOCK_EX)
    workdir = tempfile.mkdtemp(prefix="lmtp-", dir=args.workdir)
    os.chmod(workdir, 0o755)     # Dovecot's mail uid must reach the Maildirs below

    command = shlex.join(["python3", "bench/lmtp.py"] + (sys.argv[1:] if argv is None else list(argv)))
    facts = rb.machine_facts(os.path.realpath(workdir))
    facts["dovecot"] = rb._cmd_out(["dovecot", "--version"]) or "not found"
    say("mailsys LMTP delivery benchmark (issue 4)")
    say(f"command: {command}   (cwd {os.getcwd()})")
    for k in ("date", "nproc", "cpu", "memory", "kernel", "python", "twisted", "dovecot", "filesystem"):
        say(f"  {k + ':':<12} {facts[k]}")
    say(f"  {'load:':<12} {facts['loadavg_start']} (1/5/15 min; others share this machine)")
    say(f"runs per system: {runs}, interleaved; work dir {workdir}")
    for c in cases:
        say(f"  {c['name']:<6} {c['messages']} messages of {c['size']} bytes: {c['meaning']}")
    say("")

    systems, problems = [], []
    for name in args.systems:
        try:
            systems.append(Mailsys(workdir, args.keep) if name == "mailsys" else Dovecot(workdir, args.keep))
        except BenchError as e:
            problems.append(f"{name}: not measured: {e}")
            say(f"!!! {name}: not measured: {e}")

    started = time.monotonic()
    results = rb.interleave(systems, cases, runs, lambda s, case, run: run_one(s, case, run, args.wait),
                            problems, workdir=workdir, keep=args.keep)

    facts["loadavg_end"] = rb._read("/proc/loadavg").strip()
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
        say("\nFAILED: " + "; ".join(problems + [f"{r['case']} {r['system']} run {r['run']}: "
                                                 f"{r['problems'][0].splitlines()[0]}" for r in failed]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
