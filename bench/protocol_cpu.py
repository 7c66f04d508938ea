"""CPU cost of the receive path in Python alone: no sockets, no disk.

Drives complete SMTP sessions (banner .. QUIT, one message each, the pattern
smtp-source produces) through the real SMTPServerProtocol and ReceiveHandler
over StringTransport, with the spool's commit replaced by an already-fired
Deferred, and prints microseconds of CPU per message.  On a shared, noisy
machine this is the steadiest figure for comparing changes to the Python
side; system-call and fsync costs are measured by bench/receive.py.

    python3 bench/protocol_cpu.py [--messages N] [--profile]
"""
import argparse
import cProfile
import ipaddress
import os
import pstats
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from mailsys import spool as spool_mod  # noqa: E402
from mailsys.receive import ConnectionLimiter, ReceiveHandler, ClientInfo  # noqa: E402
from mailsys.smtp.server import SMTPServerProtocol  # noqa: E402


class FakeSpool:
    def __init__(self):
        self.ids = spool_mod.QueueIds()
        self.committed = 0

    def new_message(self, qid):
        return spool_mod.MessageWriter(self, qid)

    def _reserve(self, n):
        return True

    def _release(self, n):
        pass

    def commit(self, writer, envelope):
        self.committed += 1
        writer.discard()
        return defer.succeed(SimpleNamespace(message_size=writer.size))


class Accounts:
    def accepts(self, address):
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    clock = task.Clock()
    limits = SimpleNamespace(message_size=26214400, recipients=1000, command_timeout=300,
                             data_timeout=600, connections=1000, connections_per_ip=50)
    config = SimpleNamespace(server=SimpleNamespace(hostname="bench.test"), limits=limits)
    service = SimpleNamespace(
        config=config, clock=clock, spool=FakeSpool(), accounts=Accounts(),
        limiter=ConnectionLimiter(1000, 1000),
        rdns=SimpleNamespace(cached=lambda ip: "localhost"),
        local_domains=frozenset(["example.com"]), relay_domains=frozenset(),
        may_relay=lambda ip: True)
    line = b"X" * 76 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * (args.size // len(line))
    script = [b"EHLO client.example\r\n", b"MAIL FROM:<a@b.org>\r\n",
              b"RCPT TO:<joe@example.com>\r\n", b"DATA\r\n", body + b".\r\n", b"QUIT\r\n"]
    ip = ipaddress.ip_address("127.0.0.1")

    def run(n):
        for _ in range(n):
            handler = ReceiveHandler(service, ClientInfo(ip, 1234, "mta"))
            proto = SMTPServerProtocol(handler, "bench.test", limits=limits, clock=clock)
            t = StringTransport()
            proto.makeConnection(t)
            for chunk in script:
                proto.dataReceived(chunk)
            proto.connectionLost(None)

    # Keep log events from piling up in the global buffer during the run.
    from twisted.logger import globalLogBeginner
    globalLogBeginner.beginLoggingTo([lambda e: None], redirectStandardIO=False,
                                     discardBuffer=True)
    run(200)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, args.messages)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    t0 = time.process_time()
    run(args.messages)
    dt = time.process_time() - t0
    assert service.spool.committed >= args.messages
    print(f"{dt / args.messages * 1e6:.1f} us CPU per message ({args.messages} messages, "
          f"{args.size} bytes, {args.messages / dt:.0f} messages/s of pure Python)")


if __name__ == "__main__":
    main()
