"""STARTTLS command injection (CVE-2011-0411, the "NO STARTTLS" class).

A man in the middle appends commands to the client's STARTTLS in the same TCP
segment; a vulnerable server reads them from its clear-text buffer and executes
them *inside* the TLS session, as if the client had sent them encrypted.  RFC 3207
section 4.2 requires the server to discard everything received before the TLS
handshake and to forget the session: a new EHLO is needed.

Unit part: the protocol on a StringTransport whose ``startTLS`` is recorded; after
the call, what the fake transport delivers stands for decrypted bytes.
Integration part: a real ``twistd -n mailsys`` on loopback, a raw socket, one
segment ``EHLO x\\r\\nSTARTTLS\\r\\nRSET\\r\\n``, then a real TLS handshake.
"""
import re
import socket
import ssl

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.receive import ReceiveFactory
from mailsys.smtp.server import SMTPServerProtocol
from tests.helpers import FakeHandler, FakeService, limits, take
from tests.integration.conftest import make_server, users_text  # noqa: F401  (fixtures)
from tests.integration.harness import HOSTNAME, LOOPBACK, tls_server

HOST = "mx.example.com"
BANNER = b"220 mx.example.com ESMTP\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
TLS_ACTIVE = b"554 5.5.1 Error: TLS already active\r\n"


class TLSTransport(StringTransportWithDisconnection):
    def __init__(self):
        super().__init__()
        self.tls_starts = []

    def startTLS(self, context, normal=True):
        self.tls_starts.append((context, len(self.value())))


class Handler(FakeHandler):
    CONTEXT = object()

    def tls_context(self, proto):
        return self.CONTEXT

    def authenticate(self, proto, user, password):
        self.calls.append(("authenticate", user, password))
        return user


def connect(mechanisms=("PLAIN", "LOGIN")):
    h = Handler()
    proto = SMTPServerProtocol(h, HOST, limits=limits(), clock=Clock(), tls_available=True,
                               auth_mechanisms=mechanisms)
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    assert take(t) == BANNER
    proto.dataReceived(b"EHLO client.example\r\n")
    assert take(t).endswith(b"250 HELP\r\n")
    return proto, t, h


INJECTED = [
    b"RSET\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"MAIL FROM:<attacker@evil.example>\r\nRCPT TO:<victim@example.com>\r\n",
    b"EHLO evil.example\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==\r\n",
    b"STARTTLS\r\n",
    b"HELP\r\n",
    b"RSET",                     # not even a complete line
]


@pytest.mark.parametrize("injected", INJECTED, ids=[repr(i) for i in INJECTED])
@pytest.mark.parametrize("mechanisms", [("PLAIN", "LOGIN"), ()], ids=["submission", "mta"])
def test_injected_commands_after_starttls_are_discarded(injected, mechanisms):
    proto, t, h = connect(mechanisms)
    calls_before = list(h.calls)
    proto.dataReceived(b"STARTTLS\r\n" + injected)
    # exactly one reply: the 220, and TLS was started right after it
    assert t.value() == READY
    assert t.tls_starts == [(Handler.CONTEXT, len(READY))]
    # the injected commands never reached the handler or the counters
    assert h.calls == calls_before
    assert set(proto.stats.total) == {"ehlo", "starttls"}
    assert t.connected
    take(t)
    # "inside TLS" the session starts over: the injected EHLO/MAIL/AUTH left no trace
    assert proto.helo is None and proto.txn is None and proto.auth_user is None
    proto.dataReceived(b"MAIL FROM:<a@b>\r\nRCPT TO:<victim@example.com>\r\n")
    assert take(t) == NEED_HELO + NEED_MAIL
    assert not any(c[0] in ("mail", "rcpt", "authenticate") for c in h.calls)


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n"])
def test_injection_in_the_same_segment_as_ehlo(injected):
    h = Handler()
    proto = SMTPServerProtocol(h, HOST, limits=limits(), clock=Clock(), tls_available=True,
                               auth_mechanisms=("PLAIN", "LOGIN"))
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    take(t)
    proto.dataReceived(b"EHLO client.example\r\nSTARTTLS\r\n" + injected)
    out = t.value()
    assert out.endswith(b"250 HELP\r\n" + READY)
    assert out.count(b"\r\n") == 10     # the 9 EHLO lines and the 220, nothing for the injection
    assert len(t.tls_starts) == 1 and t.tls_starts[0][1] == len(out)
    assert [c[0] for c in h.calls] == ["connected", "helo"]


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n"])
def test_injection_while_the_ehlo_answer_is_pending(injected):
    """Pipelined behind a slow EHLO: buffered, then still discarded at STARTTLS."""
    h = Handler()
    h.hold.add("helo")
    proto = SMTPServerProtocol(h, HOST, limits=limits(), clock=Clock(), tls_available=True,
                               auth_mechanisms=("PLAIN", "LOGIN"))
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    take(t)
    proto.dataReceived(b"EHLO client.example\r\n")
    proto.dataReceived(b"STARTTLS\r\n")
    proto.dataReceived(injected)
    assert t.value() == b"" and t.tls_starts == []
    h.release("helo")
    out = t.value()
    assert out.endswith(b"250 HELP\r\n" + READY)
    assert out.count(b"\r\n") == 10
    assert len(t.tls_starts) == 1
    assert [c[0] for c in h.calls] == ["connected", "helo"]


def test_starttls_inside_tls_is_refused():
    proto, t, h = connect()
    proto.dataReceived(b"STARTTLS\r\n")
    take(t)
    proto.dataReceived(b"EHLO client.example\r\nSTARTTLS\r\nNOOP\r\n")
    out = take(t)
    assert out.endswith(b"250 HELP\r\n" + TLS_ACTIVE + b"250 2.0.0 Ok\r\n")
    assert len(t.tls_starts) == 1


# -- the same through mailsys.receive (the real handler of the mta and submission roles) --

class FakeTLS:
    available = True


@pytest.mark.parametrize("role", ["mta", "submission"])
@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n",
                                      b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@example.com>\r\n"])
def test_receive_handler_discards_injection(role, injected):
    svc = FakeService()
    svc.tls = FakeTLS()
    proto = ReceiveFactory(svc, role).buildProtocol(IPv4Address("TCP", "203.0.113.7", 40000))
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO client.example\r\n")
    assert b"250-STARTTLS\r\n" in take(t)
    proto.dataReceived(b"STARTTLS\r\n" + injected)
    assert take(t) == READY
    assert [c[0] is svc.tls for c in t.tls_starts] == [True]
    assert svc.spool.ids.n == 0           # no MAIL was accepted (it would take a queue ID)
    assert svc.accounts.asked == []       # no RCPT was looked at
    proto.dataReceived(b"RCPT TO:<alice@example.com>\r\n")
    assert take(t) == NEED_MAIL


# -- integration: a real server, a raw socket, real TLS ------------------------------------

def recv_until(sock, pattern, limit=65536, timeout=10.0):
    """Read until ``pattern`` (bytes regex) matches the end of what was read."""
    data = b""
    sock.settimeout(timeout)
    rx = re.compile(pattern)
    while not rx.search(data):
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed; got {data!r}")
        data += chunk
        assert len(data) < limit, data
    return data


def reply(sock):
    """One complete (possibly multi-line) reply."""
    return recv_until(sock, rb"(?:^|\n)\d{3} [^\r\n]*\r\n\Z")


def ehlo_lines(role):
    kw = ["PIPELINING", "SIZE 26214400"]
    if role == "submission":
        kw.append("AUTH PLAIN LOGIN")
    kw += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "DSN"]
    kw += ["ETRN", "HELP"] if role == "mta" else ["HELP"]
    lines = [HOSTNAME] + kw
    return "".join(f"250{' ' if i == len(lines) - 1 else '-'}{k}\r\n"
                   for i, k in enumerate(lines)).encode()


def client_tls():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def tls_mailsys(make_server):  # noqa: F811  (make_server is the imported fixture)
    return tls_server(make_server, roles=("submission",))


def _port(server, role):
    return server.port if role == "mta" else server.submission_port


@pytest.mark.integration
@pytest.mark.parametrize("role", ["mta", "submission"])
@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<a@b.example>\r\n"],
                         ids=["RSET", "MAIL"])
def test_real_server_discards_injected_commands(tls_mailsys, role, injected):
    server = tls_mailsys
    sock = socket.create_connection((LOOPBACK, _port(server, role)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        banner = reply(sock)
        assert banner == f"220 {HOSTNAME} ESMTP\r\n".encode()
        # one send, one segment: the injection rides along with STARTTLS
        sock.sendall(b"EHLO x.example\r\nSTARTTLS\r\n" + injected)
        clear = recv_until(sock, rb"220 2\.0\.0 [^\r\n]*\r\n\Z")
        # the EHLO reply, then the 220, and nothing for the injected command
        assert clear.endswith(b"250 HELP\r\n" + READY), clear
        assert b"250-STARTTLS\r\n" in clear
        # a reply to the injected command may follow in the clear: give it time to arrive
        sock.settimeout(0.5)
        try:
            extra = sock.recv(4096, socket.MSG_PEEK)
        except (socket.timeout, TimeoutError):
            extra = b""
        assert extra == b"", f"clear text after the 220: {extra!r}"
        sock.settimeout(10)
        tls = client_tls().wrap_socket(sock, server_hostname=None)
        sock = tls
        # inside TLS nothing comes before we speak
        tls.settimeout(1.0)
        with pytest.raises((socket.timeout, TimeoutError)):
            got = tls.recv(4096)
            raise AssertionError(f"the server sent {got!r} inside TLS before any command")
        tls.settimeout(10)
        tls.sendall(b"EHLO x.example\r\n")
        assert reply(tls) == ehlo_lines(role)
        tls.sendall(b"RCPT TO:<joe@example.com>\r\n")
        assert reply(tls) == NEED_MAIL
        tls.sendall(b"STARTTLS\r\n")
        assert reply(tls) == TLS_ACTIVE
        tls.sendall(b"QUIT\r\n")
        assert reply(tls) == b"221 2.0.0 Bye\r\n"
    finally:
        sock.close()
    # the server's own account of the session: no RSET, no MAIL was ever executed
    m = server.wait_for_log(r"disconnect from \S+ (ehlo=2 starttls=1/2 .*)$")
    counts = m.group(1)
    assert "rset" not in counts and "mail" not in counts, counts
    assert server.spool() == []


@pytest.mark.integration
@pytest.mark.parametrize("role", ["mta", "submission"])
def test_real_server_starttls_then_new_ehlo_required(tls_mailsys, role):
    server = tls_mailsys
    sock = socket.create_connection((LOOPBACK, _port(server, role)), timeout=10)
    try:
        reply(sock)
        sock.sendall(b"EHLO x.example\r\n")
        assert b"250-STARTTLS\r\n" in reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert reply(sock) == READY
        sock = client_tls().wrap_socket(sock, server_hostname=None)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        sock.sendall(b"MAIL FROM:<joe@example.com>\r\n")
        assert reply(sock) == NEED_HELO
        sock.sendall(b"EHLO x.example\r\n")
        assert reply(sock) == ehlo_lines(role)
        sock.sendall(b"QUIT\r\n")
        assert reply(sock) == b"221 2.0.0 Bye\r\n"
    finally:
        sock.close()
