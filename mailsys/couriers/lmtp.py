"""The LMTP courier (RFC 2033): local recipients handed to the MDA's LMTP listener.

A session is one connection: greeting and ``LHLO`` once, then per delivery
``MAIL FROM`` and every ``RCPT TO`` (one write when the server offers
PIPELINING), ``DATA`` only when a recipient was accepted, the message
dot-stuffed, then exactly one reply per accepted recipient, in RCPT order (RFC
2033 section 4.2).  When the server offers CHUNKING as well (our MDA does), the
message goes as one ``BDAT <size> LAST`` in the same write as the envelope,
undotted, and the final replies come after the RCPT replies with nothing in
between: one round trip per delivery instead of two, and no pass over the
message to stuff it.  After the last final reply the transaction is over on both
sides (RFC 5321 4.1.1.4), so the courier hands the session the next waiting
delivery at once, or keeps it idle for :data:`IDLE_TIMEOUT` seconds; it ends
with ``QUIT`` after :data:`MAX_MESSAGES` deliveries, when idle for too long, and
after any delivery that did not end with its final replies (a refused MAIL, no
recipient accepted, an error).  Reuse saves the connect, accept, greeting,
``LHLO``, ``QUIT`` and close of every message after the first: on a busy queue
that was a third of the delivery side's CPU (docs/performance.rst).  A reused
session found dead before its ``MAIL`` was answered cannot have delivered
anything, so that delivery is retried on a fresh connection rather than failed.

The contract (mailsys.delivery) is per recipient: :class:`Delivered` only for a
2xx final reply actually read from the server.  A connection lost, a timeout or
a reply we cannot parse before a recipient's final reply makes that recipient a
:class:`TempFail`: a missing reply is never success (maddy #453 lost mail by
counting one as delivered).  :meth:`LMTPCourier.deliver` never fails; every
error becomes a TempFail whose reply says what happened.

The message is dot-stuffed a chunk at a time with ``bytes.replace`` (no Python
work per line) and, when it is larger than one chunk, written through a pull
producer so that no more than a chunk or two of stuffed copy is held besides
the message itself.
"""
import ipaddress
import re
from collections import deque
from functools import partial

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from mailsys import fastio
from mailsys.delivery import Delivered, PermFail, TempFail, lmtp_action
from mailsys.logs import MailLog
from mailsys.smtp.address import AddressError, parse_path
from mailsys.smtp.params import QUEUE_ID
from mailsys.smtp.reply import PeerReply, Reply

log = MailLog("mailsys.courier.lmtp")

MAX_LINE = 4096          # bytes per reply line, CRLF included
MAX_REPLY_LINES = 256    # lines of one multi-line reply
CHUNK = 256 * 1024       # message bytes stuffed and written at a time
CONNECT_TIMEOUT = 30     # seconds, at most (never more than the session timeout)
MAX_MESSAGES = 1000      # deliveries per session before QUIT
IDLE_TIMEOUT = 5         # seconds an idle session waits for the next delivery
MAX_RETRIES = 2          # fresh sessions tried for a delivery whose reused session died

RETRY = object()         # a session's result when it died before its MAIL was answered

_HOSTNAME = re.compile(r"[A-Za-z0-9._:\-\[\]]{1,255}\Z")

__all__ = ["LMTPCourier", "LMTPClientProtocol", "ReplyParser", "ProtocolError",
           "client_endpoint_for", "split_description", "stuffed_chunks", "plain_chunks",
           "parse_reply"]


# --- endpoints -----------------------------------------------------------------------

def split_description(text):
    """A Twisted endpoint description as ``(positional args, keyword args)``.

    Same grammar as Twisted's strports: ``:`` separates arguments, the first ``=``
    in an argument separates its name from its value, a backslash escapes the
    next character.
    """
    args, kwargs = [], {}
    parts, current = [], []
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
            _add_argument(parts, args, kwargs)
            parts = []
        elif ch == "=" and not parts:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    _add_argument(parts, args, kwargs)
    return args, kwargs


def _add_argument(parts, args, kwargs):
    if len(parts) == 1:
        args.append(parts[0])
    else:
        kwargs[parts[0]] = parts[1]


def client_endpoint_for(reactor, listen_string, timeout=CONNECT_TIMEOUT):
    """The client endpoint that reaches a ``listen.lmtp`` server endpoint string.

    ``unix:/path/lmtp.sock[:mode=...]`` (or ``unix:address=/path``) connects to the
    socket; ``tcp:PORT[:interface=ADDR]`` to ADDR, or to 127.0.0.1 when the server
    listens on every address; ``tcp6:`` likewise with ``::1``.  Anything else is a
    :class:`ValueError`.
    """
    kind, sep, rest = listen_string.strip().partition(":")
    kind = kind.strip().lower()
    if not sep:
        raise ValueError(f"{listen_string!r} is not an endpoint string")
    args, kwargs = split_description(rest)
    if kind == "unix":
        path = kwargs.get("address", args[0] if args else "")
        if not path:
            raise ValueError(f"{listen_string!r}: a unix: endpoint needs a socket path")
        return UNIXClientEndpoint(reactor, path, timeout=timeout)
    if kind in ("tcp", "tcp6"):
        port = kwargs.get("port", args[0] if args else "")
        try:
            port = int(port)
        except ValueError:
            raise ValueError(f"{listen_string!r}: bad port {port!r}") from None
        if not 0 < port <= 65535:
            raise ValueError(f"{listen_string!r}: cannot connect to port {port}")
        host = kwargs.get("interface", args[1] if len(args) > 1 else "").strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            address = ipaddress.ip_address(host) if host else None
        except ValueError:
            raise ValueError(f"{listen_string!r}: the interface must be an IP address") from None
        if address is None or address.is_unspecified:
            address = ipaddress.ip_address("::1" if kind == "tcp6" else "127.0.0.1")
        if address.version == 6:
            return TCP6ClientEndpoint(reactor, str(address), port, timeout=timeout)
        return TCP4ClientEndpoint(reactor, str(address), port, timeout=timeout)
    raise ValueError(f"{listen_string!r}: cannot connect to a {kind}: endpoint "
                     "(use unix:PATH or tcp:PORT)")


# --- replies ---------------------------------------------------------------------------

class ProtocolError(Exception):
    """The server said something that is not an SMTP/LMTP reply."""


class ReplyParser:
    """Bytes from the server in, complete replies out as ``(code, [text lines])``.

    Memory is bounded: a line longer than :data:`MAX_LINE` or a reply of more than
    :data:`MAX_REPLY_LINES` lines is a :class:`ProtocolError`.  :meth:`feed` returns
    the replies completed by the data, followed by a ProtocolError instance if the
    data turned out to be bad (the replies before it still count); after an error
    the parser accepts nothing more.
    """

    __slots__ = ("_buf", "_code", "_texts", "_broken")

    def __init__(self):
        self._buf = b""
        self._code = None
        self._texts = []
        self._broken = False

    def feed(self, data):
        if self._broken:
            return []
        buf = self._buf + data if self._buf else data
        out = []
        start = 0
        try:
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                if nl + 1 - start > MAX_LINE:
                    raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
                line = buf[start:nl - 1] if nl > start and buf[nl - 1] == 13 else buf[start:nl]
                start = nl + 1
                reply = self._line(line)
                if reply is not None:
                    out.append(reply)
            rest = buf[start:]
            if len(rest) >= MAX_LINE:
                raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
            self._buf = rest
        except ProtocolError as e:
            self._broken = True
            self._buf = b""
            out.append(e)
        return out

    def _line(self, line):
        if (len(line) < 3 or not line[:3].isdigit() or line[0] not in b"2345"
                or (len(line) > 3 and line[3] not in b" -")):
            raise ProtocolError(f"malformed reply line {_show(line)}")
        code = int(line[:3])
        if self._code is not None and code != self._code:
            raise ProtocolError(f"reply code changed within a multi-line reply: {_show(line)}")
        text = line[4:].decode("utf-8", "replace").replace("\r", " ")
        self._texts.append(text)
        if line[3:4] == b"-":
            if len(self._texts) >= MAX_REPLY_LINES:
                raise ProtocolError(f"reply of more than {MAX_REPLY_LINES} lines")
            self._code = code
            return None
        texts, self._texts, self._code = self._texts, [], None
        return code, texts


def _show(line, limit=60):
    text = repr(bytes(line[:limit]))
    return text + ("..." if len(line) > limit else "")


def _status_of(code, text):
    """The RFC 3463 status at the start of ``text`` if it matches the reply's class."""
    head = text.split(" ", 1)[0]
    parts = head.split(".")
    if (len(parts) == 3 and parts[0] == str(code)[0]
            and all(p.isascii() and p.isdigit() and 1 <= len(p) <= 3 for p in parts[1:])):
        return head
    return ""


def parse_reply(code, texts):
    """``(code, [text lines])`` as a :class:`PeerReply` (what the peer said, as
    opposed to a reply of our own making), the enhanced status code taken
    from the first line (and removed from every line that repeats it)."""
    status = _status_of(code, texts[0])
    if status:
        n = len(status)
        texts = [t[n:].lstrip(" ") if t.startswith(status) and t[n:n + 1] in ("", " ") else t
                 for t in texts]
    return PeerReply(code, status, *texts)


def _clean(text, limit=400):
    """Text safe for a Reply line: one line, bounded."""
    text = " ".join(str(text).split())
    return text[:limit] if text else "(no details)"


def failure_for(reply):
    """The outcome a negative reply stands for: 5xx permanent, anything else temporary.

    A reply that is neither 4xx nor 5xx where a refusal was expected is a protocol
    error, so temporary."""
    if reply.code >= 500:
        return PermFail(reply)
    if reply.code >= 400:
        return TempFail(reply)
    return TempFail(Reply(451, "4.5.0", _clean(f"LMTP protocol error: unexpected reply: {reply}")))


# --- dot-stuffing ----------------------------------------------------------------------

def stuffed_chunks(message, size=CHUNK):
    """The message as it goes after the 354: dot-stuffed, in pieces of about ``size``
    message bytes, the last piece ending with the ``.`` line.

    Each piece is stuffed with one ``bytes.replace`` over the two bytes before it and
    its own bytes (a virtual CRLF before the first), so a ``CRLF.`` cut by a piece
    boundary is still found, and found once.  A message not ending in CRLF gets one
    before the terminator; an empty message is just the terminator.
    """
    if size < 2:
        raise ValueError("chunk size must be at least 2")
    n = len(message)
    if n == 0:
        yield b".\r\n"
        return
    tail = b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n"
    start = 0
    while start < n:
        end = min(start + size, n)
        # Most pieces of a big body have no line starting with "."; one find
        # (in place, no copy) tells, and such a piece is sent as its slice.
        # Many have no "." at all (base64): a one-byte find, at memchr speed,
        # tells that before the three-byte one (1.3 GB/s) is needed.
        if ((message.find(b".", start, end) < 0
             or message.find(b"\r\n.", max(start - 2, 0), end) < 0)
                and not (start == 0 and message[:1] == b".")):
            piece = message[start:end]
        else:
            before = message[start - 2:start] if start else b"\r\n"
            piece = (before + message[start:end]).replace(b"\r\n.", b"\r\n..")[2:]
        if end == n:
            piece += tail
        yield piece
        start = end


def plain_chunks(message, size=CHUNK):
    """The message in pieces of ``size`` bytes, as they are: a BDAT chunk needs
    no stuffing and no terminator."""
    for start in range(0, len(message), size):
        yield message[start:start + size]


@implementer(IPullProducer)
class _BodyProducer:
    """Writes the message a piece each time the transport asks for more, then
    calls ``done`` (the DATA path's ``_body_sent`` unless told otherwise)."""

    def __init__(self, proto, chunks, done=None):
        self.proto = proto
        self.chunks = chunks
        self.done = done or proto._body_sent
        self.pending = next(chunks)
        self.stopped = False

    def resumeProducing(self):
        if self.stopped:
            return
        chunk, self.pending = self.pending, next(self.chunks, None)
        self.proto._touch()
        self.proto.transport.write(chunk)
        if self.pending is None:
            self.stopped = True
            self.proto.transport.unregisterProducer()
            self.done()

    def stopProducing(self):
        self.stopped = True


# --- the protocol ----------------------------------------------------------------------

class LMTPClientProtocol(Protocol):
    """One LMTP session delivering one message to ``recipients``.

    ``recipients`` are ``(address, options)`` pairs, addresses without angle
    brackets; ``options`` may hold ``"orcpt": (type, address)`` (sent only when the
    server offers DSN).  ``params`` are the envelope's: ``"body"`` ("8BITMIME" or
    "7BIT") and ``"smtputf8"`` (true) become MAIL FROM parameters when the server
    offers 8BITMIME / SMTPUTF8.

    :attr:`result` fires once with one Outcome per recipient, in order, as soon
    as every recipient has one; :attr:`closed` fires when the connection is gone.
    Neither ever fails.
    """

    def __init__(self, hostname, sender, recipients, message, params=None, *, clock, timeout=300,
                 on_ready=None):
        self.hostname = hostname
        self.clock = clock
        self.timeout = timeout
        self.on_ready = on_ready     # reuse: called with the session after each clean delivery
        self.transactions = 0
        self.extensions = {}
        self.closed = defer.Deferred()
        self._parser = ReplyParser()
        self._expect = deque()
        self._pipelining = False
        self._chunking = False
        self._direct = False      # mailsys.fastio, decided in connectionMade
        self._quitting = False
        self._closing = False
        self._lost = False
        self._timer = None
        self._deadline = 0.0
        self._begin(sender, recipients, message, params)
        self.phase = "before connecting"

    def _begin(self, sender, recipients, message, params):
        """The state of one delivery (transaction) on this session."""
        self.sender = sender or ""
        self.recipients = [(address, dict(options or {})) for address, options in recipients]
        self.message = bytes(message)
        self.params = dict(params or {})
        self.outcomes = [None] * len(self.recipients)
        self.result = defer.Deferred()
        self._to_send = deque()
        self._rcpt_left = 0
        self._accepted = []
        self._mail_refused = False
        self._mail_answered = False
        self._finished = False
        self._producer = None
        self._quit_when_sent = False
        self.transactions += 1

    def send(self, sender, recipients, message, params=None):
        """Another delivery on this session, idle after a clean one (see
        ``on_ready``): a Deferred of its outcomes, or of :data:`RETRY` when the
        session turns out to be dead before ``MAIL`` was answered."""
        if not self._finished or self._expect or self._quitting:
            raise RuntimeError("the LMTP session is not idle")
        self._begin(sender, recipients, message, params)
        if self._closing or self._lost:
            self._finished = True
            self.result.callback(RETRY)
        else:
            self._start_transaction()
        return self.result

    def quit(self):
        """End the session politely (``QUIT``); nothing in flight is lost."""
        self._quit()

    # -- connection, timeouts ---------------------------------------------------------

    def connectionMade(self):
        self._direct = fastio.direct(self.transport)
        fastio.plain_reads(self.transport)
        self.phase = "waiting for the greeting"
        self._touch()
        self._expect.append(self._on_greeting)
        if not self.recipients:
            self._finish()

    def connectionLost(self, reason=None):
        self._lost = self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._producer is not None:
            self._producer.stopProducing()
        if not self._finished and self.transactions > 1 and not self._mail_answered:
            # A reused session died before this delivery began: nothing was
            # delivered, so the courier retries it on a fresh connection.
            self._finished = True
            self.result.callback(RETRY)
        if not self._finished:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self._fail_rest(TempFail(Reply(451, "4.4.2", _clean(
                f"LMTP connection lost {self.phase}: {why}"))))
            self._finish()
        if not self.closed.called:
            self.closed.callback(None)

    def _touch(self):
        """Progress: the session may go on for another ``timeout`` seconds."""
        self._deadline = self.clock.seconds() + self.timeout
        if self._timer is None and not self._lost:
            self._timer = self.clock.callLater(self.timeout, self._check_timeout)

    def _check_timeout(self):
        self._timer = None
        if self._lost:
            return
        left = self._deadline - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._check_timeout)
            return
        self._fail_rest(TempFail(Reply(451, "4.4.2", _clean(
            f"LMTP timeout {self.phase} (no progress for {self.timeout:g} s)"))))
        self._finish()
        self._abort()

    def _abort(self):
        """Drop the connection now, even one already closing cleanly (a peer that
        reads nothing would otherwise keep it, and its session slot, forever)."""
        self._closing = True
        if not self._lost:
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()

    # -- input --------------------------------------------------------------------------

    def dataReceived(self, data):
        if self._closing:
            return
        for item in self._parser.feed(data):
            if self._closing:
                return
            if isinstance(item, ProtocolError):
                self._protocol_error(str(item))
                return
            code, texts = item
            self._touch()
            try:
                self._reply(code, texts)
            except Exception:
                log.failure("LMTP client error")
                self._fail_rest(TempFail(Reply(451, "4.3.0", "LMTP client error, see the log")))
                self._finish()
                self._abort()
                return

    def _reply(self, code, texts):
        if self._quitting and not self._expect:
            return      # something after the QUIT reply: the session is over anyway
        if code == 421:
            # The server is closing the connection (RFC 5321 3.8): whatever was
            # still open fails with its reason.
            self._fail_rest(TempFail(parse_reply(code, texts)))
            self._finish()
            self._closing = True
            self.transport.loseConnection()
            return
        if not self._expect:
            self._protocol_error(f"unexpected reply {parse_reply(code, texts)}")
            return
        self._expect.popleft()(code, texts)

    def _protocol_error(self, what):
        self._fail_rest(TempFail(Reply(451, "4.5.0", _clean(f"LMTP protocol error {self.phase}: {what}"))))
        self._finish()
        self._abort()

    # -- output -------------------------------------------------------------------------

    def _write(self, data):
        self._touch()
        if self._direct:
            fastio.send(self.transport, data)
        else:
            self.transport.write(data)

    def _fail_rest(self, outcome):
        for i, current in enumerate(self.outcomes):
            if current is None:
                self.outcomes[i] = outcome

    def _finish(self):
        if not self._finished:
            self._finished = True
            self._fail_rest(TempFail(Reply(451, "4.3.0", "LMTP session ended without a final reply")))
            self.result.callback(list(self.outcomes))

    def _quit(self):
        self._finish()
        if self._quitting or self._closing:
            return
        self._quitting = True
        self.phase = "after QUIT"
        self._write(b"QUIT\r\n")
        self._expect.append(self._on_quit)

    def _on_quit(self, code, texts):
        self._closing = True
        self.transport.loseConnection()

    # -- the session ----------------------------------------------------------------------

    def _on_greeting(self, code, texts):
        if code // 100 != 2:
            self._fail_rest(failure_for(parse_reply(code, texts)))
            self._quit()
            return
        self.phase = "after LHLO"
        self._write(b"LHLO " + self.hostname.encode("ascii", "replace") + b"\r\n")
        self._expect.append(self._on_lhlo)

    def _on_lhlo(self, code, texts):
        if code // 100 != 2:
            # Refusing LHLO says "wrong kind of server" or "not you", both a matter of
            # configuration: keep the mail and retry, whatever the code.
            reply = parse_reply(code, texts)
            self._fail_rest(TempFail(Reply(451, "4.3.5", _clean(f"LMTP server refused LHLO: {reply}"))))
            self._quit()
            return
        for text in texts[1:]:
            keyword, _, argument = text.strip().partition(" ")
            self.extensions[keyword.upper()] = argument.strip()
        self._pipelining = "PIPELINING" in self.extensions
        # BDAT (RFC 3030) with pipelining: the envelope and the whole message in
        # one write, answered in one: one round trip per delivery instead of two
        # (the 354 of DATA), and no dot-stuffing.
        self._chunking = self._pipelining and "CHUNKING" in self.extensions
        self._start_transaction()

    def _start_transaction(self):
        self._check_before_sending()
        self._to_send = deque(i for i, o in enumerate(self.outcomes) if o is None)
        if not self._to_send:
            self._quit()
            return
        self._send_envelope()

    def _check_before_sending(self):
        """Refusals we can tell without asking: SIZE and SMTPUTF8."""
        limit = self.extensions.get("SIZE", "")
        if limit.isascii() and limit.isdigit() and int(limit) and len(self.message) > int(limit):
            self._fail_rest(PermFail(Reply(552, "5.3.4", (
                f"Message size ({len(self.message)} bytes) exceeds the LMTP server's "
                f"limit ({int(limit)} bytes)"))))
            return
        if "SMTPUTF8" in self.extensions:
            return
        if not self.sender.isascii():
            self._fail_rest(PermFail(Reply(553, "5.6.7", (
                "Non-ASCII sender address requires SMTPUTF8, which the LMTP server does not offer"))))
            return
        for i, (address, _) in enumerate(self.recipients):
            if self.outcomes[i] is None and not address.isascii():
                self.outcomes[i] = PermFail(Reply(553, "5.6.7", (
                    "Non-ASCII recipient address requires SMTPUTF8, which the LMTP server "
                    "does not offer")))

    def _mail_command(self):
        parts = [f"MAIL FROM:<{self.sender}>"]
        if "SIZE" in self.extensions:
            parts.append(f"SIZE={len(self.message)}")
        body = str(self.params.get("body") or "").upper()
        if body in ("8BITMIME", "7BIT") and "8BITMIME" in self.extensions:
            parts.append(f"BODY={body}")
        needs_utf8 = bool(self.params.get("smtputf8")) or not self.sender.isascii() or any(
            not self.recipients[i][0].isascii() for i in self._to_send)
        if needs_utf8 and "SMTPUTF8" in self.extensions:
            parts.append("SMTPUTF8")
        # Our own MDA only (it advertises XQID): the queue id, so that a message
        # recovered after a crash is not stored twice (docs/mda.rst).
        qid = self.params.get("xqid")
        if qid and "XQID" in self.extensions and QUEUE_ID.match(qid):
            parts.append(f"XQID={qid}")
            if self.params.get("xredelivery"):
                parts.append("XREDELIVERY")
        return (" ".join(parts) + "\r\n").encode("utf-8")

    def _rcpt_command(self, i):
        address, options = self.recipients[i]
        line = f"RCPT TO:<{address}>"
        orcpt = options.get("orcpt")
        if orcpt and "DSN" in self.extensions:
            kind, original = orcpt
            line += f" ORCPT={kind};{xtext(original)}"
        return (line + "\r\n").encode("utf-8")

    def _send_envelope(self):
        self.phase = "after MAIL FROM"
        mail = self._mail_command()
        if self._pipelining:
            # RFC 2920: MAIL, every RCPT and DATA go as one group (DATA last); only
            # the message itself waits for the 354.  One round trip per message
            # fewer than asking for DATA after the RCPT replies.
            indexes = list(self._to_send)
            self._to_send.clear()
            self._rcpt_left = len(indexes)
            group = [mail] + [self._rcpt_command(i) for i in indexes]
            self._expect.append(self._on_mail)
            for i in indexes:
                self._expect.append(partial(self._on_rcpt, i))
            if self._chunking:
                self._send_chunk(group)
                return
            self._write(b"".join(group + [b"DATA\r\n"]))
            self._expect.append(self._on_data)
        else:
            self._write(mail)
            self._expect.append(self._on_mail)

    def _on_mail(self, code, texts):
        self._mail_answered = True
        if code // 100 == 2:
            self.phase = "after RCPT TO"
            if not self._pipelining:
                self._next_rcpt()
            return
        self._mail_refused = True
        self._fail_rest(failure_for(parse_reply(code, texts)))
        if not self._pipelining:
            self._quit()
        # Pipelined: the RCPT replies are on their way; they are read and ignored.

    def _next_rcpt(self):
        if self._to_send:
            i = self._to_send.popleft()
            self._write(self._rcpt_command(i))
            self._expect.append(partial(self._on_rcpt, i))
        else:
            self._after_rcpts()

    def _on_rcpt(self, i, code, texts):
        if not self._mail_refused:
            if code // 100 == 2:
                self._accepted.append(i)
            else:
                self.outcomes[i] = failure_for(parse_reply(code, texts))
        if self._pipelining:
            self._rcpt_left -= 1
            if self._rcpt_left == 0:
                if self._chunking:
                    self._after_chunked_rcpts()
                else:
                    self.phase = "after DATA"     # its reply is next (_on_data)
        else:
            self._next_rcpt()

    # -- BDAT ----------------------------------------------------------------------------

    def _send_chunk(self, group):
        """The envelope, ``BDAT <size> LAST`` and the message, as one write when
        it fits a chunk, else the message through a pull producer.  The message
        goes as the spool holds it; one not ending in CRLF gets one, as after
        DATA."""
        message = self.message
        if message and not message.endswith(b"\r\n"):
            message += b"\r\n"
        group.append(b"BDAT %d LAST\r\n" % len(message))
        if len(message) <= CHUNK:
            self._write(b"".join(group + [message]))
            return
        self._write(b"".join(group))
        self.phase = "sending the message"
        self._producer = _BodyProducer(self, plain_chunks(message, CHUNK), self._chunk_sent)
        self.transport.registerProducer(self._producer, False)

    def _chunk_sent(self):
        self._producer = None
        if self._quit_when_sent:
            self._quit()

    def _after_chunked_rcpts(self):
        """Every RCPT is answered: what the BDAT LAST will get is known now."""
        if self._mail_refused or not self._accepted:
            # Nothing to deliver: the outcomes are complete.  Whether a server
            # answers this BDAT once or not at all, QUIT ends the session (after
            # the chunk, whose bytes the server reads as a chunk whatever it
            # answers).
            self._finish()
            if self._producer is None:
                self._quit()
            else:
                self._quit_when_sent = True
            return
        self.phase = "waiting for the final replies"
        last = self._accepted[-1]
        for i in self._accepted:
            self._expect.append(partial(self._on_final, i, i == last))

    def _after_rcpts(self):
        if self._mail_refused or not self._accepted:
            self._quit()
            return
        self.phase = "after DATA"
        self._write(b"DATA\r\n")
        self._expect.append(self._on_data)

    def _on_data(self, code, texts):
        if self._mail_refused or not self._accepted:
            # Only with pipelining: DATA went out before the refusals came back.
            if code // 100 == 3:
                # It must be refused now (RFC 2920 3.1); a server that says 354
                # instead would wait for a message nobody can end cleanly.
                self._protocol_error("DATA accepted without an accepted recipient")
                return
            self._quit()
            return
        if code // 100 != 3:
            outcome = failure_for(parse_reply(code, texts))
            for i in self._accepted:
                self.outcomes[i] = outcome
            self._quit()
            return
        self.phase = "sending the message"
        if len(self.message) <= CHUNK:
            self._write(b"".join(stuffed_chunks(self.message)))
            self._body_sent()
        else:
            self._producer = _BodyProducer(self, stuffed_chunks(self.message, CHUNK))
            self.transport.registerProducer(self._producer, False)

    def _body_sent(self):
        self._producer = None
        self.phase = "waiting for the final replies"
        self._touch()
        last = self._accepted[-1]
        for i in self._accepted:
            self._expect.append(partial(self._on_final, i, i == last))

    def _on_final(self, i, last, code, texts):
        if self._producer is not None:
            # Only after BDAT: a final reply before the server had the whole
            # message cannot be about the message.
            self._protocol_error(f"reply {parse_reply(code, texts)} before the message was sent")
            return
        reply = parse_reply(code, texts)
        self.outcomes[i] = (Delivered(reply, action=lmtp_action(reply)) if code // 100 == 2
                            else failure_for(reply))
        if last:
            if self.on_ready is None:
                self._quit()
                return
            # The transaction is complete on both sides: the session may carry another.
            self._finish()
            self.phase = "between deliveries"
            if not self._closing:
                self.on_ready(self)


def xtext(text):
    """RFC 3461 xtext of ``text`` (UTF-8 bytes outside ``!``..``~``, ``+``, ``=`` as +XX)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


# --- the courier ---------------------------------------------------------------------

class _Plan:
    """A delivery's recipients checked and de-duplicated.

    Each distinct mailbox is sent once (the server keeps a repeated RCPT once, so
    a second RCPT for it would leave the reply count ambiguous); every recipient
    gets the outcome of its mailbox.  Addresses that do not parse (RFC 5321, with
    SMTPUTF8 allowed) are refused here and never reach the wire: no CR, LF or
    stray ``>`` can be smuggled into a command.
    """

    def __init__(self, sender, recipients, params):
        self.sender = sender or ""
        self.params = dict(params or {})
        self.outcomes = []       # per recipient: an Outcome, or the index of its mailbox
        self.unique = []         # [(address, options)] to send
        refused = None
        try:
            parse_path(f"<{self.sender}>", "sender", smtputf8=True, allow_null=True)
        except AddressError as e:
            refused = PermFail(e.reply)
        seen = {}
        for entry in recipients:
            address, options = (entry, {}) if isinstance(entry, str) else entry
            if refused is not None:
                self.outcomes.append(refused)
                continue
            try:
                mailbox = parse_path(f"<{address}>", "recipient", smtputf8=True)
            except AddressError as e:
                self.outcomes.append(PermFail(e.reply))
                continue
            key = (mailbox.local, mailbox.domain)
            if key not in seen:
                seen[key] = len(self.unique)
                self.unique.append((address, dict(options or {})))
            self.outcomes.append(seen[key])

    def expand(self, outcomes):
        """Outcomes per distinct mailbox -> outcomes per recipient, in order."""
        return [o if not isinstance(o, int) else outcomes[o] for o in self.outcomes]


class _Job:
    __slots__ = ("plan", "message", "result", "retries")

    def __init__(self, plan, message, result):
        self.plan, self.message, self.result = plan, message, result
        self.retries = 0


class LMTPCourier:
    """Delivers over LMTP to one server over at most ``max_sessions`` connections,
    each reused for up to ``max_messages`` deliveries; further deliveries wait
    their turn in arrival order.  ``max_messages=1`` gives a connection per
    delivery."""

    def __init__(self, reactor, endpoint_string, hostname, *, timeout=300, max_sessions=10,
                 max_messages=MAX_MESSAGES, idle_timeout=IDLE_TIMEOUT):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if not _HOSTNAME.match(hostname or ""):
            raise ValueError(f"{hostname!r} is no host name for LHLO")
        self.reactor = reactor
        self.endpoint_string = endpoint_string
        self.hostname = hostname
        self.timeout = timeout
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self.endpoint = client_endpoint_for(reactor, endpoint_string,
                                            timeout=max(1, int(min(timeout, CONNECT_TIMEOUT))))
        self.active = 0          # connections open or being opened, idle ones included
        self._waiting = deque()
        self._pumping = False
        self._idle = []          # Deferreds of idle()
        self._sessions = []      # [(protocol, timer)]: connected, between deliveries

    @property
    def waiting(self):
        return len(self._waiting)

    @property
    def idle_sessions(self):
        return len(self._sessions)

    def idle(self):
        """Close the idle sessions; a Deferred that fires once no delivery is
        running or waiting and every connection is closed (a clean shutdown)."""
        if not self.active and not self._waiting:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        while self._sessions:
            proto, timer = self._sessions.pop()
            if timer.active():
                timer.cancel()
            proto.quit()
        return d

    def deliver(self, sender, recipients, message, params=None, *, qid=None, redelivery=False):
        """Deferred of one Outcome per recipient, in order; it never fails.

        ``qid`` and ``redelivery`` (a message recovered after a crash) are
        accepted for every courier's sake; see the queue.  A server that
        advertises ``XQID`` (our MDA) gets them as MAIL parameters."""
        try:
            recipients = list(recipients)
        except Exception:
            return defer.succeed([])
        try:
            plan = _Plan(sender, recipients, params)
            message = bytes(message)
        except Exception as e:
            log.failure("LMTP courier: bad delivery request")
            fail = TempFail(Reply(451, "4.3.0", _clean(f"LMTP courier error: {type(e).__name__}")))
            return defer.succeed([fail] * len(recipients))
        if not plan.unique:
            return defer.succeed(plan.expand([]))
        if isinstance(qid, str) and QUEUE_ID.match(qid):
            plan.params["xqid"] = qid
            plan.params["xredelivery"] = bool(redelivery)
        result = defer.Deferred()
        self._waiting.append(_Job(plan, message, result))
        self._pump()
        return result

    # -- sessions ---------------------------------------------------------------------

    def _pump(self):
        """Give waiting jobs to idle sessions, then to new connections while
        slots are free (a loop, never recursion)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._waiting:
                if self._sessions:
                    proto, timer = self._sessions.pop()
                    if timer.active():
                        timer.cancel()
                    self._run_on(proto, self._waiting.popleft())
                elif self.active < self.max_sessions:
                    job = self._waiting.popleft()
                    self.active += 1
                    self._start(job)
                else:
                    break
        finally:
            self._pumping = False

    def _release(self, proto=None):
        self.active -= 1
        self._forget(proto)
        self._pump()
        if not self.active and not self._waiting and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def _forget(self, proto):
        for i, (p, timer) in enumerate(self._sessions):
            if p is proto:
                del self._sessions[i]
                if timer.active():
                    timer.cancel()
                return

    def _answer(self, outcomes, job):
        if outcomes is RETRY:
            job.retries += 1
            if job.retries <= MAX_RETRIES:
                # First in line for the slot the dead session frees.
                self._waiting.appendleft(job)
                return
            outcomes = [TempFail(Reply(451, "4.4.2", "LMTP sessions keep closing before MAIL FROM "
                                                     "is answered"))] * len(job.plan.unique)
        if not job.result.called:
            job.result.callback(job.plan.expand(outcomes))

    def _session_ready(self, proto):
        """A session finished a delivery cleanly: the next job, or idle."""
        if proto.transactions >= self.max_messages or self._idle:
            proto.quit()
            return
        if self._waiting and not self._pumping:
            self._run_on(proto, self._waiting.popleft())
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, proto)
        self._sessions.append((proto, timer))
        self._pump()

    def _expire(self, proto):
        self._forget(proto)
        proto.quit()

    def _run_on(self, proto, job):
        try:
            d = proto.send(job.plan.sender, job.plan.unique, job.message, job.plan.params)
        except Exception:
            d = defer.fail()
        d.addCallback(self._answer, job)
        d.addErrback(self._bug, job, lambda: None)

    def _start(self, job):
        plan = job.plan
        released = []
        holder = []

        def release_once(_=None):
            if not released:
                released.append(True)
                self._release(holder[0] if holder else None)

        def build():
            proto = LMTPClientProtocol(self.hostname, plan.sender, plan.unique, job.message,
                                       plan.params, clock=self.reactor, timeout=self.timeout,
                                       on_ready=self._session_ready)
            holder.append(proto)
            return proto

        def connected(proto):
            proto.result.addCallback(self._answer, job)
            proto.closed.addBoth(release_once)

        timed_out = []

        def failed(failure):
            if timed_out:
                why = f"timeout after {self.timeout:g} s"
            else:
                why = failure.getErrorMessage()
            fail = TempFail(Reply(451, "4.4.1", _clean(
                f"LMTP connection failed: {self.endpoint_string}: {why}")))
            self._answer([fail] * len(plan.unique), job)
            release_once()

        try:
            d = self.endpoint.connect(_ClientFactory(build))
        except Exception:
            d = defer.fail()
        if not d.called:
            # Our own timer on the injected clock (the endpoint's own connect timeout
            # is the kernel's business and not visible to a test clock).
            def give_up():
                timed_out.append(True)
                d.cancel()

            timer = self.reactor.callLater(self.timeout, give_up)

            def stop_timer(result):
                if timer.active():
                    timer.cancel()
                return result

            d.addBoth(stop_timer)
        d.addCallbacks(connected, failed)
        d.addErrback(self._bug, job, release_once)

    def _bug(self, failure, job, release_once):
        log.failure("LMTP courier error", failure)
        if not job.result.called:
            fail = TempFail(Reply(451, "4.3.0", "LMTP courier error, see the log"))
            job.result.callback([fail] * len(job.plan.outcomes))
        release_once()


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, build):
        self._build = build

    def buildProtocol(self, addr):
        proto = self._build()
        proto.factory = self
        return proto
