"""Clients that never read, or never finish the TLS handshake, against a real
``twistd -n mailsys`` (tests/security/test_resource_limits.py has the unit tests).

Before: a connection closed after its timeout stayed open as long as its client
kept it (Twisted's loseConnection waits for the unsent replies and for the TLS
handshake), holding a slot under ``limits.connections_per_ip`` for ever; and a
client pipelining EHLO without reading made the server buffer every reply
(16 MB in took one server from 59 to 323 MB of memory).
"""
import socket
import time

import pytest

from tests.integration.harness import LOOPBACK, tls_server

pytestmark = pytest.mark.integration


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_connections_without_a_tls_handshake_are_closed_and_free_their_slots(make_server):
    server = tls_server(make_server, {"limits": {"command_timeout": 2, "connections_per_ip": 3},
                                      "server": {"workers": 1}}, roles=("submissions",))
    held = [socket.create_connection((LOOPBACK, server.submissions_port)) for _ in range(3)]
    started = time.monotonic()
    for s in held:                      # never a ClientHello: closed by us, not by them
        s.settimeout(30)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass                        # cut (RST) after the grace time: the same end
    # timeout (2 s) plus the grace, at most the command timeout (2 s)
    assert time.monotonic() - started < 8
    probe = socket.create_connection((LOOPBACK, server.port), timeout=10)
    assert probe.recv(200).startswith(b"220 ")
    probe.close()
    for s in held:
        s.close()
    assert server.log_text().count("timeout after CONNECT from localhost[127.0.0.1]") == 3


def test_a_client_that_pipelines_without_reading_cannot_grow_the_server(make_server):
    server = make_server({"server": {"workers": 1}, "limits": {"command_timeout": 5}})
    before = rss_kb(server.proc.pid)
    s = socket.create_connection((LOOPBACK, server.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(1)
    sent = 0
    flood = b"EHLO x\r\n" * 10000
    deadline = time.monotonic() + 20
    try:
        while sent < 16 * 1024 * 1024 and time.monotonic() < deadline:
            sent += s.send(flood)
    except (socket.timeout, BlockingIOError):
        pass                          # the server stopped reading: what we want
    except OSError:
        pass                          # or cut us off
    grown = rss_kb(server.proc.pid) - before
    print(f"sent {sent} bytes; server grew by {grown} kB")
    assert grown < 20_000, f"the server grew by {grown} kB for {sent} bytes of unread EHLO"
    s.close()
