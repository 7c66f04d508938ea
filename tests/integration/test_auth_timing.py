"""A failed AUTH takes the same time whether the account exists or not.

200 failed AUTH PLAIN attempts for an existing account (wrong password) and 200 for
an address with no account, interleaved, each timed at the client from sending the
AUTH line to receiving the 535; the medians must differ by less than 10 %.

The server slows down repeated failures per client IP across connections
(mailsys.auth.FailureThrottle: 3 free, then 1, 2, 4 ... seconds) and closes a
connection after ``limits.auth_failures``.  So that the throttle never adds its
delay, every connection comes from its own loopback source address (127.0.0.2 ...)
and makes at most 3 attempts (``limits.auth_failures`` is raised to 10 so the
connection stays open for a clean QUIT).  A new source address makes the server
look up its reverse DNS name; a tiny resolver on loopback answers NXDOMAIN at once,
so no lookup waits for a timeout.

The 400 Argon2id checks dominate the run time: about 400 times the cost of one
check (50-100 ms on a fast machine, up to ~300 ms on a small VM).
"""
import base64
import re
import socket
import ssl
import statistics
import threading
import time

import pytest

from tests.integration.harness import LOOPBACK, tls_server

pytestmark = pytest.mark.integration

EXISTING = "joe@example.com"          # an account of every test server (conftest USERS)
ATTEMPTS = 200                        # per kind
PER_CONNECTION = 3                    # FailureThrottle.free: never more from one address
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"


class NXDomainResolver(threading.Thread):
    """Answers every DNS query on 127.0.0.1:PORT/udp with NXDOMAIN."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.queries = 0

    def run(self):
        while not self.stopped:
            try:
                query, peer = self.sock.recvfrom(4096)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            question = self._question(query)
            if question is None:
                continue
            self.queries += 1
            flags = bytes([0x80 | 0x04 | (query[2] & 0x01), 0x80 | 3])   # QR AA RD, RA NXDOMAIN
            self.sock.sendto(query[:2] + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question,
                             peer)

    @staticmethod
    def _question(query):
        if len(query) < 12 or query[4:6] != b"\x00\x01":
            return None
        i = 12
        while i < len(query) and query[i] != 0:
            i += 1 + query[i]
        end = i + 5
        return query[12:end] if end <= len(query) else None

    def stop(self):
        self.stopped = True
        self.join(5)
        self.sock.close()


@pytest.fixture
def resolver():
    r = NXDomainResolver()
    r.start()
    yield r
    r.stop()


class Session:
    def __init__(self, port, source):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((LOOPBACK, port), timeout=30, source_address=(source, 0))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw)
        self.buf = b""
        assert self.reply().startswith(b"220 ")
        self.sock.sendall(b"EHLO timing.example\r\n")
        assert b"250-AUTH PLAIN LOGIN\r\n" in self.reply()

    def reply(self):
        while True:
            m = re.search(rb"(?:\A|\r\n)(\d{3} [^\r\n]*\r\n)", self.buf)
            if m:
                out, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return out
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed; got {self.buf!r}")
            self.buf += chunk

    def failed_auth(self, user, password):
        """Seconds from sending the AUTH line to the 535."""
        line = b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"
        start = time.perf_counter()
        self.sock.sendall(line)
        answer = self.reply()
        elapsed = time.perf_counter() - start
        assert answer == INVALID, answer
        return elapsed

    def quit(self):
        self.sock.sendall(b"QUIT\r\n")
        assert self.reply() == b"221 2.0.0 Bye\r\n"
        self.sock.close()


def test_failed_auth_time_does_not_depend_on_the_account_existing(make_server, resolver):
    server = tls_server(make_server, {"dns": {"nameservers": [f"{LOOPBACK}:{resolver.port}"]},
                                      "limits": {"auth_failures": 10}},
                        roles=("submissions",))
    sources = iter(f"127.0.0.{i}" for i in range(2, 255))
    started = time.monotonic()

    # Warm-up, not measured: every worker process makes its dummy hash on the first
    # unknown user it sees and loads the accounts; a few connections reach them all
    # (one that is missed costs a single outlier, which the median ignores).
    for n in range(4):
        s = Session(server.submissions_port, next(sources))
        s.failed_auth(f"warmup{n}@example.com", "x")
        s.failed_auth(EXISTING, "wrong warm-up password")
        s.quit()

    kinds = ["existing", "unknown"] * ATTEMPTS          # interleaved, E U E | U E U | ...
    times = {"existing": [], "unknown": []}
    for first in range(0, len(kinds), PER_CONNECTION):
        s = Session(server.submissions_port, next(sources))
        for i, kind in enumerate(kinds[first:first + PER_CONNECTION], first):
            if kind == "existing":
                times[kind].append(s.failed_auth(EXISTING, f"wrong password {i}"))
            else:
                times[kind].append(s.failed_auth(f"nobody{i}@example.com", f"wrong password {i}"))
        s.quit()
    total = time.monotonic() - started

    existing, unknown = (statistics.median(times[k]) for k in ("existing", "unknown"))
    ratio = abs(existing - unknown) / min(existing, unknown)
    summary = (f"existing: median {existing * 1000:.1f} ms (n={len(times['existing'])}), "
               f"unknown: median {unknown * 1000:.1f} ms (n={len(times['unknown'])}), "
               f"difference {ratio:.1%}, {total:.0f} s in all, {resolver.queries} DNS queries")
    print(summary)
    assert len(times["existing"]) == len(times["unknown"]) == ATTEMPTS
    assert ratio < 0.10, summary
