"""POP3 attacks, each with the exact bytes: over-long lines, commands before
authentication, credentials before TLS, STLS command injection, path tricks in
user names, and password guessing (the per-IP failure throttle shared with SMTP
AUTH).

Unit part: the real factory and session (mailsys.pop3.service) over a
StringTransport, a task.Clock and a fake portal.  Integration part: a real
``twistd -n mailsys`` (one worker process, so the per-process throttle is exact)
spoken to with raw sockets.
"""
import base64
import os
import socket
import time
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.pop3.server import MAX_LINE
from mailsys.pop3.service import POP3Factory
from tests.helpers import pop3_host
from tests.integration.conftest import make_server, users_text  # noqa: F401  (fixtures)
from tests.integration.harness import LOOPBACK, pop3_tls_context, start_pop3

USER, PASSWORD = "joe@example.com", "integration test password"
NEED_TLS = b"-ERR [AUTH] Authentication requires TLS: send STLS first\r\n"
NOT_NOW = b"-ERR Command not valid in this state\r\n"
FAILED = b"-ERR [AUTH] Authentication failed\r\n"


# -- unit: the real session and factory on a fake host ------------------------------------

def fake_host(root, clock):
    return pop3_host(root, clock, {USER: None}, PASSWORD)


class TLSTransport(StringTransportWithDisconnection):
    def __init__(self):
        super().__init__()
        self.tls_started = False

    def startTLS(self, context, normal=True):
        self.tls_started = True


def connect(host, role="pop3s", ip="192.0.2.7"):
    factory = POP3Factory(host, role, run=defer.maybeDeferred)
    proto = factory.buildProtocol((IPv6Address if ":" in ip else IPv4Address)("TCP", ip, 40000))
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    t.clear()
    return proto, t


def say(proto, t, data):
    t.clear()
    proto.dataReceived(data)
    return t.value()


@pytest.fixture
def host(tmp_path):
    return fake_host(tmp_path / "mail", Clock())


def test_long_line_gets_an_error_and_changes_nothing(host):
    proto, t = connect(host)
    assert say(proto, t, b"USER " + b"a" * (MAX_LINE + 10) + b"\r\n") == b"-ERR Line too long\r\n"
    assert proto.user is None and proto.state == "AUTHORIZATION"
    # An endless line is discarded as it comes: the buffer stays bounded.
    for _ in range(100):
        assert say(proto, t, b"x" * 65536) == b""
        assert len(proto._buf) <= MAX_LINE
    assert say(proto, t, b"\r\nCAPA\r\n").startswith(b"-ERR Line too long\r\n+OK Capability list")


@pytest.mark.parametrize("command", [b"STAT", b"LIST", b"LIST 1", b"UIDL", b"RETR 1", b"TOP 1 1",
                                     b"DELE 1", b"RSET", b"NOOP", b"APOP joe@example.com x", b"LAST"])
def test_mailbox_commands_before_authentication_are_refused(host, command):
    proto, t = connect(host)
    assert say(proto, t, command + b"\r\n") == NOT_NOW
    assert proto.maildrop is None and not os.path.exists(host.config.mailbox.root)


def test_credentials_before_tls_never_reach_the_portal(host):
    proto, t = connect(host, role="pop3")
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    for line in (b"USER " + USER.encode(), b"PASS " + PASSWORD.encode(), b"AUTH PLAIN " + token,
                 b"AUTH PLAIN", b"AUTH"):
        assert say(proto, t, line + b"\r\n") == NEED_TLS
    assert host.portal.attempts == []
    capa = say(proto, t, b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" in capa and b"USER" not in capa and b"SASL" not in capa


def test_stls_injection_is_discarded(host):
    proto, t = connect(host, role="pop3")
    out = say(proto, t, f"STLS\r\nUSER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    assert out == b"+OK Begin TLS negotiation\r\n" and t.tls_started
    assert host.portal.attempts == [] and proto.user is None
    assert say(proto, t, f"PASS {PASSWORD}\r\n".encode()) == b"-ERR Send USER first\r\n"


@pytest.mark.parametrize("name", ["../joe@example.com", "joe@example.com/../../x",
                                  "joe/../../etc@example.com", "..@example.com",
                                  "joe@../../example.com", "/etc/passwd", "joe%00@example.com"])
def test_path_tricks_in_user_names_open_nothing(host, name):
    proto, t = connect(host)
    say(proto, t, f"USER {name}\r\n".encode())
    assert say(proto, t, f"PASS {PASSWORD}\r\n".encode()) == FAILED
    assert host.portal.attempts == [(name, PASSWORD)]
    assert not os.path.exists(host.config.mailbox.root)     # no directory was made


def test_failures_are_throttled_per_ip_across_connections(host):
    clock = host.clock
    proto, t = connect(host)
    for _ in range(2):
        say(proto, t, f"USER {USER}\r\n".encode())
        assert say(proto, t, b"PASS guess\r\n") == FAILED
    say(proto, t, f"USER {USER}\r\n".encode())
    assert say(proto, t, b"PASS guess\r\n").endswith(b"too many failures, closing the connection\r\n")
    assert not t.connected
    # A new connection from the same IP: even the right password waits 1 s, then 2 s ...
    proto, t = connect(host)
    say(proto, t, f"USER {USER}\r\n".encode())
    assert say(proto, t, b"PASS guess\r\n") == b""
    clock.advance(0.999)
    assert t.value() == b""
    clock.advance(0.001)
    assert t.value() == FAILED
    say(proto, t, f"USER {USER}\r\n".encode())
    assert say(proto, t, f"PASS {PASSWORD}\r\n".encode()) == b""
    clock.advance(1.999)
    assert t.value() == b""
    clock.advance(0.001)
    assert t.value().startswith(b"+OK Logged in: 0 messages")
    # ... while another IP is not slowed.
    other, ot = connect(host, ip="192.0.2.99")
    say(other, ot, f"USER {USER}\r\n".encode())
    assert say(other, ot, b"PASS guess\r\n") == FAILED


def test_ipv4_mapped_client_is_throttled_and_named_as_its_ipv4_address(host):
    """On a dual-stack tcp6 listener an IPv4 client arrives as ::ffff:a.b.c.d; the
    throttle, the connection limit, the name lookup and the log label take it as
    the IPv4 address it is, as over an IPv4 listener (docs/operations.rst)."""
    import ipaddress

    asked = []
    host.rdns = SimpleNamespace(cached=lambda ip: asked.append(ip) or "client.example.net")
    proto, t = connect(host, ip="::ffff:192.0.2.7")
    assert asked == [ipaddress.ip_address("192.0.2.7")]
    assert proto.label == proto.backend.client.label == "client.example.net[192.0.2.7]"
    assert host.limiter.per_ip == {ipaddress.ip_address("192.0.2.7"): 1}
    for _ in range(3):
        say(proto, t, f"USER {USER}\r\n".encode())
        say(proto, t, b"PASS guess\r\n")
    # The same client over an IPv4 listener is slowed by those failures.
    proto, t = connect(host, ip="192.0.2.7")
    say(proto, t, f"USER {USER}\r\n".encode())
    assert say(proto, t, b"PASS guess\r\n") == b""


def test_user_name_with_control_characters_is_not_logged_raw(host):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, t = connect(host)
        token = base64.b64encode(f"\0evil\r\ninjected: yes\0{PASSWORD}".encode())
        assert say(proto, t, b"AUTH PLAIN " + token + b"\r\n") == FAILED
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [e.get("text", "") for e in events]
    assert any("authentication failed" in x and "user=<evil??injected: yes>" in x for x in texts), texts
    assert not any(PASSWORD in x for x in texts)


# -- integration: the real server -----------------------------------------------------------

@pytest.fixture
def server(make_server):  # noqa: F811
    return start_pop3(make_server, overrides={"server": {"workers": 1}})


def raw(port, tls=False):
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    if tls:
        sock = pop3_tls_context().wrap_socket(sock)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK ")
    return sock, f


def test_real_server_refuses_auth_before_tls_and_survives_a_flood(server):
    sock, f = raw(server.pop3_port)
    try:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        sock.sendall(b"AUTH PLAIN " + token + b"\r\n")
        assert f.readline() == NEED_TLS
        sock.sendall(b"STAT\r\n")
        assert f.readline() == NOT_NOW
        sock.sendall(b"A" * 1_000_000 + b"\r\nNOOP\r\n")
        assert f.readline() == b"-ERR Line too long\r\n"
        assert f.readline() == NOT_NOW
    finally:
        sock.close()
    assert "sasl" not in server.log_text().lower() and "login user=" not in server.log_text()
    # STLS with an injected command in the same segment
    sock, f = raw(server.pop3_port)
    try:
        sock.sendall(f"STLS\r\nUSER {USER}\r\n".encode())
        assert f.readline() == b"+OK Begin TLS negotiation\r\n"
        tls = pop3_tls_context().wrap_socket(sock)
        tf = tls.makefile("rb")
        tls.sendall(f"PASS {PASSWORD}\r\n".encode())
        assert tf.readline() == b"-ERR Send USER first\r\n"
        tls.close()
    finally:
        sock.close()


def test_real_server_throttles_guessing(server):
    def attempt(password):
        sock, f = raw(server.pop3s_port, tls=True)
        try:
            sock.sendall(f"USER {USER}\r\n".encode())
            assert f.readline() == b"+OK Send your password\r\n"
            start = time.monotonic()
            sock.sendall(f"PASS {password}\r\n".encode())
            reply = f.readline()
            return reply, time.monotonic() - start
        finally:
            sock.close()

    for _ in range(3):
        reply, _ = attempt("guess")
        assert reply == FAILED
    reply, took = attempt("guess")
    assert reply == FAILED and took >= 1.0
    reply, took = attempt(PASSWORD)
    assert reply.startswith(b"+OK Logged in") and took >= 2.0
    assert server.log_text().count("pop3: warning: ") == 4
    assert PASSWORD not in server.log_text() and "guess" not in server.log_text()


# -- a client that does not read (the SMTP listeners' tests: test_resource_limits.py) --------

class _Unread(StringTransportWithDisconnection):
    """A peer that reads nothing: ``dataBuffer`` is what waits for it, and
    loseConnection waits for ever; only abortConnection ends the connection."""
    dataBuffer = b""

    def loseConnection(self):
        self.disconnecting = True

    def abortConnection(self):
        self.aborted = True
        self.protocol.connectionLost(None)


class _Quiet:
    def connected(self, proto):
        return None

    def disconnected(self, proto):
        self.gone = True


def _unread_session(idle_timeout=600):
    from mailsys.pop3.server import POP3Server

    clock = Clock()
    backend = _Quiet()
    proto = POP3Server(backend, "pop.example.com", clock=clock, tls_available=False, tls=True,
                       idle_timeout=idle_timeout, label="test[192.0.2.7]")
    t = _Unread()
    t.protocol = proto
    proto.makeConnection(t)
    return proto, t, backend, clock


def test_capa_flood_without_reading_stops_the_reading():
    proto, t, backend, clock = _unread_session()
    t.dataBuffer = b"x" * (256 * 1024 + 1)
    proto.dataReceived(b"CAPA\r\n")
    assert t.producerState == "paused"
    clock.advance(0.1)
    assert t.producerState == "paused"
    t.dataBuffer = b""
    clock.advance(0.1)
    assert t.producerState == "producing"


def test_a_closed_session_that_will_not_go_is_cut_after_the_grace_time():
    from mailsys.fastio import CLOSE_GRACE

    proto, t, backend, clock = _unread_session()
    clock.advance(600)                    # autologout
    assert t.value().endswith(b"-ERR Autologout: idle for too long\r\n")
    assert t.disconnecting and not getattr(t, "aborted", False)
    clock.advance(CLOSE_GRACE)
    assert t.aborted and backend.gone
    assert clock.getDelayedCalls() == []
