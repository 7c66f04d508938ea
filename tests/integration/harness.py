"""Real processes on loopback for the integration tests.

:class:`MailsysServer` runs ``twistd -n mailsys --config CFG`` as a child process
with a configuration written under a temporary directory: every listener on
127.0.0.1 only, every other role disabled, DNS pointed at a loopback port, state,
accounts and mailboxes private to the test.  :class:`PostfixPeer` runs a stock
Postfix as an alternate instance on loopback, as the "ISP" that relays to us.

Nothing here contacts an address outside 127.0.0.0/8.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

# twistd of the Python running the tests (not whatever "twistd" is first on PATH).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; "
          "from twisted.scripts.twistd import run; run()"]


class HarnessError(AssertionError):
    """A process of the test set-up misbehaved; the message carries its log tail."""


def _ephemeral_range():
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(kind=socket.SOCK_STREAM):
    """A port on 127.0.0.1 that nothing is bound to right now.

    Chosen below the kernel's ephemeral range: a restarted server gets its port
    back even if the machine opened many client connections meanwhile, and a client
    connecting while the server is down can never be handed the server's own port
    as its source port (a TCP self-connection).
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise HarnessError("no free port on 127.0.0.1 below the ephemeral range")


def port_accepts(port, timeout=1.0):
    try:
        socket.create_connection((LOOPBACK, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def tail(path, lines=40):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def child_env():
    """The environment for our child processes: this checkout first on sys.path."""
    env = dict(os.environ)
    env.pop("MAILSYS_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- TOML for the test configuration ----------------------------------------------

def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value), ensure_ascii=False)   # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(config):
    out = []
    for section, keys in config.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        out.append("")
    return "\n".join(out)


def merge(base, overrides):
    """Section-wise merge; a value of None removes the key (the server's default applies)."""
    merged = {section: dict(keys) for section, keys in base.items()}
    for section, keys in (overrides or {}).items():
        target = merged.setdefault(section, {})
        for key, value in keys.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return merged


# --- mailsys ------------------------------------------------------------------------

HOSTNAME = "mx.mailsys.test"
LOCAL_DOMAINS = ("example.com", "example.net")


class MailsysServer:
    """One ``twistd -n mailsys`` child process and its private state directory.

    ``start()`` after ``stop()`` or ``kill9()`` restarts on the same state and
    port, which is what the crash test needs.
    """

    def __init__(self, base, overrides=None, users_text=None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dns_port = free_port(socket.SOCK_DGRAM)   # nothing answers there: no query leaves
        self.state_dir = self.base / "state"
        self.users_path = self.base / "users"
        self.aliases_path = self.base / "aliases"
        self.config_path = self.base / "mailsys.toml"
        self.log_path = self.base / "twistd.log"
        self.output_path = self.base / "twistd.out"
        self.config = merge({
            "server": {"hostname": HOSTNAME, "state_dir": self.state_dir},
            "listen": {"mta": [f"tcp:{self.port}:interface={LOOPBACK}"], "submission": [],
                       "submissions": [], "lmtp": [], "pop3": [], "pop3s": []},
            "tls": {"certificate": self.base / "tls" / "fullchain.pem",
                    "key": self.base / "tls" / "privkey.pem"},
            "domains": {"local": list(LOCAL_DOMAINS)},
            "accounts": {"users": self.users_path, "aliases": self.aliases_path},
            "mailbox": {"root": self.base / "mail"},
            "dns": {"nameservers": [f"{LOOPBACK}:{self.dns_port}"], "timeout": 1},
        }, overrides)
        self.config_path.write_text(to_toml(self.config))
        if users_text is not None:
            self.users_path.write_text(users_text)
            self.users_path.chmod(0o600)
        if not self.aliases_path.exists():
            self.aliases_path.write_text("# no aliases\n")
        self.proc = None
        self.starts = 0
        self._log_offset = 0

    # -- the process ---------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        """Start twistd and return once it logged its start and the port accepts."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("mailsys is already running")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.output_path, "ab")
        try:
            self.proc = subprocess.Popen(
                TWISTD + ["-n", "--pidfile=", f"--logfile={self.log_path}", "mailsys",
                          "--config", str(self.config_path)],
                cwd=self.base, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"twistd exited with status {self.proc.returncode} while "
                                   f"starting\n{self._tails()}")
            if "mailsys started" in self.log_since_start() and port_accepts(self.port):
                # The probe connection is logged too; let its lines be written before
                # a test's own connection, so sessions never interleave in the log.
                while "] disconnect from " not in self.log_since_start():
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise HarnessError(f"mailsys never logged the end of the start-up probe "
                                           f"connection\n{self._tails()}")
                    time.sleep(0.02)
                return self
            if time.monotonic() > deadline:
                self.kill9()
                raise HarnessError(f"mailsys did not accept on 127.0.0.1:{self.port} within "
                                   f"{timeout:.0f} s\n{self._tails()}")
            time.sleep(0.05)

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM and wait; returns twistd's exit status (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise HarnessError(f"mailsys ignored SIGTERM for {timeout:.0f} s\n{self._tails()}")

    def kill9(self):
        """SIGKILL: the crash the spool must survive."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self):
        if self.running:
            try:
                self.stop()
            except HarnessError:
                pass
        self.kill9()

    # -- what it left ----------------------------------------------------------------

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_since_start(self):
        """The log written since the last ``start()``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern, timeout=10.0):
        """The first match of regex ``pattern`` in the log, waiting for it to appear."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise HarnessError(f"no log line matching {pattern!r} within {timeout:.0f} s\n"
                                   f"{self._tails()}")
            time.sleep(0.05)

    def spool(self):
        from mailsys.spool import read_spool

        return read_spool(os.path.join(self.state_dir, "spool"))

    def wait_for_spool(self, count, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            entries = self.spool()
            if len(entries) >= count:
                return entries
            if time.monotonic() > deadline:
                raise HarnessError(f"{len(entries)} messages in the spool after {timeout:.0f} s, "
                                   f"expected {count}\n{self._tails()}")
            time.sleep(0.1)

    def _tails(self):
        return (f"--- {self.log_path} (last lines)\n{tail(self.log_path)}\n"
                f"--- {self.output_path}\n{tail(self.output_path, 20)}")

    # -- clients -----------------------------------------------------------------------

    def smtp(self, helo="client.example.org", timeout=30):
        """A connected smtplib client after EHLO."""
        client = smtplib.SMTP(LOOPBACK, self.port, local_hostname=helo, timeout=timeout)
        client.ehlo(helo)
        return client

    def mailsys_cli(self, *argv, input=None, timeout=120):
        """``python -m mailsys ARGV --config CFG`` against this server's configuration."""
        return subprocess.run([sys.executable, "-m", "mailsys", *argv, "--config",
                               str(self.config_path)], input=input, capture_output=True,
                              text=True, env=child_env(), cwd=self.base, timeout=timeout)


def split_received(message):
    """``(first header field with its folded lines, the rest)`` of a message's bytes."""
    end = 0
    while True:
        nl = message.index(b"\r\n", end) + 2
        end = nl
        if message[end:end + 1] not in (b" ", b"\t"):
            return message[:end], message[end:]


def received_fields(message):
    """Every Received header field of the header section, unfolded, in order."""
    head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields = re.split(r"\r\n(?![ \t])", head)
    return [re.sub(r"\r\n[ \t]+", " ", f) for f in fields if f.lower().startswith("received:")]


# --- Postfix -----------------------------------------------------------------------

def find_program(name):
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    return found


POSTFIX_MAIN_CF = "/etc/postfix/main.cf"

# Our own master.cf: only the services an SMTP-in, SMTP-out relay uses.  No chroot,
# since the instance lives in a temporary directory without the chroot's files.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixPeer:
    """A stock Postfix on 127.0.0.1:PORT that relays everything it gets to ``relayhost``.

    It is an alternate instance (``postfix -c DIR``) with its queue, data and log
    under ``base``; Postfix insists that the default main.cf names such a
    directory in ``alternate_config_directories``, so the peer adds itself there
    while it runs and removes itself when stopped.
    """

    HOSTNAME = "isp.postfix.test"

    def __init__(self, base, relayhost):
        self.postfix = find_program("postfix")
        self.postconf = find_program("postconf")
        if not self.postfix or not self.postconf:
            raise HarnessError("Postfix is not installed (no postfix/postconf program); the "
                               "integration tests need the Debian package: run `bash .ci/test-all`, "
                               "which installs it")
        if os.geteuid() != 0:
            raise HarnessError("the Postfix peer needs root (it registers an alternate "
                               "configuration directory in /etc/postfix/main.cf and its daemons "
                               "drop to the postfix user); run the tests as root")
        self.base = Path(base)
        self.etc = self.base / "etc"
        self.queue = self.base / "spool"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        self.port = free_port()
        self.relayhost = relayhost
        self._chmodded = []
        self._registered = False

    def _run(self, *argv, check=True, timeout=120):
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode:
            raise HarnessError(f"{' '.join(argv)} exited {p.returncode}\n{p.stdout}{p.stderr}\n"
                               f"--- {self.maillog}\n{tail(self.maillog)}")
        return p

    def write_config(self):
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, user="postfix")
        # Postfix daemons run as the postfix user: every directory above ours must be
        # traversable.  Only the search bit is added; stop() puts the modes back.
        d = self.base
        while True:
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                self._chmodded.append((d, stat.S_IMODE(mode)))
                d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            if d.parent == d:
                break
            d = d.parent
        (self.etc / "master.cf").write_text(_MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}"))
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-mailsys-test",
            "myhostname": self.HOSTNAME,
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "relayhost": self.relayhost,
            # Nothing leaves loopback: no DNS at all, no reverse lookups of clients.
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "default_process_limit": "10",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.base,
            "biff": "no",
        }
        (self.etc / "main.cf").write_text(
            "".join(f"{k} = {os.fspath(v)}\n" for k, v in main.items()))

    # -- alternate_config_directories in the default main.cf ------------------------

    def _edit_default_main_cf(self, add):
        path = Path(POSTFIX_MAIN_CF)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()
        me = str(self.etc)
        for i, line in enumerate(lines):
            if re.match(r"alternate_config_directories\s*=", line):
                name, _, value = line.partition("=")
                dirs = [d for d in re.split(r"[\s,]+", value) if d and d != me]
                if add:
                    dirs.append(me)
                lines[i] = f"{name.rstrip()} = {' '.join(dirs)}".rstrip()
                break
        else:
            if not add:
                return
            lines.append(f"alternate_config_directories = {me}")
        tmp = path.with_name(f".{path.name}.mailsys-test")
        tmp.write_text("\n".join(lines) + "\n")
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
        self._registered = add

    # -- the instance -----------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        self.write_config()
        self._edit_default_main_cf(add=True)
        self._run(self.postfix, "-c", str(self.etc), "start")
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if time.monotonic() > deadline:
                raise HarnessError(f"Postfix does not accept on 127.0.0.1:{self.port}\n"
                                   f"--- {self.maillog}\n{tail(self.maillog)}")
            time.sleep(0.1)
        return self

    def master_pid(self):
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        try:
            pid = self.master_pid()
            if self.etc.exists():
                self._run(self.postfix, "-c", str(self.etc), "stop", check=False)
            if pid is not None:
                deadline = time.monotonic() + STOP_TIMEOUT
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        finally:
            if self._registered:
                self._edit_default_main_cf(add=False)
            for d, mode in reversed(self._chmodded):
                try:
                    d.chmod(mode)
                except OSError:
                    pass
            self._chmodded = []

    def log_text(self):
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern, timeout=60.0):
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise HarnessError(f"no Postfix log line matching {pattern!r} within "
                                   f"{timeout:.0f} s\n--- {self.maillog}\n{tail(self.maillog)}")
            time.sleep(0.1)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours would look alive; Postfix's master is not our child.
    return True
