"""mailsys.dispatch: the epoll reactor's dispatch without the legacy log
context.  A private EPollReactor instance (never run, never installed) is
driven one iteration at a time over a socketpair."""
import socket

import pytest
from twisted.internet import epollreactor, task
from twisted.internet.abstract import FileDescriptor
from twisted.python import context, log as legacy_log

from mailsys.dispatch import lean_dispatch


class Reader(FileDescriptor):
    def __init__(self, sock, reactor, fail=False):
        super().__init__(reactor)
        self.sock, self.fail = sock, fail
        self.got, self.lost, self.systems = [], [], []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "Reader-prefix"

    def doRead(self):
        self.systems.append(context.get(legacy_log.ILogContext)["system"])
        if self.fail:
            raise RuntimeError("bug in doRead")
        self.got.append(self.sock.recv(100))

    def connectionLost(self, reason):
        self.lost.append(reason)
        super().connectionLost(reason)


@pytest.fixture
def reactor():
    r = epollreactor.EPollReactor()
    yield r
    for s in list(r.getReaders()):
        r.removeReader(s)
    r._poller.close()


def test_events_reach_doRead_without_a_log_context(reactor):
    a, b = socket.socketpair()
    with a, b:
        reader = Reader(a, reactor)
        reactor.addReader(reader)
        reactor.doIteration(0)               # Twisted's own dispatch first
        assert reader.got == [] and reader.systems == []
        b.send(b"one")
        reactor.doIteration(0)
        assert reader.got == [b"one"] and reader.systems == ["Reader-prefix"]

        assert lean_dispatch(reactor) is True
        assert lean_dispatch(reactor) is True      # idempotent
        b.send(b"two")
        reactor.doIteration(0)
        assert reader.got == [b"one", b"two"]
        assert reader.systems == ["Reader-prefix", "-"]   # no per-event context any more
        reactor.doIteration(0)                      # nothing ready: nothing called
        assert reader.got == [b"one", b"two"]
        reactor.removeReader(reader)


def test_an_exception_in_doRead_drops_that_descriptor_only(reactor):
    """Twisted's _doReadOrWrite still catches it (and logs it as an unhandled
    error, seen on stderr here) and loses that connection with the failure."""
    lean_dispatch(reactor)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        bad, good = Reader(a, reactor, fail=True), Reader(c, reactor)
        reactor.addReader(bad)
        reactor.addReader(good)
        b.send(b"x")
        d.send(b"y")
        reactor.doIteration(0)
        assert len(bad.lost) == 1 and bad.lost[0].check(RuntimeError)
        assert good.got == [b"y"] and good.lost == []
        assert bad not in reactor.getReaders() and good in reactor.getReaders()
        reactor.removeReader(good)
    finally:
        for s in (a, b, c, d):
            s.close()


def test_other_reactors_are_left_alone():
    clock = task.Clock()
    assert lean_dispatch(clock) is False
    assert not hasattr(clock, "doIteration")
