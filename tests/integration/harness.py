"""Real processes on loopback for the integration tests.

:class:`MailsysServer` runs ``twistd -n mailsys --config CFG`` as a child process
with a configuration written under a temporary directory: every listener on
127.0.0.1 only, every other role disabled, DNS pointed at a loopback port, state,
accounts and mailboxes private to the test.  :class:`PostfixPeer` runs a stock
Postfix as an alternate instance on loopback, as the "ISP" that relays to us.

For the MDA (issue 4): :func:`start_mda` starts mailsys with its LMTP listener (unix
socket and/or TCP) and accounts made by the CLI, :class:`LMTPClient` speaks LMTP with
one reply per recipient, :class:`DovecotPeer` runs a stock Dovecot (IMAP) over the
mailbox root, and :class:`PostfixLMTPPeer` is the Postfix peer with
``virtual_transport = lmtp:...`` pointed at us.

Nothing here contacts an address outside 127.0.0.0/8.
"""
from __future__ import annotations

import imaplib
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
import tempfile
import threading
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


def read_log(path):
    """A log file's text so far ("" before it exists)."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_match(read, pattern, timeout, describe, interval=0.05):
    """The first match of regex ``pattern`` in ``read()``, polled until ``timeout``;
    on failure a HarnessError with ``describe()`` (log tails) appended."""
    rx = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while True:
        m = rx.search(read())
        if m:
            return m
        if time.monotonic() > deadline:
            raise HarnessError(f"no log line matching {pattern!r} within {timeout:.0f} s\n"
                               f"{describe()}")
        time.sleep(interval)


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
        self._log_inode = None

    # -- the process ---------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        """Start twistd and return once it logged its start and the port accepts."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("mailsys is already running")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_inode = self.log_path.stat().st_ino if self.log_path.exists() else None
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
        return read_log(self.log_path)

    def log_since_start(self):
        """The log written since the last ``start()``.

        twistd rotates its log at 1 MB (FILE -> FILE.1 -> FILE.2 ...): when it
        has since ``start()``, the start is in an older file (found by inode) and
        every newer one is read whole."""
        files = [str(self.log_path)] + [f"{self.log_path}.{n}" for n in range(1, 10)]
        inodes = []
        for name in files:
            try:
                inodes.append(os.stat(name).st_ino)
            except FileNotFoundError:
                break
        if not inodes:
            return ""
        first, offset = 0, self._log_offset
        if self._log_inode is not None and self._log_inode in inodes:
            first = inodes.index(self._log_inode)
        elif self._log_inode is not None:
            first, offset = len(inodes) - 1, 0     # rotated out of sight: all we have
        text = []
        for n in range(first, -1, -1):
            try:
                with open(files[n], "rb") as f:
                    if n == first:
                        f.seek(offset)
                    text.append(f.read())
            except FileNotFoundError:
                pass
        return b"".join(text).decode("utf-8", "replace")

    def wait_for_log(self, pattern, timeout=10.0):
        """The first match of regex ``pattern`` in the log, waiting for it to appear."""
        return wait_for_match(self.log_text, pattern, timeout, self._tails)

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
        return read_log(self.maillog)

    def wait_for_log(self, pattern, timeout=60.0):
        return wait_for_match(self.log_text, pattern, timeout,
                              lambda: f"--- {self.maillog}\n{tail(self.maillog)}", interval=0.1)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours would look alive; Postfix's master is not our child.
    return True


# --- TLS and the submission roles (issue 3) ------------------------------------------

TLS_NAME = "localhost"   # the name in the test certificates (write_self_signed also adds 127.0.0.1)


def free_ports(count):
    """``count`` distinct free ports on 127.0.0.1 (see :func:`free_port`)."""
    ports = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def tls_server(make_server, overrides=None, *, roles=("submission", "submissions"),
               certificate=True, hostname=TLS_NAME, start=True, name=None):
    """A MailsysServer with the mta listener and the given submission ``roles`` on free
    ports of 127.0.0.1, and (``certificate=True``) a self-signed certificate for
    ``hostname`` written with ``mailsys.tls.write_self_signed`` where ``[tls]`` points.

    The server gets ``submission_port`` and ``submissions_port`` attributes (None for
    a role not enabled), and ``certificate``/``key`` (the paths).
    """
    from mailsys.tls import write_self_signed

    ports = dict(zip(roles, free_ports(len(roles))))
    listen = {role: ([f"tcp:{ports[role]}:interface={LOOPBACK}"] if role in ports else [])
              for role in ("submission", "submissions")}
    server = make_server(merge({"listen": listen}, overrides), start=False, name=name)
    server.submission_port = ports.get("submission")
    server.submissions_port = ports.get("submissions")
    server.certificate = Path(server.config["tls"]["certificate"])
    server.key = Path(server.config["tls"]["key"])
    if certificate:
        write_self_signed(hostname, str(server.certificate), str(server.key))
    if start:
        server.start()
    return server


# --- LMTP, the MDA and its real readers (issue 4) -------------------------------------
#
# Added for tests/integration/test_lmtp.py, test_dovecot_reader.py, test_postfix_lmtp.py
# and test_mda_concurrency.py.  Nothing above this line is changed by them.

UNIX_PATH_MAX = 100   # sun_path is 108 bytes; keep a margin


def lmtp_socket_path(base, name="lmtp.sock"):
    """A path for the LMTP unix socket under ``base``, or under a short new directory
    in /tmp when ``base`` is too deep for a unix socket address (108 bytes)."""
    path = Path(base) / name
    if len(os.fsencode(path)) < UNIX_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="mailsys-lmtp-", dir="/tmp")) / name


def lmtp_overrides(*endpoints, **sections):
    """Configuration overrides with ``listen.lmtp`` set to ``endpoints`` (strings or socket paths)."""
    lmtp = [e if isinstance(e, str) else f"unix:{os.fspath(e)}" for e in endpoints]
    overrides = {"listen": {"lmtp": lmtp}}
    for section, keys in sections.items():
        overrides.setdefault(section, {}).update(keys)
    return overrides


_CLI_USERS = {}
_CLI_USERS_LOCK = threading.Lock()


def cli_users_text(accounts, password="integration test password"):
    """A users file written by the real CLI for ``accounts``: ``[(address, [extra args])]``,
    e.g. ``[("joe@example.com", []), ("box@example.com", ["--store", "mbox"])]``.

    ``mailsys user add ... --password-stdin`` hashes with Argon2id (slow), so the text
    is made once per set of accounts per test session and copied to each server.
    """
    key = tuple((address, tuple(extra)) for address, extra in accounts)
    with _CLI_USERS_LOCK:
        if key not in _CLI_USERS:
            base = Path(tempfile.mkdtemp(prefix="mailsys-users-"))
            try:
                server = MailsysServer(base)   # for its configuration only
                for address, extra in key:
                    p = server.mailsys_cli("user", "add", address, "--password-stdin", *extra,
                                           input=password + "\n")
                    if p.returncode != 0:
                        raise HarnessError(f"`mailsys user add {address} --password-stdin "
                                           f"{' '.join(extra)}` exited {p.returncode}:\n"
                                           f"{p.stdout}{p.stderr}")
                _CLI_USERS[key] = server.users_path.read_text()
            finally:
                shutil.rmtree(base, ignore_errors=True)
        return _CLI_USERS[key]


def dot_stuff(message):
    """CRLF message bytes as they go on the wire after DATA, final dot included."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


class LMTPClient:
    """A plain LMTP client (RFC 2033) over a unix socket path or ``(host, port)``.

    smtplib.LMTP reads one reply after DATA; LMTP gives one per accepted recipient,
    so the tests speak the protocol themselves.  Replies are returned as text, one
    reply line per element for multi-line replies, e.g. ``"250 2.1.5 Ok"``.
    """

    def __init__(self, address, timeout=60.0, lhlo="client.example.org"):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(os.fspath(address))
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()
        self.lhlo = self.command(f"LHLO {lhlo}") if lhlo else None

    def reply(self):
        lines = []
        while True:
            line = self.file.readline(4096)
            if not line:
                raise ConnectionError(f"connection closed by the server after {lines!r}")
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    def send_raw(self, data):
        self.sock.sendall(data)

    def command(self, line):
        self.send_raw(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def transaction(self, sender, rcpts, message, on_sent=None):
        """One MAIL/RCPT.../DATA: ``(mail reply, [RCPT replies], [replies after DATA])``.

        The replies after DATA are one per accepted recipient in RCPT order (empty when
        no recipient was accepted: then the transaction is reset instead of sending
        DATA).  ``on_sent`` is called once the final dot has been handed to the kernel.
        """
        mail = self.command(f"MAIL FROM:<{sender}>")
        if not mail.startswith("250"):
            return mail, [], []
        rcpt_replies = [self.command(f"RCPT TO:<{r}>") for r in rcpts]
        accepted = sum(1 for r in rcpt_replies if r.startswith("250"))
        if not accepted:
            self.command("RSET")
            return mail, rcpt_replies, []
        data = self.command("DATA")
        if not data.startswith("354"):
            return mail, rcpt_replies, [data]
        self.send_raw(dot_stuff(message))
        if on_sent is not None:
            on_sent()
        return mail, rcpt_replies, [self.reply() for _ in range(accepted)]

    def quit(self):
        try:
            return self.command("QUIT")
        except OSError:
            return None
        finally:
            self.close()

    def close(self):
        try:
            self.file.close()
        finally:
            self.sock.close()


def lmtp_deliver(address, sender, rcpts, message, timeout=60.0):
    """One transaction on a new connection; see :meth:`LMTPClient.transaction`."""
    client = LMTPClient(address, timeout=timeout)
    try:
        return client.transaction(sender, rcpts, message)
    finally:
        client.quit()


MAILDIR_NAME = re.compile(r"^(?P<sec>[0-9]+)\.M(?P<usec>[0-9]+)P(?P<pid>[0-9]+)Q(?P<q>[0-9]+)\."
                          r"(?P<host>[^,/:]+),S=(?P<size>[0-9]+),W=(?P<vsize>[0-9]+)$")


def padded(head, n):
    """``head`` (a header section and its blank line) followed by filler lines
    to exactly ``n`` bytes as sent (CRLF line ends), for size-limit tests."""
    filler = n - len(head)
    lines = [b"x" * 98 + b"\r\n"] * (filler // 100)
    rest = filler - 100 * len(lines)
    if rest:
        lines.append(b"y" * (rest - 2) + b"\r\n")
    msg = head + b"".join(lines)
    assert len(msg) == n
    return msg


def maildir_files(maildir, sub="new"):
    """``{name: bytes}`` of the files in ``maildir/sub`` ({} when it does not exist)."""
    d = Path(maildir) / sub
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return {}
    return {name: (d / name).read_bytes() for name in names}


def wait_for_files(maildir, count, timeout=60.0, sub="new"):
    """Poll ``maildir/sub`` (bounded) until it holds at least ``count`` files."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = len(os.listdir(Path(maildir) / sub))
        except FileNotFoundError:
            n = 0
        if n >= count:
            return maildir_files(maildir, sub)
        if time.monotonic() > deadline:
            raise HarnessError(f"{n} files in {maildir}/{sub} after {timeout:.0f} s, expected {count}")
        time.sleep(0.05)


def mboxrd_unquote(body):
    """mboxrd reading: one '>' less on every line that is '>'s then 'From '."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", body)


def _open_traversal(path):
    """Give "others" the search bit on ``path`` and every directory above it, so that
    a daemon's unprivileged user can reach it; returns what to put back."""
    changed = []
    d = Path(path)
    while True:
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            changed.append((d, stat.S_IMODE(mode)))
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        if d.parent == d:
            return changed
        d = d.parent


def _restore_modes(changed):
    for d, mode in reversed(changed):
        try:
            d.chmod(mode)
        except OSError:
            pass


class DovecotPeer:
    """A stock Dovecot (IMAP; with ``lmtp=True`` its LMTP as well, on ``lmtp_port``) on
    127.0.0.1 reading the Maildirs under ``mail_root``.

    ``mail_location = maildir:ROOT/%d/%n/Maildir`` (mailsys's layout), any user with
    password ``pw`` (passdb static), ``ssl = no``, logs to ``base/dovecot.log``.  Dovecot
    refuses to access mail as uid 0 ("userdb returned 0 as uid", even with
    ``first_valid_uid = 0``), so ``start()`` hands the mailbox tree to ``uid:gid`` (5000,
    as ../shared/anchors/dovecot.sh does) and gives every directory above it the search
    bit for others; ``stop()`` puts those directory modes back (the tree stays chowned).
    Its base_dir (sockets) is a short directory under /tmp, removed at ``stop()``.
    """

    PASSWORD = "pw"

    def __init__(self, base, mail_root, uid=5000, gid=5000, lmtp=False, mail_location=None):
        self.lmtp_port = free_port() if lmtp else None
        # another layout of the same tree, e.g. mailsys's mbox:
        # mbox:ROOT/%d/%n/mail:INBOX=ROOT/%d/%n/mbox:INDEX=MEMORY
        self.mail_location = mail_location
        self.dovecot = find_program("dovecot")
        self.doveadm = find_program("doveadm")
        if not self.dovecot or not self.doveadm:
            raise HarnessError("Dovecot is not installed (no dovecot/doveadm program); the "
                               "integration tests need Debian's dovecot-core and dovecot-imapd: "
                               "run `bash .ci/test-all`, which installs them")
        if os.geteuid() != 0:
            raise HarnessError("the Dovecot peer needs root (its processes change uid); run the "
                               "tests as root")
        self.base = Path(base)
        self.mail_root = Path(mail_root).resolve()
        self.uid, self.gid = uid, gid
        self.conf = self.base / "dovecot.conf"
        self.log = self.base / "dovecot.log"
        self.imap_port = free_port()
        self.run_dir = None
        self._chmodded = []

    def config_text(self):
        return f"""\
# written by tests/integration/harness.py (DovecotPeer)
base_dir = {self.run_dir}
instance_name = mailsys-test-{self.imap_port}
protocols = imap{" lmtp" if self.lmtp_port else ""}
listen = {LOOPBACK}
log_path = {self.log}
info_log_path = {self.log}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = {self.mail_location or f"maildir:{self.mail_root}/%d/%n/Maildir"}
first_valid_uid = 1000
passdb {{
  driver = static
  args = password={self.PASSWORD}
}}
userdb {{
  driver = static
  args = uid={self.uid} gid={self.gid} home={self.mail_root}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""" + (f"""service lmtp {{
  inet_listener lmtp {{
    address = {LOOPBACK}
    port = {self.lmtp_port}
  }}
}}
""" if self.lmtp_port else "")

    def start(self, timeout=START_TIMEOUT):
        self.base.mkdir(parents=True, exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(self.mail_root):
            os.chown(dirpath, self.uid, self.gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), self.uid, self.gid)
        self._chmodded = _open_traversal(self.mail_root.parent)
        self.run_dir = Path(tempfile.mkdtemp(prefix="mailsys-dovecot-", dir="/tmp"))
        self.run_dir.chmod(0o755)          # what Dovecot wants of its base_dir
        self.conf.write_text(self.config_text())
        # The master forks into the background and keeps its output open: write it to
        # a file, never to a pipe we would wait on.
        out_path = self.base / "dovecot.out"
        with open(out_path, "ab") as out:
            p = subprocess.run([self.dovecot, "-c", str(self.conf)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=60, stdin=subprocess.DEVNULL)
        if p.returncode:
            self._cleanup()
            raise HarnessError(f"dovecot -c {self.conf} exited {p.returncode}\n{tail(out_path)}"
                               f"\n--- {self.log}\n{tail(self.log)}")
        deadline = time.monotonic() + timeout
        while not port_accepts(self.imap_port) or (self.lmtp_port and not port_accepts(self.lmtp_port)):
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"Dovecot does not accept IMAP on 127.0.0.1:{self.imap_port} (or LMTP on {self.lmtp_port})\n"
                                   f"--- {self.log}\n{tail(self.log)}")
            time.sleep(0.1)
        return self

    def master_pid(self):
        try:
            return int((self.run_dir / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, TypeError):
            return None

    def stop(self):
        try:
            pid = self.master_pid()
            if self.conf.exists():
                subprocess.run([self.doveadm, "-c", str(self.conf), "stop"], capture_output=True,
                               timeout=60, stdin=subprocess.DEVNULL)
            if pid is not None:
                deadline = time.monotonic() + STOP_TIMEOUT
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        finally:
            self._cleanup()

    def _cleanup(self):
        _restore_modes(self._chmodded)
        self._chmodded = []
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def imap(self, user, timeout=30):
        """An imaplib client logged in as ``user``."""
        client = imaplib.IMAP4(LOOPBACK, self.imap_port, timeout=timeout)
        client.login(user, self.PASSWORD)
        return client

    def log_text(self):
        return read_log(self.log)


class PostfixLMTPPeer(PostfixPeer):
    """The Postfix peer as a front end that hands its virtual domains to mailsys over LMTP:
    ``virtual_mailbox_domains = DOMAINS``, ``virtual_mailbox_maps`` listing ``mailboxes``
    (other recipients are refused at RCPT) and ``virtual_transport = lmtp:NEXTHOP``, where
    ``nexthop`` is ``inet:127.0.0.1:PORT`` or ``unix:/path/to/socket``.
    Nothing is relayed (``relayhost`` empty, no relay domains)."""

    def __init__(self, base, nexthop, domains, mailboxes):
        super().__init__(base, relayhost="")
        self.nexthop = nexthop
        self.domains = list(domains)
        self.mailboxes = list(mailboxes)

    def write_config(self):
        super().write_config()
        maps = ", ".join(f"{m}=lmtp" for m in self.mailboxes)
        extra = {
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_maps": f"inline:{{ {maps} }}",
            "virtual_transport": f"lmtp:{self.nexthop}",
            "lmtp_host_lookup": "native",
            "lmtp_tls_security_level": "none",
        }
        with open(self.etc / "main.cf", "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in extra.items()))
        with open(self.etc / "master.cf", "a") as f:
            f.write("lmtp      unix  -       -       n       -       -       lmtp\n")

    def log_lines(self, pattern):
        rx = re.compile(pattern)
        return [line for line in self.log_text().splitlines() if rx.search(line)]


# Accounts of the MDA tests, made by `mailsys user add` (see cli_users_text).
MDA_ACCOUNTS = (
    ("joe@example.com", ()),                      # Maildir (the default store)
    ("ann@example.com", ()),                      # Maildir
    ("box@example.com", ("--store", "mbox")),     # mbox
    ("tiny@example.com", ("--quota", "2000")),    # Maildir, 2000-byte quota
    ("bounces@example.com", ()),                  # Maildir: a sender that gets bounces
)


def start_mda(make_server, unix=True, tcp=False, aliases=None, overrides=None, name=None,
              accounts=MDA_ACCOUNTS, unix_mode=None):
    """A running mailsys (via the ``make_server`` fixture) with the LMTP role on a unix
    socket (``server.lmtp_socket``) and/or TCP on 127.0.0.1 (``server.lmtp_port``), the
    ``accounts`` made by the CLI and ``aliases`` (text) as its aliases file."""
    server = make_server(overrides, start=False, name=name)
    endpoints = []
    server.lmtp_socket = server.lmtp_port = None
    if unix:
        server.lmtp_socket = lmtp_socket_path(server.base)
        # unix_mode: for another user's client (mailsys makes the socket 0600 otherwise).
        endpoints.append(f"unix:{server.lmtp_socket}" + (f":mode={unix_mode}" if unix_mode else ""))
    if tcp:
        server.lmtp_port = free_port()
        endpoints.append(f"tcp:{server.lmtp_port}:interface={LOOPBACK}")
    server.config["listen"]["lmtp"] = endpoints
    server.config_path.write_text(to_toml(server.config))
    server.users_path.write_text(cli_users_text(accounts))
    server.users_path.chmod(0o600)
    if aliases is not None:
        server.aliases_path.write_text(aliases)
    server.mail_root = Path(server.config["mailbox"]["root"])
    return server.start()


def maildir_of(server, address):
    local, _, domain = address.rpartition("@")
    return server.mail_root / domain.lower() / local.lower() / "Maildir"


def mbox_of(server, address):
    local, _, domain = address.rpartition("@")
    return server.mail_root / domain.lower() / local.lower() / "mbox"


def stored_form(sender, account, message):
    """What a store holds for ``message`` (CRLF bytes as accepted): our delivery headers
    in front, every line end LF."""
    head = f"Return-Path: <{sender}>\r\nDelivered-To: {account}\r\n".encode("utf-8")
    return (head + message).replace(b"\r\n", b"\n")


# --- POP3 (issue 7) ----------------------------------------------------------------------
#
# Added for tests/integration/test_pop3*.py and tests/security/test_pop3_attacks.py.
# Nothing above this line is changed by them.

def start_pop3(make_server, accounts=MDA_ACCOUNTS, overrides=None, name=None, hostname=TLS_NAME):
    """:func:`start_mda` plus the ``pop3`` (STLS) and ``pop3s`` roles on free loopback
    ports (``server.pop3_port``, ``server.pop3s_port``) and a self-signed certificate
    for ``hostname`` (``server.certificate``) written before the server starts."""
    from mailsys.tls import write_self_signed

    pop3_port, pop3s_port = free_ports(2)
    listen = {"listen": {"pop3": [f"tcp:{pop3_port}:interface={LOOPBACK}"],
                         "pop3s": [f"tcp:{pop3s_port}:interface={LOOPBACK}"]}}

    def make_with_certificate(overrides=None, start=True, name=None):
        server = make_server(overrides, start=False, name=name)
        server.pop3_port, server.pop3s_port = pop3_port, pop3s_port
        server.certificate = Path(server.config["tls"]["certificate"])
        server.key = Path(server.config["tls"]["key"])
        write_self_signed(hostname, str(server.certificate), str(server.key))
        if start:
            server.start()
        return server

    return start_mda(make_with_certificate, overrides=merge(listen, overrides), name=name,
                     accounts=accounts)


def pop3_tls_context():
    """A client TLS context that accepts the test's self-signed certificate."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pop3_client(server, implicit=True, login=None, password="integration test password",
                timeout=30):
    """A poplib client on ``server``: POP3_SSL on pop3s (``implicit``), else POP3 plus
    STLS; logged in as ``login`` when given."""
    import poplib

    if implicit:
        client = poplib.POP3_SSL(LOOPBACK, server.pop3s_port, context=pop3_tls_context(),
                                 timeout=timeout)
    else:
        client = poplib.POP3(LOOPBACK, server.pop3_port, timeout=timeout)
        client.stls(pop3_tls_context())
    if login is not None:
        client.user(login)
        client.pass_(password)
    return client


# --- remote delivery (issue 6) ----------------------------------------------------------
#
# Added for tests/integration/test_remote_*.py.  Nothing above this line is changed.

class PostfixMXPeer(PostfixPeer):
    """The Postfix peer as a destination MX: it accepts mail for ``domains`` from
    anyone, for the listed ``mailboxes`` only (others: 550 5.1.1 at RCPT), and
    delivers it with the virtual agent to ``vmail/DOMAIN/LOCAL/`` Maildirs (uid
    5000, as in ../shared/anchors/postfix.sh).  Nothing is relayed."""

    HOSTNAME = "mx.postfix.test"

    def __init__(self, base, domains, mailboxes):
        super().__init__(base, relayhost="")
        self.domains = list(domains)
        self.mailboxes = list(mailboxes)
        self.vmail = self.base / "vmail"

    def write_config(self):
        super().write_config()
        self.vmail.mkdir(parents=True, exist_ok=True)
        os.chown(self.vmail, 5000, 5000)
        maps = ", ".join(f"{m}={m.partition('@')[2]}/{m.partition('@')[0]}/"
                         for m in self.mailboxes)
        extra = {
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": f"inline:{{ {maps} }}",
            "virtual_uid_maps": "static:5000",
            "virtual_gid_maps": "static:5000",
            "smtpd_recipient_restrictions": "reject_unauth_destination",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "mynetworks": "",
        }
        # Replace rather than append: every duplicate key is a warning logged by
        # every Postfix process, and a burst of them can fill postlogd's socket.
        main = self.etc / "main.cf"
        kept = [line for line in main.read_text().splitlines()
                if line.partition("=")[0].strip() not in extra]
        main.write_text("\n".join(kept) + "\n" + "".join(
            f"{k} = {os.fspath(v)}\n" for k, v in extra.items()))
        with open(self.etc / "master.cf", "a") as f:
            f.write("virtual   unix  -       n       n       -       -       virtual\n")

    def maildir(self, address):
        local, _, domain = address.partition("@")
        return self.vmail / domain / local
