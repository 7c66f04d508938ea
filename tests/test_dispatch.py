"""mailsys.dispatch: the epoll reactor's dispatch without the legacy log
context.  A private EPollReactor instance (never run, never installed) is
driven one iteration at a time over a socketpair."""
import socket
import threading
import time

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


class Wakes:
    """Stands in for the reactor's waker: counts the bytes it would write."""

    def __init__(self):
        self.count = 0

    def wakeUp(self):
        self.count += 1


class ScriptedPoller:
    """Records each poll's timeout; ``during`` runs while the reactor polls,
    as another thread's callFromThread would."""

    def __init__(self, during=None, error=None):
        self.timeouts, self.during, self.error = [], during, error

    def poll(self, timeout, maxevents):
        self.timeouts.append(timeout)
        if self.during is not None:
            self.during()
        if self.error is not None:
            raise self.error
        return []


def scripted(reactor, **kw):
    real = reactor._poller
    reactor._poller = ScriptedPoller(**kw)
    reactor.waker = Wakes()
    assert lean_dispatch(reactor) is True
    return real


def test_a_call_from_a_thread_wakes_the_reactor_only_while_it_polls(reactor):
    queued = []
    real = scripted(reactor, during=lambda: reactor.callFromThread(queued.append, "in poll"))
    try:
        reactor.callFromThread(queued.append, "busy")    # not polling: no byte written
        assert reactor.waker.count == 0
        reactor.threadCallQueue.clear()
        reactor.doIteration(None)                        # polling: the byte is written
        assert reactor.waker.count == 1
        reactor.callFromThread(queued.append, "after")   # the poll returned: none again
        assert reactor.waker.count == 1
        assert [args for _, args, _ in reactor.threadCallQueue] == [("in poll",), ("after",)]
    finally:
        reactor._poller = real


def test_a_queued_call_makes_the_poll_return_at_once(reactor):
    real = scripted(reactor)
    try:
        reactor.doIteration(None)
        reactor.doIteration(2.5)
        reactor.callFromThread(lambda: None)             # queued while the loop was busy
        reactor.doIteration(None)
        reactor.doIteration(2.5)
        assert reactor._poller.timeouts == [-1, 2.5, 0, 0]
        assert reactor.waker.count == 0
    finally:
        reactor._poller = real


class RacingQueue(list):
    """A threadCallQueue whose first look finds it empty while a thread's call
    lands right after: the thread must then see the flag and wake the poll."""

    def __init__(self, reactor):
        super().__init__()
        self.reactor, self.raced = reactor, False

    def __len__(self):
        n = super().__len__()
        if not self.raced:
            self.raced = True
            self.reactor.callFromThread(lambda: None)
        return n


def test_a_call_landing_just_after_the_loop_looked_still_wakes_it(reactor):
    reactor.threadCallQueue = RacingQueue(reactor)
    real = scripted(reactor)
    try:
        reactor.doIteration(None)
        assert reactor._poller.timeouts == [-1]      # the loop saw no call...
        assert reactor.waker.count == 1              # ...so the thread's byte wakes it
        assert len(reactor.threadCallQueue) == 1
    finally:
        reactor._poller = real


@pytest.mark.parametrize("error", [OSError(4, "Interrupted system call"), OSError(9, "Bad fd")])
def test_the_flag_is_cleared_when_the_poll_fails(reactor, error):
    real = scripted(reactor, error=error)
    try:
        if error.errno == 4:
            reactor.doIteration(None)                    # EINTR: the next turn polls again
        else:
            with pytest.raises(OSError):
                reactor.doIteration(None)
        reactor.callFromThread(lambda: None)
        assert reactor.waker.count == 0
    finally:
        reactor._poller = real


def test_no_call_from_a_real_thread_is_left_waiting(reactor):
    """Threads racing the loop on a real epoll and the real waker: every turn
    that waits for a call gets it at once.  A lost wake-up would leave
    doIteration asleep for its whole timeout, which the bound catches."""
    assert lean_dispatch(reactor) is True
    done = []

    def call(go, i):
        go.wait()       # released just before the loop polls: the call lands in or near it
        reactor.callFromThread(done.append, i)

    for i in range(300):
        go = threading.Event()
        t = threading.Thread(target=call, args=(go, i))
        t.start()
        started = time.monotonic()
        go.set()
        while i not in done:
            reactor.doIteration(3)
            reactor.runUntilCurrent()
        assert time.monotonic() - started < 2, f"turn {i}: the wake-up was lost"
        t.join()
    assert done == list(range(300))
