"""One dedicated thread for a component's blocking disk work.

The spool writer, the queue journal and the MDA each hand their batches to a
thread of their own so that ``fdatasync`` never blocks the reactor.  They used
Twisted's ``ThreadPool`` (one thread each) through ``deferToThreadPool``: a
general pool whose hand-off goes through its ``Team``/``LockWorker``
coordinator, a context copy and a ``queue.Queue`` with a Python-level
``Condition``.  Profiles of end-to-end delivery (``bench/e2e.py``) put that
machinery at about 7% of all the Python work, for three hand-offs per batch
that need none of it: one thread, work taken in order, one result back.

:class:`Offload` does exactly that: a daemon thread reading a C-level
``queue.SimpleQueue``, each result (or failure) handed back to the reactor
thread with ``callFromThread``, where the caller's Deferred fires.  Work is
done in submission order, one item at a time, as with the one-thread pool.

The thread runs under ``SCHED_BATCH`` (Linux; see :func:`_no_wakeup_preemption`).
A hand-off wakes it while the reactor thread, which woke it, holds the GIL.
Under the ordinary policy the woken thread may preempt the reactor thread on
its CPU straight away, only to block on the GIL it cannot have, so the reactor
thread is switched out and back in for nothing.  With ``SCHED_BATCH`` the woken
thread waits for the CPU to be free instead (the reactor thread blocking, the
other CPU falling idle, or the tick).  On the end-to-end benchmark this halved
the context switches per message (21 to 10); with the waker change in
:mod:`mailsys.dispatch` the server's CPU per message fell by about 9%
(docs/performance.rst, ninth session).
A ``SCHED_BATCH`` thread still gets its full share of the CPU: only the
wakeup preemption is gone, so an ``fdatasync`` is never starved.
"""
import os
import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()


def _no_wakeup_preemption():
    """Put the calling thread under ``SCHED_BATCH`` (why: the module's
    docstring), but only from the ordinary policy: under a real-time policy
    an administrator chose for the service (systemd's ``CPUSchedulingPolicy=``),
    a batch thread could be starved by the reactor thread and hold up every
    ``fdatasync``.  Where there is no such policy, or a sandbox forbids
    changing it, the thread keeps what it has: only speed depends on this."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:       # pragma: no cover - not Linux
        return False
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError:         # pragma: no cover - seccomp or similar
        return False
    return True


class Offload:
    """A single worker thread; :meth:`run` returns a Deferred fired in the
    reactor thread with ``f(*args)``'s result or its Failure."""

    def __init__(self, reactor, name):
        self.reactor = reactor
        self.name = name
        self._queue = queue.SimpleQueue()
        self._thread = None

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    def run(self, f, *args):
        if self._thread is None:
            self.start()
        d = defer.Deferred()
        self._queue.put((d, f, args))
        return d

    def stop(self):
        """Finish what was submitted, then end the thread (joined)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            if thread is not threading.current_thread():
                thread.join()

    def _work(self):
        _no_wakeup_preemption()
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            d, f, args = item
            try:
                result = f(*args)
            except BaseException:
                self.reactor.callFromThread(d.errback, Failure())
            else:
                self.reactor.callFromThread(d.callback, result)
            del item, d, f, args
