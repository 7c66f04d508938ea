"""An authoritative DNS server on loopback for the remote-delivery tests.

A stock twisted.names server (``BindAuthority`` reading a BIND zone file) in a
child process, on 127.0.0.1, UDP and TCP on the same free port.  Every name
under ``servfail.test`` answers SERVFAIL (the authority raises, which the
server reports as a server failure); a name in the zone that does not exist is
NXDOMAIN, as from any authoritative server.

    with DNSServer(tmp_path, ZONE_TEXT) as dns:
        overrides = {"dns": {"nameservers": [dns.nameserver]}}

More zones may follow the first (``DNSServer(tmp_path, forward, reverse)``), for
a PTR zone next to the names it points at; each is served by an authority of its
own, asked in turn.

Run directly: ``python -m tests.integration.dnsserver ZONEFILE [ZONEFILE ...] PORT``.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.harness import LOOPBACK, HarnessError, child_env, free_port, tail

READY = "dnsserver ready"


def zone(records, origin="test."):
    """Zone file text: ``records`` are lines like ``remote.test. IN MX 10 mx1.remote.test.``."""
    head = [f"$ORIGIN {origin}",
            f"@ IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60",
            f"@ IN NS ns.{origin}",
            f"ns.{origin} IN A 127.0.0.1"]
    return "\n".join(head + list(records)) + "\n"


def _free_udp_and_tcp_port():
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise HarnessError("no port free for both UDP and TCP on 127.0.0.1")


class DNSServer:
    def __init__(self, base, zone_text, *more_zones):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.zone_path = self.base / "zone.db"
        self.zone_path.write_text(zone_text)
        self.zone_paths = [self.zone_path]
        for n, text in enumerate(more_zones, 1):
            path = self.base / f"zone{n}.db"
            path.write_text(text)
            self.zone_paths.append(path)
        self.log_path = self.base / "dns.log"
        self.port = _free_udp_and_tcp_port()
        self.proc = None

    @property
    def nameserver(self):
        return f"{LOOPBACK}:{self.port}"

    def start(self, timeout=20.0):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.dnsserver",
                 *map(str, self.zone_paths), str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                cwd=str(Path(__file__).resolve().parents[2]), start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while READY not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"the DNS server did not start\n{tail(self.log_path)}")
            time.sleep(0.05)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(zone_paths, port):
    from twisted.internet import defer, reactor
    from twisted.names import authority, dns, server

    class Failing(authority.BindAuthority):
        """The zone, except that ``*.servfail.test`` makes the server fail."""

        def _lookup(self, name, cls, type, timeout=None):
            text = name.decode("ascii", "replace").lower().rstrip(".")
            if text == "servfail.test" or text.endswith(".servfail.test"):
                return defer.fail(RuntimeError("deliberate SERVFAIL"))
            return super()._lookup(name, cls, type, timeout)

    authorities = [Failing(path) for path in zone_paths]
    # The zone file parser takes the null MX's "." for a one-label name "\."; make
    # it the root, as RFC 7505 means.
    for zone_auth in authorities:
        for records in zone_auth.records.values():
            for r in records:
                if isinstance(r, dns.Record_MX) and r.name.name in (b".", b""):
                    r.name = dns.Name(b"")
    factory = server.DNSServerFactory(authorities=authorities)
    factory.noisy = False
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print(READY, flush=True))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:-1], int(sys.argv[-1]))
