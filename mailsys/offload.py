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
"""
import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()


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
