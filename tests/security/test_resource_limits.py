"""Resource exhaustion: memory stays bounded whatever the client sends, and a
client cannot keep a connection (and its slot) open past the timeouts."""
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure

from mailsys.smtp.reply import Reply
from tests.helpers import FakeHandler, connect, limits, take

OK = b"250 2.0.0 Ok\r\n"
SENDER_OK = b"250 2.1.0 Ok\r\n"
TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
QUEUED = b"250 2.0.0 Ok: queued as TESTID\r\n"
MB = 1024 * 1024


class CountingHandler(FakeHandler):
    """Counts body bytes instead of keeping them."""

    def __init__(self):
        super().__init__()
        self.received = 0

    def data_chunk(self, proto, txn, chunk):
        self.received += len(chunk)


def _in_data(handler, **kw):
    proto, t, h, clock = connect(handler, limits_=limits(message_size=64 * MB), **kw)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert t.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    take(t)
    return proto, t, h


def test_10_mb_line_in_data_keeps_the_carry_tiny():
    h = CountingHandler()
    proto, t, h = _in_data(h)
    chunk = b"A" * 65536
    for i in range(160):                                  # 10 MiB, no CR, no LF
        proto.dataReceived(chunk)
        assert len(proto._reader._pending) <= 5
        assert proto._buf == b""
        assert h.received >= (i + 1) * 65536 - 5          # streamed, not held
    assert t.value() == b""
    # a "command" inside the long line's continuation is still body text
    proto.dataReceived(b"\r\nQUIT\r\n.\r\nNOOP\r\n")
    assert t.value() == QUEUED + OK
    size = 160 * 65536 + len(b"\r\nQUIT\r\n")
    assert h.received == size
    assert h.calls[-1] == ("data_end", size, ["c@d.example"])


def test_carry_stays_tiny_when_every_segment_ends_in_a_partial_marker():
    h = CountingHandler()
    proto, t, h = _in_data(h)
    for tail in (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r") * 40:
        proto.dataReceived(b"B" * 65536 + tail)
        assert len(proto._reader._pending) <= 5
    assert t.value() == b""


def test_1_mb_command_line_in_small_segments():
    proto, t, h, clock = connect()
    take(t)
    for i in range(256):
        proto.dataReceived(b"NOOP" + b"x" * 4092 if i == 0 else b"y" * 4096)
        assert len(proto._buf) < 4096
        assert t.value() == b""
    proto.dataReceived(b"QUIT looks like a command but is not\r\nNOOP\r\n")
    assert t.value() == TOO_LONG + OK
    assert t.connected


def test_1_mb_command_line_in_one_segment():
    proto, t, h, clock = connect()
    take(t)
    proto.dataReceived(b"NOOP " + b"z" * MB)
    assert len(proto._buf) < 4096
    proto.dataReceived(b"\r\nNOOP\r\n")
    assert t.value() == TOO_LONG + OK
    proto.dataReceived(b"MAIL " + b"z" * MB + b"\r\nNOOP\r\n")
    assert t.value() == TOO_LONG + OK + TOO_LONG + OK
    assert len(proto._buf) == 0


def test_pipelined_flood_without_a_pending_reply_is_consumed():
    proto, t, h, clock = connect()
    take(t)
    proto.dataReceived(b"NOOP\r\n" * 100000)
    assert t.value() == OK * 100000
    assert proto._buf == b""
    assert t.producerState == "producing"


def _mail_reply_pending():
    """A session whose MAIL the handler has not answered yet."""
    h = FakeHandler()
    h.hold.add("mail")
    proto, t, h, clock = connect(h)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    take(t)
    assert h.held
    return proto, t, h


def test_pending_reply_pauses_the_transport_beyond_64_kib_and_resumes_it():
    proto, t, h = _mail_reply_pending()
    flood = b"NOOP\r\n" * 10922 + b"NOOP"
    assert len(flood) == 65536
    for i in range(0, len(flood), 4096):
        proto.dataReceived(flood[i:i + 4096])
    assert t.producerState == "producing"     # exactly 64 KiB held: still reading
    proto.dataReceived(b"\r\n")
    assert t.producerState == "paused"        # beyond 64 KiB: stop reading
    assert t.value() == b""
    h.release("mail")
    assert t.value() == SENDER_OK + OK * 10923
    assert proto._buf == b""
    # the held input is consumed: the client must be read again
    assert t.producerState == "producing"


def test_resumed_after_the_last_of_several_pending_replies():
    h = FakeHandler()
    h.hold.update({"mail", "rcpt"})
    proto, t, h, clock = connect(h)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    take(t)
    proto.dataReceived(b"RCPT TO:<c@d.example>\r\n" + b"NOOP\r\n" * 12000)
    assert t.producerState == "paused"
    h.release("mail")
    assert t.value() == SENDER_OK
    h.release("rcpt", Reply(250, "2.1.5", "Ok"))
    assert t.value() == SENDER_OK + b"250 2.1.5 Ok\r\n" + OK * 12000
    assert t.producerState == "producing"


# -- a client that does not read ---------------------------------------------------------

class _Backlog(StringTransportWithDisconnection):
    """A transport whose unsent bytes the test sets (``dataBuffer``, as
    Twisted's TCP transports keep them)."""
    dataBuffer = b""


def _backlogged(h=None):
    from mailsys.smtp.server import SMTPServerProtocol

    clock = Clock()
    h = h if h is not None else FakeHandler()
    proto = SMTPServerProtocol(h, "mx.example.com", limits=limits(), clock=clock)
    t = _Backlog()
    t.protocol = proto
    proto.makeConnection(t)
    take(t)
    return proto, t, h, clock


def test_replies_the_client_does_not_read_stop_the_reading():
    """Past 256 KiB of unsent replies we stop reading until they drain: a client
    that pipelines without reading gets no more replies buffered for it (an EHLO
    flood of 16 MB took a server from 59 to 323 MB before)."""
    proto, t, h, clock = _backlogged()
    t.dataBuffer = b"x" * (256 * 1024)
    proto.dataReceived(b"NOOP\r\n")
    assert t.producerState == "producing"       # exactly the limit: still reading
    t.dataBuffer += b"x"
    proto.dataReceived(b"NOOP\r\n")
    assert t.producerState == "paused"
    clock.advance(0.1)
    assert t.producerState == "paused"          # still not read by the client
    t.dataBuffer = b""
    clock.advance(0.1)
    assert t.producerState == "producing"
    assert len(clock.getDelayedCalls()) == 1      # the command timeout's: polling stopped


def test_both_reasons_to_stop_reading_must_end_before_reading_again():
    h = FakeHandler()
    h.hold.add("mail")
    proto, t, h, clock = _backlogged(h)
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    t.dataBuffer = b"x" * (300 * 1024)
    proto.dataReceived(b"NOOP\r\n" * 12000)     # beyond 64 KiB behind a pending reply
    assert t.producerState == "paused"
    h.release("mail")                             # the input is consumed ...
    assert t.value().endswith(SENDER_OK + OK * 12000)
    assert t.producerState == "paused"            # ... but the replies still wait
    t.dataBuffer = b""
    clock.advance(0.1)
    assert t.producerState == "producing"


class _Unread(StringTransport):
    """A peer that reads nothing, or never finishes a TLS handshake: Twisted's
    loseConnection waits for it for ever; only abortConnection ends it."""

    def abortConnection(self):
        self.aborted = True
        self.protocol.connectionLost(Failure(ConnectionAborted()))


def test_a_connection_that_will_not_close_is_cut_after_the_grace_time():
    from mailsys.smtp.server import CLOSE_GRACE, SMTPServerProtocol

    clock = Clock()
    h = FakeHandler()
    proto = SMTPServerProtocol(h, "mx.example.com", limits=limits(command_timeout=300),
                               clock=clock)
    t = _Unread()
    t.protocol = proto
    proto.makeConnection(t)
    clock.advance(300)
    assert t.value().endswith(b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n")
    assert t.disconnecting and not getattr(t, "aborted", False)
    clock.advance(CLOSE_GRACE - 0.1)
    assert not getattr(t, "aborted", False) and h.calls[-1] != ("disconnected",)
    clock.advance(0.1)
    assert t.aborted and h.calls[-1] == ("disconnected",)
    assert clock.getDelayedCalls() == []


def test_the_grace_time_is_at_most_the_command_timeout():
    from mailsys.smtp.server import SMTPServerProtocol

    clock = Clock()
    proto = SMTPServerProtocol(FakeHandler(), "mx.example.com", limits=limits(command_timeout=3),
                               clock=clock)
    t = _Unread()
    t.protocol = proto
    proto.makeConnection(t)
    clock.advance(3)
    clock.advance(3)
    assert t.aborted
