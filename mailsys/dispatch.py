"""The epoll reactor's event dispatch, without the legacy log context.

For every ready descriptor Twisted's ``EPollReactor.doPoll`` calls
``log.callWithLogger(selectable, ...)``: it asks the selectable for its
``logPrefix()`` and pushes a context for the legacy ``log.msg`` system tag
(``ThreadedContextTracker``, ``ContextTracker.callWithContext``, a dict copy),
then calls ``_doReadOrWrite``.  Profiles of end-to-end delivery
(``bench/e2e.py``, ``py-spy --gil``) put that wrapping at about 7% of all the
Python work of both processes: each message is some twenty ready events (an
accepted connection, each SMTP command, the LMTP session's reads, the worker
pipe, the thread wake-ups).

mailsys logs through ``twisted.logger`` with its own namespaces, never through
that context; what the context gave is the ``[SMTPServerProtocol,3,127.0.0.1]``
prefix on a *legacy* message logged from inside a protocol callback (Twisted's
own), which now reads ``[-]`` like any other.  Error handling is unchanged:
``_doReadOrWrite`` itself catches and logs an exception from ``doRead`` or
``doWrite`` and drops the connection, exactly as before.

The same loop also spares the threads' wake-ups.  ``callFromThread`` (how a
disk thread of the spool, the journal or the MDA hands its result back)
appends to ``threadCallQueue`` and calls ``wakeUp``, which writes a byte to the
waker pipe so that a reactor asleep in ``epoll_wait`` returns.  Under load the
reactor is almost never asleep: the write, the GIL the thread gives up and
must take back for it, and the pipe's read as one more ready event on the
reactor's side are wasted.  So the loop keeps a flag, set just before it
polls and cleared when the poll returns, and ``wakeUp`` writes only while the
flag is set.  No call can be left waiting: the flag is set *before* the loop
looks at ``threadCallQueue`` (and then polls without waiting if a call is
queued), and a thread appends *before* it reads the flag; both run under the
GIL, so either the loop sees the call or the thread sees the flag.  Twisted's
SIGTERM and SIGINT handlers also use ``callFromThread``; they run in the
reactor thread itself, either inside the poll (the flag is set: the byte is
written and the retried poll returns at once) or between two steps of the
loop (the next poll sees the queued call).  Measured: docs/performance.rst
(ninth session).

Only the reactor instance given is changed (its ``doIteration`` and ``wakeUp``
attributes), and only an epoll reactor whose internals look as expected;
anything else is left alone.
"""
import errno


def lean_dispatch(reactor):
    """Replace ``reactor.doIteration`` with a dispatch loop that calls
    ``_doReadOrWrite`` directly.  Returns True if it did."""
    if getattr(reactor, "_mailsys_lean", False):
        return True
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    calls = getattr(reactor, "threadCallQueue", None)
    if (poller is None or not isinstance(selectables, dict) or dispatch is None
            or not hasattr(poller, "poll") or not hasattr(reactor, "doPoll")
            or not isinstance(calls, list) or not hasattr(reactor, "waker")):
        return False
    get = selectables.get
    polling = [False]

    def wakeUp():
        # Only a reactor asleep in poll needs the waker's byte (module docstring).
        if polling[0]:
            waker = reactor.waker
            if waker:
                waker.wakeUp()

    def doIteration(timeout):
        polling[0] = True       # before looking at the queue: see the docstring
        try:
            if calls:
                timeout = 0
            elif timeout is None:
                timeout = -1
            # At most one event per tracked descriptor, as Twisted asks for.
            events = poller.poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        finally:
            polling[0] = False
        for fd, event in events:
            selectable = get(fd)
            if selectable is not None:
                dispatch(selectable, fd, event)

    reactor.doIteration = doIteration
    reactor.wakeUp = wakeUp
    reactor._mailsys_lean = True
    return True
