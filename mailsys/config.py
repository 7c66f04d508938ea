"""The mail host's configuration: one TOML file, read once, frozen (CONTRACT section 2).

Everything that reads settings gets a :class:`Config` built here and nowhere else, so
a value is validated, defaulted and made absolute exactly once.  The file is checked
as a whole before anything starts: a half-valid mail host (say, relaying for the wrong
networks because a key was misspelt) is worse than one that refuses to start, and an
operator fixing a file wants every mistake at once, each with its file and line.

The defaults live in one table, :data:`_SCHEMA`, next to the check each value must
pass; the embedded development default (CONTRACT section 4) is a TOML text that goes
through the very same path as a file, so it cannot drift from what a file would give.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import sys
import tomllib
from dataclasses import dataclass, fields
from types import MappingProxyType

from twisted.internet.endpoints import serverFromString

EMBEDDED_SOURCE = "<embedded default>"


class ConfigError(Exception):
    """Every problem of a configuration, so the operator fixes them in one round.

    Each entry of ``problems`` reads ``FILE:LINE: section.key: problem``, the shape
    compilers use, so editors can jump to it.
    """

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigFileError(ConfigError):
    """The configuration file itself cannot be read: one sentence, no line to point at.

    Kept apart from the ``FILE:LINE`` problems so that every command says it the
    same way (``mailsys: cannot read the configuration file ...``)."""


# --- the frozen result -------------------------------------------------------------
# Sections are separate classes so that a service can be handed only the part it
# needs; sequences are tuples so that nothing downstream can change shared settings.

@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    state_dir: str
    workers: int


@dataclass(frozen=True)
class ListenConfig:
    mta: tuple[str, ...]
    submission: tuple[str, ...]
    submissions: tuple[str, ...]
    lmtp: tuple[str, ...]
    pop3: tuple[str, ...]
    pop3s: tuple[str, ...]


@dataclass(frozen=True)
class TLSConfig:
    certificate: str
    key: str


@dataclass(frozen=True)
class DomainsConfig:
    local: tuple[str, ...]
    relay: tuple[str, ...]


@dataclass(frozen=True)
class AccountsConfig:
    users: str
    aliases: str


@dataclass(frozen=True)
class MailboxConfig:
    root: str
    default_store: str
    quota: int


@dataclass(frozen=True)
class RelayConfig:
    mynetworks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    smarthost: str
    smarthost_auth: str
    outbound_tls: str
    transport: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class QueueConfig:
    retry_min: int
    retry_max: int
    lifetime: int
    warn_after: int


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int
    recipients: int
    connections: int
    connections_per_ip: int
    command_timeout: int
    data_timeout: int
    auth_failures: int


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...]
    timeout: int


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    listen: ListenConfig
    tls: TLSConfig
    domains: DomainsConfig
    accounts: AccountsConfig
    mailbox: MailboxConfig
    relay: RelayConfig
    queue: QueueConfig
    limits: LimitsConfig
    dns: DNSConfig


# --- value checks ------------------------------------------------------------------
# A check takes the raw TOML value and returns the value the Config holds, or raises
# _Invalid with every problem it found in that value.

class _Invalid(Exception):
    """Problems with one value; ``where`` lets an entry of a table name its own line."""

    def __init__(self, *messages, where=None):
        super().__init__(*messages)
        self.problems = [(m, where) for m in messages]

    @classmethod
    def collect(cls, problems):
        err = cls()
        err.problems = list(problems)
        return err


class _Context:
    """What a check needs besides the value: where relative paths start, and the
    values of the sections checked so far (a default may follow another key)."""

    def __init__(self, base_dir, values=None):
        self.base_dir = base_dir
        self.values = {} if values is None else values


def _show(value):
    """Render a value the way the operator wrote it, so the message can be matched to the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _integer(minimum):
    def check(value, ctx):
        # bool is an int to Python but never what the operator meant.
        if type(value) is not int:
            raise _Invalid(f"must be an integer, got {_show(value)}")
        if value < minimum:
            raise _Invalid(f"must be at least {minimum}, got {value}")
        return value
    return check


def _choice(*allowed):
    def check(value, ctx):
        if not isinstance(value, str) or value not in allowed:
            raise _Invalid(f"must be one of {', '.join(allowed)}, got {_show(value)}")
        return value
    return check


def _string(value):
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _absolute(path, ctx):
    if "\0" in path:
        raise _Invalid(f"{_show(path)} contains a NUL character")
    return os.path.normpath(os.path.join(ctx.base_dir, path))


def _path(value, ctx):
    if not _string(value):
        raise _Invalid("must not be empty")
    return _absolute(value, ctx)


def _optional_path(value, ctx):
    return _absolute(value, ctx) if _string(value) else ""


def _list_of(item, what):
    """A list whose items are checked one by one, all bad items reported, duplicates dropped."""
    def check(value, ctx):
        if not isinstance(value, list):
            raise _Invalid(f"must be a list of {what}, got {_show(value)}")
        out, problems = [], []
        for entry in value:
            if not isinstance(entry, str):
                problems.append((f"must be a list of {what}, got {_show(entry)} in the list", None))
                continue
            try:
                converted = item(entry, ctx)
            except _Invalid as e:
                problems.extend(e.problems)
                continue
            if converted not in out:
                out.append(converted)
        if problems:
            raise _Invalid.collect(problems)
        return tuple(out)
    return check


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _domain_name(text):
    """Normalise a domain to the lowercase A-label form that envelope addresses are compared in.

    Returns None when it is not a domain name, so callers can phrase the problem.
    """
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        name = _to_a_label(name)
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


def is_hostname(text):
    """Whether ``text`` is an ASCII host name (``mailsys tls self-signed --hostname``)."""
    return text.isascii() and _domain_name(text) is not None


def _to_a_label(name):
    """IDNA 2008 (UTS 46) when the idna package is there, as twisted[tls] ensures; else IDNA 2003."""
    try:
        import idna
    except ImportError:  # pragma: no cover
        try:
            return name.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return ""


def _domain(value, ctx):
    name = _domain_name(value)
    if name is None:
        raise _Invalid(f"{_show(value)} is not a domain name (letters, digits, hyphens and dots, "
                       "or an internationalised name)")
    return name


_LOOPBACK_NAMES = ("localhost", "localhost6", "ip6-localhost", "ip6-loopback")


def machine_hostname():
    """The name this machine announces when ``server.hostname`` is not set.

    ``socket.getfqdn()`` asks the resolver for the canonical name of
    ``gethostname()``; where /etc/hosts lists the host's name on a loopback line
    after ``localhost`` it answers ``localhost``, and a real host would greet
    with ``220 localhost ESMTP``.  Postfix's ``myhostname`` default takes
    ``gethostname()`` and, when that has no dot, appends ``mydomain`` (itself
    ``localdomain`` by default).  Here: the FQDN when it is a dotted name other
    than a loopback alias, else ``gethostname()`` when dotted, else
    ``gethostname()`` + ``.localdomain`` as Postfix does (docs/configuration.rst).
    """
    def usable(name):
        return "." in name and name.split(".")[0].lower() not in _LOOPBACK_NAMES

    fqdn = socket.getfqdn().rstrip(".")
    if usable(fqdn):
        return fqdn
    host = socket.gethostname().rstrip(".")
    if usable(host):
        return host
    return f"{host}.localdomain" if host and "." not in host else host or fqdn


def _hostname(value, ctx):
    if value is None:  # not in the file: the machine's own name, as the contract promises
        machine = machine_hostname()
        if _domain_name(machine) is None:
            raise _Invalid(f"this machine's name {_show(machine)} is not a valid hostname; "
                           "set server.hostname")
        return machine.rstrip(".")
    name = _domain_name(_string(value))
    if name is None:
        raise _Invalid(f"{_show(value)} is not a valid hostname")
    # Keep the operator's spelling for the banner, but without the root dot; the wire
    # needs ASCII, so an internationalised name goes out as its A-label.
    return value.strip().rstrip(".") if value.isascii() else name


def _network(value, ctx):
    try:
        # strict=False: "10.1.2.3/8" means the network 10.0.0.0/8, as in Postfix.
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _Invalid(f"{_show(value)} is not an IP network (ADDRESS/PREFIX or a bare address)")


def _port(text):
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        return None
    return int(text)


def _host_port(text, need_port):
    """Check "host", "host:port", "[host]" or "[host]:port"; return None when malformed."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
        try:
            ipaddress.ip_address(host.removeprefix("IPv6:"))
            host_ok = True
        except ValueError:
            host_ok = _domain_name(host) is not None
    else:
        host, sep, port = text.partition(":")
        if not sep:
            port = None
        host_ok = _domain_name(host) is not None
    if not host_ok:
        return None
    if port is None:
        return None if need_port else text
    return text if _port(port) is not None else None


def _smarthost(value, ctx):
    if _string(value) and _host_port(value, need_port=False) is None:
        raise _Invalid(f"{_show(value)} is not a smart host; use \"host:port\", \"[host]:port\", "
                       "\"host\" or \"[host]\" (brackets: no MX lookup)")
    return value


def _nexthop(value, ctx):
    kind, sep, rest = value.partition(":")
    if sep and kind == "smtp" and _host_port(rest, need_port=False):
        return value
    if sep and kind == "lmtp":
        if rest.startswith("unix:") and len(rest) > len("unix:"):
            return "lmtp:unix:" + _absolute(rest[len("unix:"):], ctx)
        if _host_port(rest, need_port=True):
            # The LMTP courier connects to an address, not a name (no MX for LMTP,
            # and no resolving at delivery time): refuse a name here rather than
            # defer every message for that domain until it expires.
            try:
                ipaddress.ip_address(rest.rsplit(":", 1)[0].strip("[]"))
            except ValueError:
                return None
            return value
    return None


def _transport(value, ctx):
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table of domain = next hop, got {_show(value)}")
    pairs, problems = {}, []
    for domain, nexthop in value.items():
        where = ("relay.transport", domain)
        name = _domain_name(domain)
        if name is None:
            problems.append((f"{_show(domain)} is not a domain name", where))
            continue
        hop = _nexthop(nexthop, ctx) if isinstance(nexthop, str) else None
        if hop is None:
            problems.append((f"{_show(domain)} = {_show(nexthop)}: the next hop must be "
                             "\"smtp:host[:port]\", \"smtp:[host]:port\", \"lmtp:IP:port\" "
                             "or \"lmtp:unix:PATH\"", where))
            continue
        pairs[name] = hop
    if problems:
        raise _Invalid.collect(problems)
    return tuple(sorted(pairs.items()))


def _nameserver(value, ctx):
    text = value.strip()
    try:
        ipaddress.ip_address(text)  # a bare IPv4 or IPv6 address
        return text
    except ValueError:
        pass
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        ok = sep and _is_ip(host, version=6)
    else:
        host, sep, port = text.rpartition(":")
        ok = sep and _is_ip(host, version=4)
    if not ok or _port(port) is None:
        raise _Invalid(f"{_show(value)} is not a name server; use \"ip\", \"ip:port\" "
                       "or \"[ipv6]:port\"")
    return text


def _is_ip(text, version=None):
    try:
        return ipaddress.ip_address(text).version in ((version,) if version else (4, 6))
    except ValueError:
        return False


# --- endpoint strings --------------------------------------------------------------
# Twisted's own syntax: ":" separates arguments, "=" names one, "\" escapes anything.

def _split_endpoint(text):
    """Split an endpoint string into arguments, each a list of one (positional) or two (key, value)."""
    args, current, part = [], [], ""
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            part += next(chars, "")
        elif ch == ":":
            args.append(current + [part])
            current, part = [], ""
        elif ch == "=" and not current:
            current, part = [part], ""
        else:
            part += ch
    args.append(current + [part])
    return args


def _escape(text):
    return re.sub(r"([\\:=])", r"\\\1", text)


def _absolute_unix(text, ctx):
    """Rewrite the socket path of a unix: endpoint so it does not depend on the working directory."""
    args = _split_endpoint(text)
    # twisted's unix parser takes the path as its first positional argument or as address=.
    target = next((a for a in args[1:] if len(a) == 1 or a[0] == "address"), None)
    if target is None or not target[-1]:
        raise _Invalid(f"{_show(text)}: a unix: endpoint needs a socket path, "
                       "e.g. 'unix:/run/mailsys/lmtp.sock'")
    if os.path.isabs(target[-1]):
        return text
    target[-1] = _absolute(target[-1], ctx)
    return ":".join("=".join(_escape(p) for p in arg) for arg in args)


class _NoReactor:
    """serverFromString only stores the reactor; validating must not install or touch one."""


def _endpoint(value, ctx):
    text = value.strip()
    kind = text.split(":", 1)[0].strip().lower()
    if kind == "ssl":
        # mailsys wraps TLS itself from [tls], so that STARTTLS and implicit TLS share one
        # certificate and reload together.
        raise _Invalid(f"{_show(value)}: use submissions/pop3s roles for implicit TLS, not ssl: endpoints")
    if kind == "unix":
        text = _absolute_unix(text, ctx)
    try:
        serverFromString(_NoReactor(), text)
    except Exception as e:
        reason = str(e) or type(e).__name__
        raise _Invalid(f"{_show(value)} is not a Twisted server endpoint ({reason}); "
                       "e.g. 'tcp:25' or 'unix:/path/to.sock'")
    args = _split_endpoint(text)
    if kind in ("tcp", "tcp6"):
        ports = [a[0] for a in args[1:2] if len(a) == 1] + [a[1] for a in args[1:] if a[0] == "port"]
        if any(not 0 <= int(p) <= 65535 for p in ports):
            raise _Invalid(f"{_show(value)}: the port must be between 0 and 65535")
        # Decided only at bind time otherwise, as a traceback from twistd: the
        # interface is an address (Twisted resolves no names for a listener).
        interfaces = ([a[0] for a in args[2:3] if len(a) == 1]
                      + [a[1] for a in args[1:] if len(a) == 2 and a[0] == "interface"])
        for interface in filter(None, interfaces):
            if not _is_ip(interface, version=6 if kind == "tcp6" else None):
                family = "an IPv6 address" if kind == "tcp6" else "an IP address"
                raise _Invalid(f"{_show(value)}: the interface {interface!r} is not {family}; "
                               "use e.g. interface=127.0.0.1 (IPv6: interface=\\:\\:1)")
    elif kind == "unix":
        path = next(a[-1] for a in args[1:] if len(a) == 1 or a[0] == "address")
        size = len(os.fsencode(path))
        if size > _UNIX_PATH_MAX:
            raise _Invalid(f"{_show(value)}: the socket path is {size} bytes, longer than the "
                           f"{_UNIX_PATH_MAX} a unix socket can have; choose a shorter path")
    return text


# sun_path holds 108 bytes on Linux, the terminating NUL included.
_UNIX_PATH_MAX = 107


# --- the one table of keys, defaults and checks (CONTRACT section 2) ----------------
# A default of None for server.hostname stands for "this machine's FQDN", looked up at
# load time so that a config loaded on another machine is right for that machine; for
# listen.lmtp it stands for the socket inside server.state_dir.

_ENDPOINTS = _list_of(_endpoint, "endpoint strings")
DEFAULT_STATE_DIR = "/var/lib/mailsys"


def _lmtp_endpoints(value, ctx):
    """``listen.lmtp``; when not in the file, ``unix:STATE_DIR/lmtp.sock``: the
    state directory holds the runtime sockets (CONTRACT section 2), so two
    instances with their own state_dir never compete for one socket."""
    if value is None:
        state = ctx.values.get("server", {}).get("state_dir", DEFAULT_STATE_DIR)
        value = ["unix:" + _escape(os.path.join(state, "lmtp.sock"))]
    return _ENDPOINTS(value, ctx)

_SCHEMA = {
    "server": (ServerConfig, {
        "hostname": (None, _hostname),
        "state_dir": (DEFAULT_STATE_DIR, _path),
        "workers": (0, _integer(0)),
    }),
    "listen": (ListenConfig, {
        "mta": (["tcp:25"], _ENDPOINTS),
        "submission": (["tcp:587"], _ENDPOINTS),
        "submissions": (["tcp:465"], _ENDPOINTS),
        "lmtp": (None, _lmtp_endpoints),
        "pop3": (["tcp:110"], _ENDPOINTS),
        "pop3s": (["tcp:995"], _ENDPOINTS),
    }),
    "tls": (TLSConfig, {
        "certificate": ("/etc/mailsys/tls/fullchain.pem", _path),
        "key": ("/etc/mailsys/tls/privkey.pem", _path),
    }),
    "domains": (DomainsConfig, {
        "local": (["example.com"], _list_of(_domain, "domain names")),
        "relay": ([], _list_of(_domain, "domain names")),
    }),
    "accounts": (AccountsConfig, {
        "users": ("/etc/mailsys/users", _path),
        "aliases": ("/etc/mailsys/aliases", _path),
    }),
    "mailbox": (MailboxConfig, {
        "root": ("/var/mail/vhosts", _path),
        "default_store": ("maildir", _choice("maildir", "mbox")),
        "quota": (0, _integer(0)),
    }),
    "relay": (RelayConfig, {
        "mynetworks": (["127.0.0.0/8", "::1/128"], _list_of(_network, "IP networks")),
        "smarthost": ("", _smarthost),
        "smarthost_auth": ("", _optional_path),
        "outbound_tls": ("may", _choice("none", "may", "encrypt")),
        "transport": ({}, _transport),
    }),
    "queue": (QueueConfig, {
        "retry_min": (300, _integer(1)),
        "retry_max": (3600, _integer(1)),
        "lifetime": (432000, _integer(0)),
        "warn_after": (14400, _integer(0)),
    }),
    "limits": (LimitsConfig, {
        "message_size": (26214400, _integer(1)),
        "recipients": (1000, _integer(1)),
        "connections": (1000, _integer(1)),
        "connections_per_ip": (50, _integer(1)),
        "command_timeout": (300, _integer(1)),
        "data_timeout": (600, _integer(1)),
        "auth_failures": (3, _integer(1)),
    }),
    "dns": (DNSConfig, {
        "nameservers": ([], _list_of(_nameserver, "name server addresses")),
        "timeout": (5, _integer(1)),
    }),
}

#: The defaults as written in a file (read-only view of _SCHEMA, for docs and tests).
DEFAULTS = MappingProxyType({
    section: MappingProxyType({key: default for key, (default, _) in keys.items()})
    for section, (_, keys) in _SCHEMA.items()
})

# The development host of CONTRACT section 4: relative paths land under the directory
# it is started from; every key not named here keeps its normal default.
_EMBEDDED_TOML = """\
[server]
state_dir = "var"

[listen]
mta = ["tcp:2525:interface=127.0.0.1"]
submission = ["tcp:2587:interface=127.0.0.1"]
submissions = ["tcp:2465:interface=127.0.0.1"]
lmtp = ["unix:var/lmtp.sock"]
pop3 = ["tcp:2110:interface=127.0.0.1"]
pop3s = ["tcp:2995:interface=127.0.0.1"]

[tls]
certificate = "var/tls/fullchain.pem"
key = "var/tls/privkey.pem"

[domains]
local = ["localhost"]

[accounts]
users = "var/users"
aliases = "var/aliases"

[mailbox]
root = "var/mail"
"""


# --- finding lines -----------------------------------------------------------------
# tomllib keeps no positions, so the text is scanned for table headers and "key ="
# lines; that is enough to point at the line an operator has to edit.

_SEGMENT = r'(?:"(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+)'
_HEADER_RE = re.compile(r"^\s*\[\[?\s*(%s(?:\s*\.\s*%s)*)\s*\]\]?" % (_SEGMENT, _SEGMENT))
_KEY_RE = re.compile(r"^\s*(%s(?:\s*\.\s*%s)*)\s*=" % (_SEGMENT, _SEGMENT))
_SEGMENT_RE = re.compile(_SEGMENT)


def _segments(dotted):
    out = []
    for seg in _SEGMENT_RE.findall(dotted):
        if seg[0] in "\"'":
            try:
                seg = tomllib.loads("k = " + seg)["k"]
            except tomllib.TOMLDecodeError:
                seg = seg[1:-1]
        out.append(seg)
    return out


class _Lines:
    """Line numbers of table headers and keys in a TOML text (1-based; 0 = not found)."""

    def __init__(self, text):
        self.keys, self.sections, self.names = {}, {}, {}
        self.duplicate = 0
        self.count = text.count("\n") + 1
        table, in_multiline = [], None
        for number, line in enumerate(text.splitlines(), 1):
            if in_multiline:
                if line.count(in_multiline) % 2:
                    in_multiline = None
                continue
            header = _HEADER_RE.match(line)
            if header:
                table = _segments(header.group(1))
                name = ".".join(table)
                if name in self.sections and not line.lstrip().startswith("[["):
                    self.duplicate = self.duplicate or number
                self.sections.setdefault(name, number)
                self.names[number] = name
                continue
            key = _KEY_RE.match(line)
            if key:
                path = table + _segments(key.group(1))
                where = (".".join(path[:-1]), path[-1])
                if where in self.keys:
                    self.duplicate = self.duplicate or number
                self.keys.setdefault(where, number)
                self.names[number] = ".".join(path)
                for i in range(len(path) - 1):  # dotted keys open tables too
                    self.sections.setdefault(".".join(path[: i + 1]), number)
                rest = line[key.end():]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2:
                        in_multiline = quote

    def find(self, section, key=None):
        if key is not None and (section, key) in self.keys:
            return self.keys[(section, key)]
        if section in self.sections:
            return self.sections[section]
        parent, _, name = section.rpartition(".")  # a table written as a value: "limits = 5"
        return self.keys.get((parent, name), 0)


# --- loading -----------------------------------------------------------------------

def load(path, check_files=False):
    """Read, validate and freeze the configuration at ``path`` (None: the embedded default).

    Raises ConfigError naming every problem, so nothing starts on a half-valid file.
    With ``check_files`` the files the server reads at start (accounts, TLS pair,
    smart host credentials) are read too, exactly as the server will: ``mailsys
    config check`` and twistd then refuse the same setups, each problem with its
    line, instead of the check passing and the server dying at start.
    """
    if path is None:
        return embedded_default(os.getcwd(), check_files)
    source = os.path.abspath(os.fspath(path))
    try:
        with open(source, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except OSError as e:
        raise _unreadable(source, e.strerror or str(e))
    except UnicodeDecodeError as e:
        raise _unreadable(source, f"not UTF-8 text ({e.reason} at byte {e.start})")
    return _load_text(text, source, os.path.dirname(source), check_files)


def _unreadable(source, reason):
    return ConfigFileError([f"cannot read the configuration file {source}: {reason}; "
                            "check --config or $MAILSYS_CONFIG"])


def embedded_default(base_dir, check_files=False):
    """The development host of CONTRACT section 4, rooted at ``base_dir``."""
    return _load_text(_EMBEDDED_TOML, EMBEDDED_SOURCE, os.path.abspath(base_dir), check_files)


_AT_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _load_text(text, source, base_dir, check_files=False):
    lines = _Lines(text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        at = _AT_RE.search(message)
        reason = message[: at.start()] if at else message
        if at and at.group(1):
            line, column = int(at.group(1)), at.group(2)
            reason += f" (column {column})"
        else:  # tomllib reports e.g. duplicate keys only at the end; the scan knows better
            line = lines.duplicate or lines.count
        name = lines.names.get(line, "(syntax)")
        raise ConfigError([f"{source}:{line}: {name}: TOML syntax error: {reason}"])
    return _build(raw, source, base_dir, lines, check_files)


def _build(raw, source, base_dir, lines, check_files=False):
    values = {}
    ctx = _Context(base_dir, values)
    problems = []  # (line, order, text): sorted by line so they read like the file

    def report(section, key, message, where=None, at=None):
        """``at``: another file's ``FILE:LINE`` (a users file line, say) to name
        instead of the key's own; the problem still sorts at the key's line."""
        line = lines.find(*where) if where and lines.find(*where) else lines.find(section, key)
        # A key the file does not write (a default) has no line of its own: its
        # section's header, else the first line, so that the place is a real one.
        line = line or 1
        name = f"{section}.{key}" if key else section
        problems.append((line, len(problems), f"{at or f'{source}:{line}'}: {name}: {message}"))

    for name in raw:
        if name not in _SCHEMA:
            report(name, None, "unknown section" + _suggest(name, _SCHEMA))

    for section, (_, keys) in _SCHEMA.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            report(section, None, f"must be a table ([{section}]), got {_show(table)}")
            table = {}
        for key in table:
            if key not in keys:
                report(section, key, "unknown key" + _suggest(key, keys))
        got = values[section] = {}
        for key, (default, check) in keys.items():
            try:
                got[key] = check(table.get(key, default), ctx)
            except _Invalid as e:
                for message, where in e.problems:
                    report(section, key, message, where)

    _cross_checks(values, raw, report)
    if check_files:
        _file_checks(values, source, report)

    if problems:
        raise ConfigError([text for _, _, text in sorted(problems)])
    return Config(source=source, **{
        section: cls(**values[section]) for section, (cls, _) in _SCHEMA.items()
    })


def _suggest(word, known):
    close = difflib.get_close_matches(word, list(known), n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(known)}"


def _cross_checks(values, raw, report):
    """Rules between keys; each only runs when the keys it compares are themselves valid."""
    domains = values["domains"]
    if "local" in domains and "relay" in domains:
        for name in domains["relay"]:
            if name in domains["local"]:
                report("domains", "relay", f"{name!r} is also in domains.local; a domain is either "
                       "delivered here or relayed onward, not both")

    queue = values["queue"]
    if "retry_min" in queue and "retry_max" in queue and queue["retry_max"] < queue["retry_min"]:
        written = raw.get("queue", {}) if isinstance(raw.get("queue"), dict) else {}
        key = "retry_max" if "retry_max" in written or "retry_min" not in written else "retry_min"
        report("queue", key, f"retry_max ({queue['retry_max']}) must be at least "
               f"retry_min ({queue['retry_min']})")

    state = values["server"].get("state_dir")
    # The longest socket the server makes there (mailsys.control); the bind would
    # fail at start with a traceback.
    deepest = os.path.join(state or "", "public", "submit.sock")
    if state and len(os.fsencode(deepest)) > _UNIX_PATH_MAX:
        report("server", "state_dir", f"{deepest} would be {len(os.fsencode(deepest))} bytes, "
               f"longer than the {_UNIX_PATH_MAX} a unix socket can have; choose a shorter "
               "state_dir")

    seen = {}
    for role, endpoints in values["listen"].items():
        for endpoint in endpoints:
            if endpoint in seen:
                report("listen", role, f"{endpoint!r} is also listed for listen.{seen[endpoint]}; "
                       "an endpoint serves one role")
            else:
                seen[endpoint] = role


def _file_checks(values, source, report):
    """Read what the server reads at start, the way it reads it, so that a file it
    would refuse is reported here with the key that names it.  Each check runs
    only when the keys it needs are themselves valid."""
    from mailsys.accounts import file_problems

    accounts = values["accounts"]
    for key in ("users", "aliases"):
        if key in accounts:
            for line, problem in file_problems(accounts[key], key):
                report("accounts", key, problem,
                       at=f"{accounts[key]}:{line}" if line else None)

    auth = values["relay"].get("smarthost_auth")
    if auth:
        problem = smarthost_auth_problem(auth)
        if problem:
            report("relay", "smarthost_auth", problem)

    tls, listen = values["tls"], values["listen"]
    if "certificate" not in tls or "key" not in tls:
        return
    certificate, key = tls["certificate"], tls["key"]
    if os.path.exists(certificate) and os.path.exists(key):
        from mailsys.tls import TLSError, load_context

        try:
            load_context(certificate, key)
        except TLSError as e:
            report("tls", e.which, f"{e}; run 'mailsys tls self-signed --force' or point "
                   "[tls] at a matching certificate and key")
        return
    if source == EMBEDDED_SOURCE and not os.path.exists(certificate):
        return   # the development host writes a self-signed pair on its first start
    for role in ("submissions", "pop3s"):
        if listen.get(role):
            missing = [p for p in (certificate, key) if not os.path.exists(p)]
            report("listen", role, f"implicit TLS needs a certificate and key, but "
                   f"{' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not "
                   f"exist; run 'mailsys tls self-signed', point [tls] at your "
                   f"certificate, or set {role} = []")


def _check_schema_matches_classes():
    """Keep the table and the dataclasses in step: a key missing from either is a bug here."""
    for section, (cls, keys) in _SCHEMA.items():
        assert [f.name for f in fields(cls)] == list(keys), section
    assert [f.name for f in fields(Config)] == ["source", *_SCHEMA], "Config"


_check_schema_matches_classes()


# --- mailsys config check ----------------------------------------------------------

def smarthost_auth_problem(path):
    """Why the ``relay.smarthost_auth`` file cannot be used, or None.

    It holds a password: it must be a regular file readable by its owner only
    (no group or other permission bits), holding ``username:password``.  The
    answer names no key: the config check puts it after ``FILE:LINE: key:``."""
    import stat as _stat

    try:
        st = os.stat(path)
    except OSError as e:
        return (f"cannot read {path}: {e.strerror}; create it holding one line "
                "\"username:password\" (mode 0600), or set smarthost_auth = \"\"")
    if not _stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file; point smarthost_auth at a \"username:password\" file"
    if st.st_mode & 0o077:
        return (f"{path} has mode {_stat.S_IMODE(st.st_mode):04o}; it holds a "
                f"password, so only its owner may read it: run 'chmod 600 {path}'")
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot read {path}: {e}; make it one line of UTF-8 \"username:password\""
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        return f"{path} must hold one line \"username:password\""
    return None


def cli_check(args):
    """``mailsys config check``: exit 2 with every problem, or 0 with what the host will do.

    The files the server reads at start are read too (``load(check_files=True)``,
    as twistd does), so "config ok" means the server starts on it."""
    from mailsys.cli import EXIT_OK, EXIT_USAGE, CommandError, config_path

    try:
        config = load(config_path(args), check_files=True)
    except ConfigFileError as e:
        raise CommandError(str(e), EXIT_USAGE)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    for line in summary(config):
        print(line)
    return EXIT_OK


def default_workers():
    """``server.workers = 0``: one process per CPU, at most 4 (more buys little: the
    spool's group commit and the shared disk become the limit)."""
    return max(1, min(os.cpu_count() or 1, 4))


def workers(config):
    return config.server.workers or default_workers()


def outbound(relay):
    """How mail leaves, as the remote courier will send it: with smart host AUTH
    the session to the smart host is always encrypted (mailsys.couriers.remote),
    whatever outbound_tls says, so that the password never crosses in clear;
    transport entries keep outbound_tls."""
    if not relay.smarthost:
        text = f"by MX, tls {relay.outbound_tls}"
        if relay.smarthost_auth:
            text += " (smarthost_auth unused: no smarthost)"
    elif relay.smarthost_auth:
        text = f"smart host {relay.smarthost} with AUTH, tls encrypt (AUTH requires it)"
    else:
        text = f"smart host {relay.smarthost}, tls {relay.outbound_tls}"
    if relay.transport:
        text += f", {len(relay.transport)} transport entries"
        if relay.smarthost and relay.smarthost_auth:
            text += f" (tls {relay.outbound_tls})"
    return text


def summary(config):
    """One screen (under 25 lines) answering "what will this host do?" for an operator."""
    def joined(items, empty):
        return ", ".join(str(i) for i in items) if items else empty

    def file(path, missing):
        return path if os.path.exists(path) else f"{path} (missing: {missing})"

    relay, queue, limits = config.relay, config.queue, config.limits
    rows = [
        ("hostname", config.server.hostname),
        ("state_dir", config.server.state_dir),
        ("workers", f"{config.server.workers}" if config.server.workers else
         f"auto ({default_workers()} on this machine)"),
    ]
    rows += [(f"listen {f.name}", joined(getattr(config.listen, f.name), "disabled"))
             for f in fields(config.listen)]
    rows += [
        ("tls certificate", file(config.tls.certificate, "STARTTLS not offered")),
        ("tls key", file(config.tls.key, "STARTTLS not offered")),
        ("local domains", joined(config.domains.local, "(none)")),
        ("relay domains", joined(config.domains.relay, "(none)")),
        ("accounts", f"users {config.accounts.users}, aliases {config.accounts.aliases}"),
        ("mailboxes", f"{config.mailbox.default_store} under {config.mailbox.root}, quota "
         + (f"{config.mailbox.quota} bytes" if config.mailbox.quota else "unlimited")),
        ("mynetworks", joined(relay.mynetworks, "(none)")),
        ("outbound", outbound(relay)),
        ("queue", f"retry {queue.retry_min}-{queue.retry_max} s, bounce after {queue.lifetime} s, "
         "warn after " + (f"{queue.warn_after} s" if queue.warn_after else "never")),
        ("limits", f"message_size {limits.message_size}, recipients {limits.recipients}, "
         f"connections {limits.connections} ({limits.connections_per_ip} per IP)"),
        ("timeouts", f"command {limits.command_timeout} s, data {limits.data_timeout} s, "
         f"auth_failures {limits.auth_failures}"),
        ("dns", f"{joined(config.dns.nameservers, 'from /etc/resolv.conf')}, "
         f"timeout {config.dns.timeout} s"),
    ]
    return [f"config ok: {config.source}"] + [f"{label + ':':<20}{value}" for label, value in rows]
