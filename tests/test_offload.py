"""mailsys.offload: one worker thread, results back through callFromThread.

The reactor here is a recorder: callFromThread queues the call, and the test
runs the queue itself, so nothing depends on a running global reactor."""
import os
import queue
import threading

import pytest

from mailsys.offload import Offload, _no_wakeup_preemption


class Reactor:
    def __init__(self):
        self.calls = queue.SimpleQueue()

    def callFromThread(self, f, *args):
        self.calls.put((f, args, threading.current_thread()))

    def run_one(self, timeout=10):
        f, args, thread = self.calls.get(timeout=timeout)
        f(*args)
        return thread


@pytest.fixture
def offload():
    reactor = Reactor()
    o = Offload(reactor, "test-offload")
    yield o, reactor
    o.stop()


def test_results_come_back_in_order_from_one_thread_other_than_the_caller(offload):
    o, reactor = offload
    ran_in = []

    def work(n):
        ran_in.append(threading.current_thread().name)
        return n * 2

    results = []
    for n in range(5):
        o.run(work, n).addCallback(results.append)
    threads = {reactor.run_one() for _ in range(5)}
    assert results == [0, 2, 4, 6, 8]
    assert ran_in == ["test-offload"] * 5
    assert threads == {o._thread} and o._thread is not threading.current_thread()


def test_an_exception_becomes_the_deferreds_failure(offload):
    o, reactor = offload

    def boom():
        raise OSError(28, "No space left on device")

    failures = []
    o.run(boom).addErrback(failures.append)
    o.run(lambda: "after").addCallback(failures.append)
    reactor.run_one()
    reactor.run_one()
    assert failures[0].check(OSError) and failures[0].value.errno == 28
    assert failures[1] == "after"      # the thread survived the exception


def test_stop_finishes_what_was_submitted_then_ends_the_thread():
    reactor = Reactor()
    o = Offload(reactor, "test-offload")
    gate = threading.Event()
    done = []
    o.run(gate.wait, 10)
    o.run(done.append, "second")
    thread = o._thread
    gate.set()
    o.stop()
    assert not thread.is_alive() and done == ["second"]
    assert o._thread is None
    o.stop()                            # twice is harmless
    o.run(done.append, "restarted")     # and it starts again on demand
    reactor.run_one(); reactor.run_one(); reactor.run_one()
    o.stop()
    assert done == ["second", "restarted"]


def test_the_thread_runs_under_sched_batch_and_the_caller_keeps_its_policy(offload):
    """The woken disk thread must not preempt the reactor thread that woke it
    (mailsys.offload's docstring); the reactor thread itself is left alone."""
    o, reactor = offload
    before = os.sched_getscheduler(0)
    seen = []
    o.run(os.sched_getscheduler, 0).addCallback(seen.append)
    reactor.run_one()
    assert seen == [os.SCHED_BATCH]
    assert os.sched_getscheduler(o._thread.native_id) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == before == os.SCHED_OTHER


def test_a_thread_under_another_policy_keeps_it(monkeypatch):
    """Only the ordinary policy is changed: a thread started under, say, a
    real-time policy an administrator chose is left alone."""
    calls = []
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_FIFO)
    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: calls.append(a))
    assert _no_wakeup_preemption() is False
    assert calls == []
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_OTHER)
    assert _no_wakeup_preemption() is True
    assert [(pid, policy) for pid, policy, _ in calls] == [(0, os.SCHED_BATCH)]
