"""The remote courier's policy (mailsys.couriers.remote) with fake connections on
StringTransport and task.Clock: routing, next MX on failure, session reuse,
per-destination limits, dead-destination memory, smart host credentials."""
import os
import random
from types import SimpleNamespace

from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailsys.couriers.remote import (
    CredentialsError, RemoteCourier, parse_nexthop, read_credentials,
)
from mailsys.delivery import Delivered, PermFail, TempFail
from mailsys.resolver import OK, NextHop
from mailsys.smtp.reply import Reply

MSG = b"Subject: x\r\n\r\nhi\r\n"
ZONE = {("remote.test", "MX"): [(10, "mx1.remote.test"), (20, "mx2.remote.test")],
        ("mx1.remote.test", "A"): ["127.0.0.1"],
        ("mx2.remote.test", "A"): ["127.0.0.2"],
        ("smart.test", "A"): ["127.0.0.5"],
        ("other.test", "MX"): [(10, "mx.other.test")],
        ("mx.other.test", "A"): ["127.0.0.7"]}


def lookup(name, rdtype):
    value = ZONE.get((name, rdtype))
    return (OK, value) if value else ("nodata" if any(n == name for n, _ in ZONE) else "nxdomain", [])


class Net:
    """Fake connections: ``behaviour[ip]`` is "refuse" or a list of server replies fed
    as the client writes its commands."""

    def __init__(self):
        self.refuse = set()
        self.connections = []

    def connect(self, hop, proto):
        if hop.ip in self.refuse:
            return defer.fail(error.ConnectionRefusedError("refused"))
        tr = StringTransport()
        proto.makeConnection(tr)
        self.connections.append((hop, proto, tr))
        return defer.succeed(proto)


def server_says(proto, tr, *replies):
    for r in replies:
        proto.dataReceived(r)
    out = tr.value()
    tr.clear()
    return out


GREET = b"220 mx ESMTP\r\n"
EHLO = b"250-mx\r\n250 PIPELINING\r\n"


class Courier(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.net = Net()
        self.courier = self.make()

    def make(self, **kw):
        nh = NextHop(lookup, run=lambda f, *a: f(*a), rng=random.Random(0),
                     ourselves="mx.mailsys.test")
        kw.setdefault("outbound_tls", "none")
        return RemoteCourier(self.clock, hostname="mx.mailsys.test", nexthop=nh,
                             connect=self.net.connect, **kw)

    def deliver(self, rcpts=("a@remote.test",), courier=None):
        out = []
        (courier or self.courier).deliver("s@example.com", [(r, {}) for r in rcpts], MSG, {},
                                          qid="Q1").addCallback(out.append)
        return out

    def complete(self, proto, tr, final=b"250 2.0.0 Ok: queued as R1\r\n", rcpts=1):
        server_says(proto, tr, GREET, EHLO)
        server_says(proto, tr, b"250 2.1.0 ok\r\n" + b"250 2.1.5 ok\r\n" * rcpts)
        server_says(proto, tr, b"354 go\r\n")
        proto.dataReceived(final)    # what the client writes next stays in tr

    def test_delivered_with_relay(self):
        out = self.deliver()
        [(hop, proto, tr)] = self.net.connections
        self.assertEqual(hop.relay, "mx1.remote.test[127.0.0.1]:25")
        self.complete(proto, tr)
        self.assertEqual(out, [[Delivered(Reply(250, "2.0.0", "Ok: queued as R1"))]])
        self.assertEqual(out[0][0].relay, "mx1.remote.test[127.0.0.1]:25")

    def test_refused_first_mx_goes_to_next(self):
        self.net.refuse.add("127.0.0.1")
        out = self.deliver()
        [(hop, proto, tr)] = self.net.connections
        self.assertEqual(hop.host, "mx2.remote.test")
        self.complete(proto, tr)
        self.assertIsInstance(out[0][0], Delivered)

    def test_4xx_greeting_goes_to_next(self):
        out = self.deliver()
        hop, proto, tr = self.net.connections[0]
        server_says(proto, tr, b"421 4.3.2 busy\r\n")
        hop2, proto2, tr2 = self.net.connections[1]
        self.assertEqual(hop2.host, "mx2.remote.test")
        self.complete(proto2, tr2)
        self.assertIsInstance(out[0][0], Delivered)

    def test_last_4xx_greeting_is_the_outcome(self):
        out = self.deliver()
        for _ in range(2):
            hop, proto, tr = self.net.connections[-1]
            server_says(proto, tr, b"421 4.3.2 busy\r\n")
        self.assertEqual(out, [[TempFail(Reply(421, "4.3.2", "busy"))]])
        self.assertEqual(out[0][0].relay, "mx2.remote.test[127.0.0.2]:25")
        self.assertTrue(out[0][0].from_peer)          # the server said it: "smtp;" in a report

    def test_all_refused_marks_destination_down(self):
        self.net.refuse.update({"127.0.0.1", "127.0.0.2"})
        out = self.deliver()
        self.assertEqual(out, [[TempFail(Reply(451, "4.4.1", "connect to mx2.remote.test"
                                                             "[127.0.0.2]:25: Connection refused"))]])
        self.assertIsNone(out[0][0].relay)
        self.assertFalse(out[0][0].from_peer)         # made up here: "X-Mailsys;" in a report
        # Fails fast now, without connecting.
        out = self.deliver()
        self.assertEqual(out[0][0].reply.text, "delivery temporarily suspended: connect to "
                                               "mx2.remote.test[127.0.0.2]:25: Connection refused")
        self.assertFalse(out[0][0].from_peer)
        self.clock.advance(61)
        self.net.refuse.clear()
        out = self.deliver()
        self.assertEqual(len(self.net.connections), 1)

    def test_forget_dead_by_domain_and_all(self):
        """flush and ETRN (through the queue) make the next attempt a real one."""
        self.net.refuse.update({"127.0.0.1", "127.0.0.2", "127.0.0.7"})
        self.deliver(["a@remote.test", "b@other.test"])
        self.assertEqual(len(self.net.connections), 0)
        self.net.refuse.clear()
        self.assertEqual(self.courier.forget_dead(["remote.test"]), ["mx:remote.test:25"])
        self.assertEqual(self.courier.forget_dead(["remote.test"]), [])     # nothing left to forget
        out = self.deliver(["a@remote.test", "b@other.test"])
        [(hop, proto, tr)] = self.net.connections                          # remote.test only
        self.assertEqual(hop.host, "mx1.remote.test")
        self.complete(proto, tr)
        self.assertIsInstance(out[0][0], Delivered)
        self.assertEqual(out[0][1].reply.text, "delivery temporarily suspended: connect to "
                                               "mx.other.test[127.0.0.7]:25: Connection refused")
        self.assertEqual(self.courier.forget_dead(), ["mx:other.test:25"])
        self.deliver(["b@other.test"])
        self.assertEqual([h.host for h, _, _ in self.net.connections],
                         ["mx1.remote.test", "mx.other.test"])

    def test_flush_within_dead_time_connects_and_delivers(self):
        """`mailsys queue flush --domain` 10 s after every MX refused: a real
        connection, delivered, not "delivery temporarily suspended" again."""
        from mailsys.queue import QueueManager
        from tests.test_queue import Entry, Journal

        config = SimpleNamespace(queue=SimpleNamespace(retry_min=300, retry_max=3600,
                                                       lifetime=86400, warn_after=0),
                                 domains=SimpleNamespace(local=()))
        qm = QueueManager(config=config, spool=None, journal=Journal(), clock=self.clock,
                          remote=self.courier, rng=lambda: 0.5)
        qm.startService()
        self.net.refuse.update({"127.0.0.1", "127.0.0.2"})
        qm.add(Entry("QF", "s@example.com", ["a@remote.test"]))
        self.clock.advance(0)
        self.assertEqual(qm.messages["QF"].next_attempt, 300)
        self.clock.advance(10)
        self.net.refuse.clear()
        self.assertEqual(qm.flush("remote.test"), 1)
        self.clock.advance(0)
        [(hop, proto, tr)] = self.net.connections
        self.complete(proto, tr)
        self.assertNotIn("QF", qm.messages)
        self.assertEqual(qm.journal.records[-2]["s"], "sent")

    def test_permanent_dns_failure(self):
        out = self.deliver(["a@nowhere.test"])
        self.assertIsInstance(out[0][0], PermFail)
        self.assertEqual(out[0][0].reply.status, "5.1.2")
        self.assertFalse(out[0][0].from_peer)

    def test_session_reused_with_rset(self):
        out1 = self.deliver()
        hop, proto, tr = self.net.connections[0]
        self.complete(proto, tr)
        self.assertEqual(tr.value(), b"")
        out2 = self.deliver()
        self.assertEqual(len(self.net.connections), 1)
        self.assertEqual(tr.value(), b"RSET\r\n")
        tr.clear()
        server_says(proto, tr, b"250 2.0.0 ok\r\n")
        server_says(proto, tr, b"250 ok\r\n250 ok\r\n", b"354 go\r\n")
        server_says(proto, tr, b"250 2.0.0 second\r\n")
        self.assertEqual(out2, [[Delivered(Reply(250, "2.0.0", "second"))]])
        self.assertIsInstance(out1[0][0], Delivered)

    def test_idle_session_closed_after_timeout(self):
        self.deliver()
        hop, proto, tr = self.net.connections[0]
        self.complete(proto, tr)
        self.clock.advance(5)
        self.assertEqual(tr.value(), b"QUIT\r\n")

    def test_session_message_limit(self):
        courier = self.make(max_messages=1)
        self.deliver(courier=courier)
        hop, proto, tr = self.net.connections[0]
        self.complete(proto, tr)
        self.assertEqual(tr.value(), b"QUIT\r\n")

    def test_dead_reused_session_retried_on_fresh_connection(self):
        self.deliver()
        hop, proto, tr = self.net.connections[0]
        self.complete(proto, tr)
        out = self.deliver()
        self.assertEqual(tr.value(), b"RSET\r\n")
        proto.connectionLost(None)
        self.assertEqual(len(self.net.connections), 2)
        hop, proto2, tr2 = self.net.connections[1]
        self.complete(proto2, tr2)
        self.assertIsInstance(out[0][0], Delivered)

    def test_per_destination_session_limit(self):
        courier = self.make(max_sessions=2)
        outs = [self.deliver(courier=courier) for _ in range(3)]
        self.assertEqual(len(self.net.connections), 2)
        hop, proto, tr = self.net.connections[0]
        self.complete(proto, tr)
        # The waiting message takes the freed session.
        self.assertEqual(tr.value(), b"RSET\r\n")
        self.assertEqual(len(self.net.connections), 2)
        self.assertEqual(outs[2], [])

    def test_recipients_of_two_domains_in_order(self):
        out = self.deliver(["a@remote.test", "b@other.test", "c@remote.test"])
        by_host = {hop.host: (proto, tr) for hop, proto, tr in self.net.connections}
        proto, tr = by_host["mx1.remote.test"]
        self.complete(proto, tr, rcpts=2)
        proto, tr = by_host["mx.other.test"]
        self.complete(proto, tr, final=b"550 5.7.1 go away\r\n")
        self.assertEqual([type(o) for o in out[0]], [Delivered, PermFail, Delivered])
        self.assertEqual(out[0][1].relay, "mx.other.test[127.0.0.7]:25")

    def test_transport_and_smarthost_routing(self):
        c = self.make(smarthost="[smart.test]:587",
                      transport={"other.test": "smtp:[127.0.0.9]:2525",
                                 "lmtp.test": "lmtp:unix:/run/x.sock"})
        d = c.destination("remote.test")
        self.assertEqual((d.kind, d.host, d.port, d.mx), ("smtp", "smart.test", 587, False))
        d = c.destination("Other.Test")
        self.assertEqual((d.kind, d.host, d.port, d.mx), ("smtp", "127.0.0.9", 2525, False))
        d = c.destination("lmtp.test")
        self.assertEqual((d.kind, d.nexthop), ("lmtp", "unix:/run/x.sock"))

    def test_smarthost_with_auth_requires_encrypt(self):
        c = self.make(smarthost="smart.test:25", smarthost_auth=("u", "p"))
        d = c.destination("remote.test")
        self.assertEqual(d.tls.level, "encrypt")
        self.assertEqual(d.auth, ("u", "p"))

    def test_lmtp_transport_uses_the_lmtp_courier(self):
        calls = []

        class FakeLMTP:
            def deliver(self, sender, rcpts, message, params, qid=None):
                calls.append((sender, rcpts))
                return defer.succeed([Delivered()] * len(rcpts))

        c = self.make(transport={"lmtp.test": "lmtp:[127.0.0.1]:24"},
                      lmtp_courier=lambda reactor, hop, name: FakeLMTP())
        out = self.deliver(["x@lmtp.test"], courier=c)
        self.assertEqual(calls, [("s@example.com", [("x@lmtp.test", {})])])
        self.assertIsInstance(out[0][0], Delivered)

    def test_idle_also_closes_the_lmtp_transport_sessions(self):
        closed = []

        class FakeLMTP:
            def deliver(self, sender, rcpts, message, params, qid=None):
                return defer.succeed([Delivered()] * len(rcpts))

            def idle(self):
                closed.append(True)
                return defer.succeed(None)

        c = self.make(transport={"lmtp.test": "lmtp:[127.0.0.1]:24"},
                      lmtp_courier=lambda reactor, hop, name: FakeLMTP())
        self.deliver(["x@lmtp.test"], courier=c)
        c.idle()
        self.assertEqual(closed, [True])

    def test_parse_nexthop(self):
        self.assertEqual(parse_nexthop("[127.0.0.1]:2525"), ("127.0.0.1", 2525, False))
        self.assertEqual(parse_nexthop("[IPv6:::1]:25"), ("::1", 25, False))
        self.assertEqual(parse_nexthop("relay.example.com"), ("relay.example.com", 25, True))
        self.assertEqual(parse_nexthop("relay.example.com:587"), ("relay.example.com", 587, True))


class Credentials(unittest.TestCase):
    def mktemp(self):
        """A path in a private temporary directory (trial's own mktemp writes
        below the current directory)."""
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix="mailsys-cred-")
        self.addCleanup(shutil.rmtree, d, True)
        return os.path.join(d, "credentials")

    def test_mode_0600_required(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("joe:secret\n")
        os.chmod(path, 0o640)
        with self.assertRaises(CredentialsError) as cm:
            read_credentials(path)
        self.assertIn("has mode 0640", str(cm.exception))
        self.assertIn(f"chmod 600 {path}", str(cm.exception))
        os.chmod(path, 0o600)
        self.assertEqual(read_credentials(path), ("joe", "secret"))

    def test_missing_or_malformed(self):
        with self.assertRaises(CredentialsError):
            read_credentials(self.mktemp())
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nocolon\n")
        os.chmod(path, 0o600)
        with self.assertRaises(CredentialsError):
            read_credentials(path)
