"""Shared fakes for the SMTP unit tests: a recording handler, a fake mail host
service for mailsys.receive, and helpers to drive a protocol over StringTransport
with a task.Clock (no reactor, no network, no sleeps); and what an mbox append
killed in the middle leaves, for the stores' and POP3's tests."""
import ipaddress
import os
import subprocess
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import globalLogPublisher

from mailsys import policy
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol

HOST = "mx.example.com"
QUEUED = Reply(250, "2.0.0", "Ok: queued as TESTID")

_DEFAULT = object()


def limits(**overrides):
    values = dict(message_size=10 * 1024 * 1024, recipients=100, command_timeout=300,
                  data_timeout=600, auth_failures=3)
    values.update(overrides)
    return SimpleNamespace(**values)


class FakeHandler:
    """Records every call the protocol makes, in order.

    ``answers[method]`` is what a method returns (a Reply, None, or a callable
    taking the method's arguments after ``proto`` and returning either); methods in
    ``hold`` return a Deferred instead, fired later by :meth:`release` or
    :meth:`fail`.  Body chunks are collected in ``body`` (the current message) and
    ``messages`` (every message that reached data_end); chunk boundaries are kept
    out of ``calls`` so a recording does not depend on segmentation.
    """

    def __init__(self):
        self.calls = []
        self.answers = {}
        self.hold = set()
        self.held = []
        self.body = bytearray()
        self.chunks = []
        self.messages = []
        self.aborts = []
        self.protocol = None

    def _result(self, method, *args):
        value = self.answers.get(method, _DEFAULT)
        if value is _DEFAULT:
            value = QUEUED if method == "data_end" else None
        elif callable(value):
            value = value(*args)
        if method in self.hold:
            d = defer.Deferred()
            self.held.append((method, d, value))
            return d
        return value

    def _take(self, method):
        for i, (m, d, value) in enumerate(self.held):
            if method is None or m == method:
                del self.held[i]
                return d, value
        raise AssertionError(f"nothing held for {method}")

    def release(self, method=None, value=_DEFAULT):
        d, held_value = self._take(method)
        d.callback(held_value if value is _DEFAULT else value)

    def fail(self, method=None, exc=None):
        d, _ = self._take(method)
        d.errback(exc or RuntimeError("handler failed"))

    # -- the handler contract -------------------------------------------------

    def connected(self, proto):
        self.protocol = proto
        self.calls.append(("connected",))
        return self._result("connected")

    def helo(self, proto, name, esmtp):
        self.calls.append(("helo", name, esmtp))
        return self._result("helo", name, esmtp)

    def etrn(self, proto, domain):
        self.calls.append(("etrn", domain))
        return self._result("etrn", domain)

    def mail(self, proto, txn):
        sender = str(txn.sender) if txn.sender is not None else ""
        self.calls.append(("mail", sender, txn.params.as_dict()))
        return self._result("mail", sender, txn.params)

    def rcpt(self, proto, txn, rcpt, params):
        self.calls.append(("rcpt", str(rcpt), params.as_dict()))
        return self._result("rcpt", str(rcpt), params)

    def data(self, proto, txn):
        self.body = bytearray()
        self.calls.append(("data", [str(m) for m, _ in txn.recipients]))
        return self._result("data")

    def data_chunk(self, proto, txn, chunk):
        assert isinstance(chunk, bytes)
        self.chunks.append(chunk)
        self.body += chunk

    def data_abort(self, proto, txn, refusal):
        self.calls.append(("data_abort", None if refusal is None else refusal.to_bytes()))
        self.aborts.append(refusal)

    def data_end(self, proto, txn, size):
        self.calls.append(("data_end", size, [str(m) for m, _ in txn.recipients]))
        self.messages.append(bytes(self.body))
        return self._result("data_end", size)

    def disconnected(self, proto):
        self.calls.append(("disconnected",))

    def client_name(self, proto):
        return "client.example[192.0.2.1]"


def connect(handler=None, *, limits_=None, clock=None, lmtp=False, hostname=HOST, **kw):
    """A protocol connected to a StringTransportWithDisconnection; returns
    (proto, transport, handler, clock)."""
    handler = handler if handler is not None else FakeHandler()
    clock = clock if clock is not None else Clock()
    proto = SMTPServerProtocol(handler, hostname, limits=limits_ or limits(), clock=clock,
                               lmtp=lmtp, **kw)
    transport = StringTransportWithDisconnection()
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport, handler, clock


def take(transport):
    """What the server wrote since the last call."""
    out = transport.value()
    transport.clear()
    return out


def feed(proto, data, *cuts):
    """Deliver ``data`` in segments cut at the given offsets."""
    last = 0
    for cut in list(cuts) + [len(data)]:
        if cut > last:
            proto.dataReceived(data[last:cut])
        last = max(last, cut)


def feed_bytewise(proto, data):
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])


def lines(replies):
    """Split reply bytes into CRLF-terminated lines (the terminator kept)."""
    out = []
    while replies:
        i = replies.index(b"\r\n") + 2
        out.append(replies[:i])
        replies = replies[i:]
    return out


# -- a fake mail host for mailsys.receive ----------------------------------------

class FakeAccounts:
    def __init__(self, addresses=()):
        self.addresses = set(addresses)
        self.asked = []

    def accepts(self, address):
        self.asked.append(address)
        return address in self.addresses


class FakeRDNS:
    def __init__(self, names=None, default="client.example.net"):
        self.names = dict(names or {})
        self.default = default
        self.lookups = []

    def cached(self, ip):
        return self.names.get(ip, self.default)

    def lookup(self, ip):
        self.lookups.append(ip)
        return defer.succeed(self.names.get(ip, "unknown"))


class FakeWriter:
    """Stands in for spool.MessageWriter: keeps the bytes and the first 64 KiB."""

    def __init__(self, queue_id):
        self.queue_id = queue_id
        self.data = bytearray()
        self.head = b""
        self.size = 0
        self.discarded = False

    def write(self, chunk):
        assert not self.discarded
        self.data += chunk
        self.size += len(chunk)
        if len(self.head) < 65536:
            self.head += chunk[:65536 - len(self.head)]

    def discard(self):
        self.discarded = True


class FakeIds:
    def __init__(self, prefix="QID"):
        self.prefix = prefix
        self.n = 0

    def next(self):
        self.n += 1
        return f"{self.prefix}{self.n}"


class FakeSpool:
    """new_message() gives FakeWriters; commit() returns a Deferred the test fires."""

    def __init__(self):
        self.ids = FakeIds()
        self.writers = []
        self.commits = []      # [(writer, envelope, Deferred)]

    def new_message(self, queue_id=None):
        w = FakeWriter(queue_id or self.ids.next())
        self.writers.append(w)
        return w

    def commit(self, writer, envelope):
        d = defer.Deferred()
        self.commits.append((writer, envelope, d))
        return d

    def succeed(self, index=-1):
        writer, envelope, d = self.commits[index]
        d.callback(SimpleNamespace(queue_id=writer.queue_id, message_size=writer.size,
                                   envelope=envelope))

    def fail(self, exc, index=-1):
        self.commits[index][2].errback(exc)


class FakeLimiter:
    def __init__(self, admit=True):
        self.admit = admit
        self.held = []

    def acquire(self, ip):
        if not self.admit:
            return False
        self.held.append(ip)
        return True

    def release(self, ip):
        self.held.remove(ip)


class FakeService:
    """What ReceiveHandler needs of mailsys.tap.MailHost, with the real policy."""

    def __init__(self, *, local=("example.com",), relay=("relay.example",),
                 users=("alice@example.com",), mynetworks=("127.0.0.0/8", "10.0.0.0/8", "::1/128"),
                 rdns=None, hostname=HOST, **limit_overrides):
        self.clock = Clock()
        self.local_domains = frozenset(local)
        self.relay_domains = frozenset(relay)
        self.mynetworks = tuple(ipaddress.ip_network(n) for n in mynetworks)
        self.accounts = FakeAccounts(users)
        self.rdns = rdns or FakeRDNS()
        self.spool = FakeSpool()
        self.limiter = FakeLimiter()
        self.tls = None
        self.config = SimpleNamespace(
            server=SimpleNamespace(hostname=hostname, state_dir="/nonexistent"),
            domains=SimpleNamespace(local=tuple(local), relay=tuple(relay)),
            relay=SimpleNamespace(mynetworks=self.mynetworks),
            limits=limits(**limit_overrides),
        )

    def may_relay(self, ip):
        return policy.client_may_relay(ip, self.mynetworks)


def receive_connect(service, ip="203.0.113.9", port=40000, role="mta"):
    """A ReceiveFactory protocol for a client at ``ip``; returns (proto, transport)."""
    from mailsys.receive import ReceiveFactory

    if ":" in ip:
        addr = IPv6Address("TCP", ip, port)
    else:
        addr = IPv4Address("TCP", ip, port)
    proto = ReceiveFactory(service, role).buildProtocol(addr)
    transport = StringTransportWithDisconnection()
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


class SyncOffload:
    """mailsys.offload.Offload that runs the work at once, in the caller's thread."""

    def __init__(self, reactor=None, name=None):
        self.started = False

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def run(self, f, *args):
        try:
            return defer.succeed(f(*args))
        except BaseException:
            return defer.fail()


def write_host_config(tmp_path, workers=1, mta=(), lmtp=(), extra=""):
    """A small mailsys.toml under ``tmp_path`` (state, accounts and TLS files
    there too, no listeners unless given); returns its path."""
    def toml_list(items):
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    path = tmp_path / "mailsys.toml"
    path.write_text(f"""
[server]
state_dir = "{tmp_path / 'state'}"
workers = {workers}
[listen]
mta = {toml_list(mta)}
submission = []
submissions = []
lmtp = {toml_list(lmtp)}
pop3 = []
pop3s = []
[tls]
certificate = "{tmp_path / 'none.pem'}"
key = "{tmp_path / 'none.key'}"
[accounts]
users = "{tmp_path / 'users'}"
aliases = "{tmp_path / 'aliases'}"
{extra}""")
    return str(path)


# -- an mbox append killed in the middle (tests/test_stores.py, tests/test_pop3_mailbox.py)

def dead_pid():
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def leave_stale_lock(mbox_path, content):
    """What a holder killed long ago leaves: ``MBOX.lock`` holding ``content``,
    older than mailsys.mda.mbox.STALE_DOTLOCK."""
    with open(mbox_path + ".lock", "wb") as f:
        f.write(content)
    old = os.path.getmtime(mbox_path + ".lock") - 301
    os.utime(mbox_path + ".lock", (old, old))


def append_note(pid, *numbers):
    """A dotlock's content as an append of mailsys.mda.mbox writes it."""
    return b"%d\nmailsys-append %s\n" % (pid, b" ".join(b"%d" % n for n in numbers))


@pytest.fixture
def logged():
    """Every log event emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- POP3: the real session and factory (mailsys.pop3.service) on a fake host --------------

class PopPortal:
    """twisted.cred's portal as the POP3 session uses it: ``accounts`` log in
    with ``password``."""

    def __init__(self, accounts, password):
        self.accounts, self.password = accounts, password
        self.attempts = []

    def login(self, creds, mind, iface):
        from twisted.cred.error import UnauthorizedLogin

        from mailsys.auth import IMailUser

        assert iface is IMailUser
        self.attempts.append((creds.username, creds.password))
        if creds.username in self.accounts and creds.password == self.password:
            return defer.succeed((IMailUser, creds.username, lambda: None))
        return defer.fail(UnauthorizedLogin())


class PopAccounts:
    def __init__(self, stores):
        self.stores = stores    # address -> "maildir", "mbox" or None (the default store)

    def user(self, address):
        if address not in self.stores:
            return None
        return SimpleNamespace(address=address, store=self.stores[address])


def pop3_host(root, clock, stores, password):
    """What mailsys.pop3.service needs of the host: mail under ``root``, the
    accounts of ``stores`` (address -> store) with one ``password``."""
    from mailsys.auth import FailureThrottle
    from mailsys.receive import ConnectionLimiter

    return SimpleNamespace(
        config=SimpleNamespace(server=SimpleNamespace(hostname="pop.example.com"),
                               mailbox=SimpleNamespace(root=str(root), default_store="maildir"),
                               limits=SimpleNamespace(auth_failures=3)),
        clock=clock, reactor=clock, tls=SimpleNamespace(available=True),
        limiter=ConnectionLimiter(100, 10), auth_throttle=FailureThrottle(clock),
        portal=PopPortal(stores, password), accounts=PopAccounts(stores),
        rdns=SimpleNamespace(cached=lambda ip: None))
