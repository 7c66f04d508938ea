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

Only the reactor instance given is changed (its ``doIteration`` attribute),
and only an epoll reactor whose internals look as expected; anything else is
left alone.
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
    if (poller is None or not isinstance(selectables, dict) or dispatch is None
            or not hasattr(poller, "poll") or not hasattr(reactor, "doPoll")):
        return False
    get = selectables.get

    def doIteration(timeout):
        if timeout is None:
            timeout = -1
        try:
            # At most one event per tracked descriptor, as Twisted asks for.
            events = poller.poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = get(fd)
            if selectable is not None:
                dispatch(selectable, fd, event)

    reactor.doIteration = doIteration
    reactor._mailsys_lean = True
    return True
