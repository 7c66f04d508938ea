"""Cheaper socket I/O for our request/reply protocols on Twisted's stream transports.

Both tricks apply only to a plain (non-TLS) TCP or UNIX stream connection of
Twisted's own, whose attributes they check first; anything else (TLS, a test's
StringTransport) keeps the ordinary path.

* **Send now** (:func:`direct` / :func:`send`): ``transport.write`` only
  buffers; the bytes leave on the reactor's next pass, after an ``epoll_ctl`` to
  watch for writability and before another to stop.  For a reply or a command
  that fits the socket buffer, which is every one of ours, that is two extra
  system calls and a reactor pass per round trip.  When nothing is buffered we
  ``send`` at once; whatever does not fit goes through ``transport.write``, so
  ordering is kept.
* **Plain reads** (:func:`plain_reads`): Twisted's UNIX transports read with
  ``recvmsg`` and a 4 KiB ancillary buffer on every read, to accept passed file
  descriptors; our LMTP sessions between the queue and the MDA never pass one,
  and a ``recv`` is cheaper.  The connection then reads as a TCP one does.
"""
from twisted.internet import tcp

try:
    from twisted.internet import unix
except ImportError:     # pragma: no cover - no AF_UNIX
    unix = None


def direct(transport):
    """Whether :func:`send` may bypass ``transport.write`` on this transport."""
    return (isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)
            and hasattr(transport, "_tempDataBuffer") and hasattr(transport, "dataBuffer")
            and hasattr(transport, "socket"))


def send(transport, data):
    """Send ``data`` on a transport :func:`direct` accepted: at once when nothing
    is waiting in Twisted's buffer, the rest (or all) through ``transport.write``."""
    if not transport.dataBuffer and not transport._tempDataBuffer and not transport.disconnecting:
        try:
            n = transport.socket.send(data)
        except OSError:
            n = 0   # let Twisted's own write path see and report the error
        if n == len(data):
            return
        data = data[n:]
    transport.write(data)


def plain_reads(transport):
    """Make a UNIX stream connection read with ``recv`` (see above).  Returns
    True if it did."""
    if unix is None or not isinstance(transport, (unix.Server, unix.Client)):
        return False
    if getattr(transport, "_sendmsgQueue", None):
        return False
    transport.doRead = tcp.Connection.doRead.__get__(transport)
    return True


# Bounds for a client that does not read (the SMTP, LMTP and POP3 servers).
MAX_UNSENT = 256 * 1024   # replies waiting for it before we stop reading its commands
UNSENT_POLL = 0.1         # seconds between looks at them while reading is paused
# Seconds a connection we close gets to take its last reply (at most the idle
# timeout).  Closing waits for unsent replies and for a TLS handshake in
# progress: a client that reads nothing, or never finishes the handshake, would
# keep the connection, and its slot under the connection limits, for ever.
CLOSE_GRACE = 10.0


def unsent(transport):
    """Bytes written to ``transport`` and not yet taken by the kernel: Twisted's
    write buffer of the TCP or UNIX connection under it (a TLS layer's included,
    as encrypted bytes); 0 for a transport without one (a test's)."""
    t = transport
    for _ in range(3):
        buffered = getattr(t, "dataBuffer", None)
        if buffered is not None:
            return len(buffered) + getattr(t, "_tempDataLen", 0)
        t = getattr(t, "transport", None)
        if t is None:
            break
    return 0


class ClientBounds:
    """What our server protocols (SMTP, LMTP, POP3) share for a client that
    does not read.  The protocol keeps ``transport``, ``clock``, ``_closing``,
    ``_paused`` (it stopped reading for a reason of its own) and
    ``_out_full`` (this class stopped it), and calls :meth:`_check_output`
    after writing replies and :meth:`_abort` :data:`CLOSE_GRACE` after closing."""

    def _check_output(self):
        """Stop reading while more than :data:`MAX_UNSENT` bytes of replies wait
        for the client: one that pipelines commands without reading the replies
        would otherwise make us buffer every one (about 19 bytes out for each
        byte of EHLO in) until memory runs out.  Polled rather than Twisted's
        producer API, which before a TLS handshake pauses the very reading that
        the handshake needs."""
        if unsent(self.transport) <= MAX_UNSENT:
            if self._out_full:
                self._out_full = False
                if not self._paused and not self._closing:
                    self.transport.resumeProducing()
            return
        if not self._out_full:
            self._out_full = True
            if not self._paused:
                self.transport.pauseProducing()
        if not self._closing:
            self.clock.callLater(UNSENT_POLL, self._check_output)

    def _abort(self):
        """The connection did not close in the grace time: cut it (RST), as
        Postfix's write timeout does; the client had its last reply queued."""
        self._abort_timer = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
