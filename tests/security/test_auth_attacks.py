"""Attacks on SMTP AUTH: huge lines, NUL bytes and garbage in the SASL exchange,
password guessing (per-connection limit, per-IP throttle across connections), and
passwords leaking into logs or the process list.

Unit tests drive the protocol and mailsys.receive on StringTransport and
task.Clock; the integration tests (marked) run a real ``twistd -n mailsys`` on
loopback with a self-signed certificate.
"""
import base64
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface import implementer

from mailsys.auth import FailureThrottle, MailRealm
from mailsys.receive import ReceiveFactory
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from tests.helpers import FakeHandler, FakeService, limits, take
from tests.integration.conftest import make_server, users_text  # noqa: F401  (fixtures)
from tests.integration.harness import LOOPBACK, child_env, tls_server

USER = "alice@example.com"
SECRET = "s3cret-Unit-Password"
LINE_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
RESPONSE_TOO_LONG = b"500 5.5.6 Authentication exchange line is too long\r\n"
UNDECODABLE = b"501 5.5.2 Cannot decode response\r\n"
BAD_SYNTAX = b"501 5.5.2 Invalid authentication exchange syntax\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
CHALLENGE = b"334 \r\n"
OK = b"250 2.0.0 Ok\r\n"


def b64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


PLAIN_OK = b64(f"\0{USER}\0{SECRET}")


class Handler(FakeHandler):
    def tls_context(self, proto):
        return None

    def authenticate(self, proto, user, password):
        self.calls.append(("authenticate", user, password))
        if (user, password) == (USER, SECRET):
            return user
        return Reply(535, "5.7.8", "Authentication credentials invalid")


def session(**limit_overrides):
    h = Handler()
    proto = SMTPServerProtocol(h, "mx.example.com", limits=limits(**limit_overrides), clock=Clock(),
                               auth_mechanisms=("PLAIN", "LOGIN"))
    proto.tls = True
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO attacker.example\r\n")
    assert take(t).endswith(b"250 HELP\r\n")
    return proto, t, h


def feed_in_pieces(proto, data, size):
    for i in range(0, len(data), size):
        proto.dataReceived(data[i:i + size])


# -- huge lines ----------------------------------------------------------------------------

@pytest.mark.parametrize("piece", [200_000, 1024, 4096, 65536])
def test_auth_command_line_of_100_kb(piece):
    proto, t, h = session()
    line = b"AUTH PLAIN " + b"QUFB" * 25_600 + b"\r\n"          # 102 411 bytes
    feed_in_pieces(proto, line, piece)
    assert take(t) == LINE_TOO_LONG
    assert not any(c[0] == "authenticate" for c in h.calls)
    # the session survives and still authenticates
    proto.dataReceived(b"NOOP\r\nAUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert take(t) == OK + AUTH_OK
    assert t.connected


@pytest.mark.parametrize("piece", [200_000, 1000, 8192])
def test_sasl_response_line_of_100_kb(piece):
    proto, t, h = session()
    proto.dataReceived(b"AUTH PLAIN\r\n")
    assert take(t) == CHALLENGE
    feed_in_pieces(proto, b"QUFB" * 25_600 + b"\r\n", piece)
    assert take(t) == RESPONSE_TOO_LONG
    proto.dataReceived(b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n")
    assert take(t) == b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
    feed_in_pieces(proto, b"A" * 100_000 + b"\r\n", piece)
    assert take(t) == RESPONSE_TOO_LONG
    proto.dataReceived(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert take(t) == AUTH_OK
    assert [c for c in h.calls if c[0] == "authenticate"] == [("authenticate", USER, SECRET)]


def test_a_stream_without_newline_is_not_buffered_without_bound():
    proto, t, h = session()
    proto.dataReceived(b"AUTH PLAIN\r\n")
    take(t)
    for _ in range(200):                        # 3.2 MB without a line end
        proto.dataReceived(b"A" * 16384)
        assert len(proto._buf) <= 16384 + 2048
    proto.dataReceived(b"\r\n")
    assert take(t) == RESPONSE_TOO_LONG


# -- NUL bytes, non-base64, PLAIN with the wrong number of NULs ------------------------------------

@pytest.mark.parametrize("line,expected", [
    (b"AUTH PLAIN \x00\x00\x00\x00", UNDECODABLE),
    (b"AUTH PLAIN AAAA\x00", UNDECODABLE),
    (b"AUTH PLAIN " + b64(b"\0"), BAD_SYNTAX),                              # one NUL
    (b"AUTH PLAIN " + b64(f"{USER}\0{SECRET}"), BAD_SYNTAX),                 # one NUL
    (b"AUTH PLAIN " + b64(f"\0{USER}\0{SECRET}\0"), BAD_SYNTAX),             # three NULs
    (b"AUTH PLAIN " + b64(f"\0{USER}\0{SECRET}\0\0"), BAD_SYNTAX),           # four NULs
    (b"AUTH PLAIN " + b64(b"\0\0\0\0"), BAD_SYNTAX),                         # four NULs only
    (b"AUTH PLAIN " + b64(f"\0{USER}\0se\0cret"), BAD_SYNTAX),               # NUL in the password
    (b"AUTH PLAIN %%%%", UNDECODABLE),
    (b"AUTH PLAIN " + PLAIN_OK[:-1], UNDECODABLE),
    (b"AUTH PLAIN " + PLAIN_OK + b"=", UNDECODABLE),
    (b"AUTH PLAIN -" + PLAIN_OK[1:], UNDECODABLE),
    (b"AUTH LOGIN " + b64(b"al\0ice"), BAD_SYNTAX),
    (b"AUTH LOGIN \x00", UNDECODABLE),
], ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else None)
def test_garbage_in_the_auth_line(line, expected):
    proto, t, h = session()
    proto.dataReceived(line + b"\r\n")
    assert take(t) == expected
    assert not any(c[0] == "authenticate" for c in h.calls)
    proto.dataReceived(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert take(t) == AUTH_OK


@pytest.mark.parametrize("response,expected", [
    (b"\x00", UNDECODABLE), (b"\x00\x00\x00\x00", UNDECODABLE), (b"AA\x00A", UNDECODABLE),
    (b"\xff\xfe\xfd\xfc", UNDECODABLE), (b"\xc3\xa9\xc3\xa9", UNDECODABLE),
    (b64(b"\0"), BAD_SYNTAX), (b64(b"\0\0\0\0"), BAD_SYNTAX), (b64(f"a\0{USER}\0b\0c"), BAD_SYNTAX),
    (b64(f"{USER}\0{SECRET}"), BAD_SYNTAX), (b"=", BAD_SYNTAX),
])
def test_garbage_in_the_plain_response(response, expected):
    proto, t, h = session()
    proto.dataReceived(b"AUTH PLAIN\r\n")
    assert take(t) == CHALLENGE
    proto.dataReceived(response + b"\r\n")
    assert take(t) == expected
    proto.dataReceived(b"NOOP\r\n")
    assert take(t) == OK


def test_garbage_alone_closes_after_the_error_budget_not_before():
    """Garbage spends the general error budget (10), not the AUTH failure count."""
    proto, t, h = session(auth_failures=3)
    for i in range(9):
        proto.dataReceived(b"AUTH PLAIN !!!!\r\n")
        assert take(t) == UNDECODABLE
    assert t.connected and proto.auth_failures == 0
    proto.dataReceived(b"AUTH PLAIN !!!!\r\n")
    assert take(t) == UNDECODABLE + b"421 4.7.0 mx.example.com Error: too many errors\r\n"
    assert not t.connected


# -- password guessing: the per-IP throttle (mailsys.auth.FailureThrottle) -----------------------

def test_throttle_first_failures_are_free_then_doubling_to_the_ceiling():
    clock = Clock()
    th = FailureThrottle(clock)                      # free=3, base=1, ceiling=30
    ip = "192.0.2.1"
    delays = []
    for _ in range(10):
        delays.append(th.delay(ip))
        th.failed(ip)
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]
    assert th.delay("192.0.2.2") == 0               # another IP is not affected


def test_throttle_success_forgives_and_the_window_expires():
    clock = Clock()
    th = FailureThrottle(clock)
    for _ in range(5):
        th.failed("192.0.2.1")
        th.failed("192.0.2.3")
    assert th.delay("192.0.2.1") == 4
    th.succeeded("192.0.2.1")
    assert th.delay("192.0.2.1") == 0
    clock.advance(899)
    assert th.delay("192.0.2.3") == 4
    clock.advance(2)                                 # 15 minutes after the last failure
    assert th.delay("192.0.2.3") == 0


def test_throttle_wait_fires_after_the_penalty():
    clock = Clock()
    th = FailureThrottle(clock)
    for _ in range(4):
        th.failed("192.0.2.1")
    fired = []
    th.wait("192.0.2.1").addCallback(fired.append)
    clock.advance(1.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]
    done = []
    th.wait("192.0.2.9").addCallback(done.append)
    assert done == [None]


@implementer(ICredentialsChecker)
class DictChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, users):
        self.users = users

    def requestAvatarId(self, creds):
        if self.users.get(creds.username) == creds.password:
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin())


class ThrottledService(FakeService):
    """FakeService plus what ReceiveHandler.authenticate needs: a portal and a throttle."""

    def __init__(self):
        super().__init__(users=(USER,))
        checker = DictChecker({USER: SECRET})
        self.portal = portal.Portal(MailRealm(), [checker])
        self.auth_throttle = FailureThrottle(self.clock)

    def connect(self, ip, role="submissions"):
        proto = ReceiveFactory(self, role).buildProtocol(IPv4Address("TCP", ip, 40000))
        t = StringTransportWithDisconnection()
        t.protocol = proto
        proto.makeConnection(t)
        proto.dataReceived(b"EHLO guesser.example\r\n")
        assert b"250-AUTH PLAIN LOGIN\r\n" in take(t)
        return proto, t


def test_failures_across_connections_are_slowed_down_per_ip():
    svc = ThrottledService()
    wrong = b"AUTH PLAIN " + b64(f"\0{USER}\0guess") + b"\r\n"
    # three connections with one failure each: answered at once
    for _ in range(3):
        proto, t = svc.connect("203.0.113.5")
        proto.dataReceived(wrong)
        assert take(t) == INVALID
        proto.dataReceived(b"QUIT\r\n")
    # the fourth attempt from that IP waits one second before it is even checked
    proto, t = svc.connect("203.0.113.5")
    proto.dataReceived(wrong + b"NOOP\r\n")
    assert take(t) == b""
    svc.clock.advance(0.99)
    assert take(t) == b""
    svc.clock.advance(0.01)
    assert take(t) == INVALID + OK
    # the next one two seconds, whatever its outcome: even the right password waits
    proto.dataReceived(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    svc.clock.advance(1.99)
    assert take(t) == b""
    svc.clock.advance(0.01)
    assert take(t) == AUTH_OK
    # success forgave the IP
    proto2, t2 = svc.connect("203.0.113.5")
    proto2.dataReceived(wrong)
    assert take(t2) == INVALID
    # meanwhile another IP was never slowed down
    other, t3 = svc.connect("198.51.100.7")
    other.dataReceived(wrong)
    assert take(t3) == INVALID


def test_per_connection_limit_with_the_real_handler():
    svc = ThrottledService()
    svc.config.limits.auth_failures = 2
    proto, t = svc.connect("203.0.113.8")
    wrong = b"AUTH PLAIN " + b64("\0nobody@example.com\0guess") + b"\r\n"
    proto.dataReceived(wrong)
    assert take(t) == INVALID
    proto.dataReceived(wrong + b"NOOP\r\n")
    assert take(t) == INVALID + b"421 4.7.0 mx.example.com Error: too many failed authentications\r\n"
    assert not t.connected


# -- integration: the password never reaches the log or the process list ------------------------

PASSWORD = "Corr3ct-Horse-Log-Canary"
WRONG = "Wr0ng-Guess-Log-Canary"


def secrets_of(*passwords):
    """Each password and the forms it travels in: PLAIN and LOGIN base64."""
    forms = []
    for pw in passwords:
        forms += [pw, b64(pw).decode(), b64(f"\0canary@example.com\0{pw}").decode(),
                  b64(f"canary@example.com\0canary@example.com\0{pw}").decode()]
    return forms


class Wire:
    """An implicit-TLS client socket that hands out one complete reply at a time."""

    def __init__(self, port, timeout=30):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(socket.create_connection((LOOPBACK, port), timeout=timeout))
        self.buf = b""

    def sendall(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()


_LAST_LINE = re.compile(rb"\d{3} [^\r\n]*\r\n")


def reply(wire):
    """The next complete (possibly multi-line) reply."""
    while True:
        pos = 0
        while True:
            end = wire.buf.find(b"\r\n", pos)
            if end < 0:
                break
            if _LAST_LINE.match(wire.buf, pos) and wire.buf[pos + 3:pos + 4] == b" ":
                out, wire.buf = wire.buf[:end + 2], wire.buf[end + 2:]
                return out
            pos = end + 2
        chunk = wire.sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed; got {wire.buf!r}")
        wire.buf += chunk


@pytest.mark.integration
def test_passwords_never_reach_the_log(make_server):  # noqa: F811
    server = tls_server(make_server, {"limits": {"auth_failures": 5}}, roles=("submissions",))
    p = server.mailsys_cli("user", "add", "canary@example.com", "--password-stdin",
                           input=PASSWORD + "\n")
    assert p.returncode == 0, p.stderr
    assert PASSWORD not in p.stdout + p.stderr
    time.sleep(1.2)                        # the users file is re-read at most once a second
    user = "canary@example.com"
    sock = Wire(server.submissions_port)
    try:
        assert reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO canary.example\r\n")
        assert b"250-AUTH PLAIN LOGIN\r\n" in reply(sock)
        # a wrong password by PLAIN
        sock.sendall(b"AUTH PLAIN " + b64(f"\0{user}\0{WRONG}") + b"\r\n")
        assert reply(sock) == INVALID
        # a wrong password by LOGIN
        sock.sendall(b"AUTH LOGIN\r\n")
        assert reply(sock) == b"334 VXNlcm5hbWU6\r\n"
        sock.sendall(b64(user) + b"\r\n")
        assert reply(sock) == b"334 UGFzc3dvcmQ6\r\n"
        sock.sendall(b64(WRONG) + b"\r\n")
        assert reply(sock) == INVALID
        # a malformed exchange carrying the password (four NULs)
        sock.sendall(b"AUTH PLAIN " + b64(f"\0{user}\0{PASSWORD}\0\0") + b"\r\n")
        assert reply(sock) == BAD_SYNTAX
        # an authzid mismatch carrying the password
        sock.sendall(b"AUTH PLAIN " + b64(f"joe@example.com\0{user}\0{PASSWORD}") + b"\r\n")
        assert reply(sock) == INVALID
        sock.sendall(b"QUIT\r\n")
        reply(sock)
    finally:
        sock.close()
    sock = Wire(server.submissions_port)
    try:
        reply(sock)
        sock.sendall(b"EHLO canary.example\r\nAUTH LOGIN " + b64(user) + b"\r\n")
        assert reply(sock).endswith(b"250 HELP\r\n")
        assert reply(sock) == b"334 UGFzc3dvcmQ6\r\n"
        sock.sendall(b64(PASSWORD) + b"\r\n")
        assert reply(sock) == AUTH_OK
        sock.sendall(b"QUIT\r\n")
        reply(sock)
    finally:
        sock.close()
    server.wait_for_log(r"sasl_username=canary@example\.com")
    # twistd ends a SIGTERM-ed run by re-raising SIGTERM on itself, after a clean shutdown
    assert server.stop() == -signal.SIGTERM
    log = server.log_text()
    # the log did record the attempts (so the check below looks at the right file)
    # (the authzid mismatch is one: logged and throttled like wrong credentials)
    assert len(re.findall(r"SASL (PLAIN|LOGIN) authentication failed", log)) == 3, log
    # Postfix's words, with the mechanism, which fail2ban's postfix-sasl filter expects
    failures = re.findall(r"\] warning: \S+\[127\.0\.0\.1\]: SASL (\S+) authentication failed: "
                          r"authentication failure$", log, re.M)
    assert failures == ["PLAIN", "LOGIN", "PLAIN"], log
    assert re.search(r"\[127\.0\.0\.1\]: sasl_method=LOGIN, sasl_username=canary@example\.com$",
                     log, re.M), log
    output = server.output_path.read_text(errors="replace") if server.output_path.exists() else ""
    for secret in secrets_of(PASSWORD, WRONG):
        assert secret not in log, f"{secret!r} is in the server log"
        assert secret not in output, f"{secret!r} is in twistd's output"


def _cmdlines():
    """Every process's command line, as ps shows it."""
    p = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.integration
def test_password_stdin_keeps_the_password_out_of_the_process_list(tmp_path, make_server):  # noqa: F811
    server = make_server(start=False)
    secret = "Ps-Canary-" + os.urandom(6).hex()
    address = "pscheck@example.com"
    proc = subprocess.Popen([sys.executable, "-m", "mailsys", "user", "add", address,
                             "--password-stdin", "--config", str(server.config_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(), cwd=server.base)
    try:
        # while it waits for the password, ps shows the command (so the scan sees it) ...
        deadline = time.monotonic() + 30
        while f"user add {address} --password-stdin" not in _cmdlines():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never showed up in ps"
            time.sleep(0.05)
        proc.stdin.write((secret + "\n").encode())
        proc.stdin.flush()
        # ... and while it hashes and writes, the password is never on any command line
        scans = 0
        while proc.poll() is None:
            assert secret not in _cmdlines()
            scans += 1
            assert time.monotonic() < deadline, "mailsys user add did not finish"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert scans >= 1
    assert secret.encode() not in out + err
    assert secret not in server.users_path.read_text()
    # there is no --password option, and the refusal does not echo the value
    p = server.mailsys_cli("user", "add", "other@example.com", "--password", secret)
    assert p.returncode == 2
    assert secret not in p.stdout + p.stderr
    assert "--password-stdin" in p.stderr
    p = server.mailsys_cli("user", "passwd", address, f"--password={secret}")
    assert p.returncode == 2
    assert secret not in p.stdout + p.stderr


@pytest.mark.integration
def test_huge_auth_line_against_the_real_server(make_server):  # noqa: F811
    server = tls_server(make_server, roles=("submissions",))
    sock = Wire(server.submissions_port)
    try:
        reply(sock)
        sock.sendall(b"EHLO big.example\r\n")
        reply(sock)
        sock.sendall(b"AUTH PLAIN " + b"QUFB" * 25_600 + b"\r\n")
        assert reply(sock) == LINE_TOO_LONG
        sock.sendall(b"AUTH PLAIN\r\n")
        assert reply(sock) == CHALLENGE
        sock.sendall(b"QUFB" * 25_600 + b"\r\n")
        assert reply(sock) == RESPONSE_TOO_LONG
        sock.sendall(b"AUTH PLAIN \x00\x00\x00\x00\r\nAUTH PLAIN " + b64(b"\0") + b"\r\n"
                     b"AUTH PLAIN " + b64(b"\0joe@example.com\0x\0\0") + b"\r\n")
        assert reply(sock) == UNDECODABLE
        assert reply(sock) == BAD_SYNTAX
        assert reply(sock) == BAD_SYNTAX
        sock.sendall(b"AUTH PLAIN " + b64("\0joe@example.com\0integration test password") + b"\r\n")
        assert reply(sock) == AUTH_OK
        sock.sendall(b"QUIT\r\n")
        assert reply(sock) == b"221 2.0.0 Bye\r\n"
    finally:
        sock.close()
