"""The server side of SMTP, ESMTP and LMTP: one state machine for all three.

The protocol parses, enforces limits and timeouts, and asks a *handler* what to
answer; it knows nothing of queues, users or relaying.  A handler method returns
a :class:`~mailsys.smtp.reply.Reply`, None for the default positive reply, or a
Deferred of either; while a Deferred is pending the protocol stops reading
commands, so pipelined commands (RFC 2920) are answered strictly in order
whatever their batching into TCP segments.

Replies produced while handling one batch of input are written with a single
``transport.write``: with PIPELINING a whole MAIL/RCPT/DATA group costs one
send instead of one per reply.
"""
import re

from twisted.internet import defer
from twisted.internet.protocol import Protocol

from mailsys import fastio
from mailsys.fastio import CLOSE_GRACE, MAX_UNSENT, ClientBounds
from mailsys.logs import MailLog
from mailsys.smtp import reply as R
from mailsys.smtp.address import AddressError, parse_path, split_path_and_params
from mailsys.smtp.data import ChunkReader, DataReader, LFDataReader
from mailsys.smtp.params import ParamError, parse_mail_params, parse_rcpt_params
from mailsys.smtp.reply import Reply
from mailsys.smtp import sasl

MAX_LINE = 2048          # bytes per command line, CRLF included (RFC 5321 4.5.3.1.4 plus extensions)
MAX_ERRORS = 10          # bad commands before 421 and close
MAX_BUFFERED = 64 * 1024  # pipelined input held while a reply is pending
# During DATA every byte received earns this much more time, in bytes per second:
# a client slower on average than this is cut off once limits.data_timeout is used
# up, a faster one never (with no pause longer than data_timeout).  Postfix's
# smtpd_min_data_rate is 500 for the same purpose.
MIN_DATA_RATE = 1024
# Replies that mean "the client speaks SMTP wrongly"; they spend the error
# budget.  Policy refusals (550 unknown user, 554 relay denied) do not: a sender
# with several stale addresses is no attacker.  535 has its own limit.
PROTOCOL_ERRORS = frozenset((500, 501, 502, 503, 504, 538, 555))

_HELO_NAME = re.compile(r"[A-Za-z0-9._:\-\[\]]{1,255}\Z")
_MAIL_FROM = re.compile(r"FROM:", re.I)
_RCPT_TO = re.compile(r"TO:", re.I)
# RFC 3030: "BDAT" SP chunk-size [SP "LAST"]; a size of at most 20 digits.
_BDAT = re.compile(r"([0-9]{1,20})(?: +(LAST))? *\Z", re.I)

log = MailLog("mailsys.smtpd")


class Transaction:
    """One mail transaction: from MAIL to the end of DATA (or RSET)."""

    __slots__ = ("sender", "params", "recipients", "queue_id", "handle")

    def __init__(self, sender, params):
        self.sender = sender            # Mailbox, or None for <>
        self.params = params            # MailParams
        self.recipients = []            # [(Mailbox, RcptParams)], accepted ones only
        self.queue_id = None            # set by the handler when it wants to
        self.handle = None              # the handler's message sink during DATA


class Stats:
    """Per-command counts for the Postfix-style disconnect line."""

    __slots__ = ("ok", "total", "order")

    def __init__(self):
        self.ok, self.total, self.order = {}, {}, []

    def count(self, verb, ok):
        verb = verb.lower()
        if verb not in self.total:
            self.total[verb] = self.ok[verb] = 0
            self.order.append(verb)
        self.total[verb] += 1
        self.ok[verb] += 1 if ok else 0

    def __str__(self):
        parts = []
        for v in self.order:
            t, o = self.total[v], self.ok[v]
            parts.append(f"{v}={o}" if o == t else f"{v}={o}/{t}")
        return " ".join(parts)


class SMTPServerProtocol(ClientBounds, Protocol):
    """ESMTP (RFC 5321) or, with ``lmtp=True``, LMTP (RFC 2033)."""

    lmtp = False

    def __init__(self, handler, hostname, *, limits, clock, lmtp=False, tls_available=False,
                 auth_mechanisms=(), etrn=False, chunking=False):
        self.handler = handler
        self.etrn = etrn
        self.chunking = chunking
        self.hostname = hostname
        self.limits = limits
        self.clock = clock
        self.lmtp = lmtp
        self.tls_available = tls_available
        self.auth_mechanisms = tuple(auth_mechanisms)
        self.helo = None
        self.esmtp = False
        self.tls = False
        self.auth_user = None
        self.sasl_method = None     # the mechanism of the last AUTH, for the log
        self.auth_failures = 0
        self.txn = None
        self.errors = 0
        self._sasl = None
        self.stats = Stats()
        # The last command read, for "lost connection after RCPT", "timeout after
        # DATA (N bytes)", "too many errors after ..." as Postfix words them.
        self._verb = "CONNECT"
        self._buf = b""
        self._reader = None
        self._data_size = 0
        self._data_too_big = False
        self._discarding = False
        self._blocked = False
        self._paused = False        # reading paused: input piled up behind a pending reply
        self._out_full = False      # reading paused: replies the client does not read pile up
        self._closing = False
        self._abort_timer = None
        self._out = []
        self._deadline = 0.0
        self._data_started = 0.0
        self._data_received = 0
        self._timer = None
        self._direct = False
        # BDAT (RFC 3030): the transaction's chunk reader, the bytes of the current
        # chunk still to come, whether it is the last, and the reply it gets
        # instead of the usual one when it cannot be taken (its bytes are skipped).
        self._chunks = None
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_error = None
        # While the handler stores a message that came by BDAT, the replies to the
        # commands before it (MAIL, RCPT) wait and go out with its final replies
        # (RFC 2920 lets a server hold a group's replies; it must only not wait
        # for input with replies held, and nothing is read while a handler is
        # pending): a pipelined delivery by BDAT is then one write each way.
        self._hold = False

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self):
        t = self.transport
        self._direct = fastio.direct(t)
        fastio.plain_reads(t)
        self._arm(self.limits.command_timeout)
        self._run(self.handler.connected(self), self._greet)
        self._flush()

    def _greet(self, refusal):
        if refusal is not None and refusal.code >= 400:
            self._send(refusal)
            self._close()
            return
        kind = "LMTP" if self.lmtp else "ESMTP"
        self._out.append(f"220 {self.hostname} {kind}\r\n".encode("ascii"))

    def connectionLost(self, reason):
        if not self._closing and not self.lmtp:
            # The client went without QUIT (we had not closed): say after what,
            # and count a command it left unanswered as failed (data=0/1).
            self._count_unfinished()
            client = self.handler.client_name(self)
            where = self._where()
            log.info(f"lost connection after {where} from {client}", client=client, after=where)
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        self._abort_transaction()
        self.handler.disconnected(self)

    def _where(self):
        """The last command, with the bytes of a message in progress."""
        if self._reader is not None or self._chunk_left:
            return f"{self._verb} ({self._data_received} bytes)"
        return self._verb

    def _count_unfinished(self):
        """A message or an AUTH exchange in progress got no reply: count its
        command as failed for the disconnect line (``data=0/1``, ``auth=0/1``).
        A command whose reply the handler still owes (a commit) is left alone:
        that reply may yet be counted."""
        if self._reader is not None or self._chunk_left:
            self.stats.count(self._verb, False)
        elif self._sasl is not None:
            self.stats.count("auth", False)

    # -- timeouts: a deadline moved by complete commands only -----------------

    def _arm(self, seconds):
        """Set the deadline.  Only complete commands (or the start of DATA) move it,
        so a client trickling bytes cannot hold the connection forever; in DATA,
        received bytes move it only as far as :data:`MIN_DATA_RATE` allows
        (:meth:`_data_progress`)."""
        self._deadline = self.clock.seconds() + seconds
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._deadline:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(seconds, self._check_timeout)

    def _data_progress(self, n):
        """``n`` bytes of message data arrived.  The DATA deadline becomes the
        earlier of ``data_timeout`` from now (no pause longer than that) and
        ``data_timeout`` after the 354 plus one second per :data:`MIN_DATA_RATE`
        bytes received: a big message over a slow link gets through, a trickle
        does not hold the connection.  Never earlier than the timer set at the
        354, which looks at the deadline again when it fires."""
        self._data_received += n
        timeout = self.limits.data_timeout
        self._deadline = min(self.clock.seconds() + timeout,
                             self._data_started + timeout + self._data_received / MIN_DATA_RATE)

    def _check_timeout(self):
        self._timer = None
        if self._closing:
            return
        left = self._deadline - self.clock.seconds()
        if self._blocked and left > -self.limits.command_timeout:
            # We owe the client a reply (a commit in progress): it is not idle, and
            # closing now could make it resend a message that was in fact queued.
            # A handler stuck for a whole further timeout is given up on.
            left = max(left, 1.0)
        if left > 0:
            self._timer = self.clock.callLater(left, self._check_timeout)
            return
        self._count_unfinished()
        where = self._where()
        client = self.handler.client_name(self)
        log.info(f"timeout after {where} from {client}", after=where, client=client)
        self._send(R.TIMEOUT.with_text(f"{self.hostname} {R.TIMEOUT.text}"))
        self._flush()
        self._close()

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data):
        if self._closing:
            return
        self._buf = self._buf + data if self._buf else data
        self._process()
        if not self._hold:
            self._flush()

    def _process(self):
        while not self._blocked and not self._closing and self._buf:
            if self._chunk_left:
                self._chunk_bytes()
                continue
            if self._reader is not None:
                buf, self._buf = self._buf, b""
                self._data_progress(len(buf))
                rest = self._reader.feed(buf)
                if rest is None:
                    return
                self._buf = rest
                self._end_of_data()
                continue
            buf = self._buf
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) >= MAX_LINE:
                    # Swallow the rest of the over-long line; answer when it ends.
                    self._discarding = True
                    self._buf = b""
                return
            line, self._buf = buf[:nl], buf[nl + 1:]
            if self._discarding or nl + 1 > MAX_LINE:
                self._discarding = False
                if self._sasl is not None:
                    self._sasl = None
                    self._error(sasl.TOO_LONG, "auth")
                else:
                    self._error(R.LINE_TOO_LONG, "unknown")
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self._deadline = self.clock.seconds() + self.limits.command_timeout
            if self._sasl is not None:
                self._sasl_response(line)
            else:
                self._command(line)
        if self._blocked and len(self._buf) > MAX_BUFFERED and not self._paused:
            self._paused = True
            if not self._out_full:
                self.transport.pauseProducing()

    def _command(self, raw):
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._error(R.BAD_BYTES, "unknown")
                return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        method = self._commands.get(verb)
        if method is None or (self.lmtp and verb in ("EHLO", "HELO")) or (
                not self.lmtp and verb == "LHLO") or (verb == "BDAT" and not self.chunking):
            self._verb = "UNKNOWN"
            self._error(R.UNKNOWN_COMMAND, "unknown")
            return
        self._verb = verb
        if verb not in ("MAIL", "RCPT") and not line.isascii():
            self._error(R.BAD_BYTES, verb)
            return
        method(self, arg)

    # -- output ---------------------------------------------------------------

    def _send(self, reply):
        self._out.append(reply.to_bytes())

    def _flush(self):
        if self._out:
            data = b"".join(self._out)
            self._out = []
            self._write(data)
            if not self._out_full and fastio.unsent(self.transport) > MAX_UNSENT:
                self._check_output()

    def _write(self, data):
        """Send now when the socket can take it, else through Twisted's buffer
        (mailsys.fastio: a plain ``transport.write`` costs two epoll_ctl calls and
        a reactor pass besides the send itself)."""
        if self._direct:
            fastio.send(self.transport, data)
        else:
            self.transport.write(data)

    def _reply(self, reply, verb):
        """Send a command's reply, count it, and spend the error budget on failures."""
        ok = reply.code < 400
        self.stats.count(verb, ok)
        self._send(reply)
        if reply.code in PROTOCOL_ERRORS:
            self._spend_error()
        elif reply.code == 421:
            self._close()

    def _error(self, reply, verb):
        self._reply(reply, verb)

    def _spend_error(self):
        self.errors += 1
        if self.errors >= MAX_ERRORS and not self._closing:
            client = self.handler.client_name(self)
            log.info(f"too many errors after {self._verb} from {client}", after=self._verb,
                     client=client)
            self._send(R.TOO_MANY_ERRORS.with_text(f"{self.hostname} {R.TOO_MANY_ERRORS.text}"))
            self._close()

    def _close(self):
        if not self._closing:
            self._closing = True
            self._flush_now()
            self.transport.loseConnection()
            grace = min(CLOSE_GRACE, self.limits.command_timeout)
            self._abort_timer = self.clock.callLater(grace, self._abort)

    def _flush_now(self):
        self._flush()

    def _run(self, result, then):
        """Apply ``then`` to a handler result now, or once its Deferred fires."""
        if not isinstance(result, defer.Deferred):
            then(result)
            return
        self._blocked = True

        def done(value):
            self._blocked = False
            self._hold = False
            if self._closing:
                return
            if self._reader is None and not self._chunk_left:
                # The client's idle time starts when it has our answer.
                self._arm(self.limits.command_timeout)
            then(value)
            self._process()
            if self._paused and not self._blocked and len(self._buf) <= MAX_BUFFERED:
                self._paused = False
                if not self._out_full:
                    self.transport.resumeProducing()
            self._flush()

        def failed(f):
            log.failure("handler failed", f)
            done(R.IO_ERROR)

        result.addCallbacks(done, failed)

    # -- commands -------------------------------------------------------------

    def do_EHLO(self, arg, verb="ehlo"):
        name = arg.strip()
        if not name:
            self._error(Reply(501, "5.5.4", f"Syntax: {verb.upper()} hostname"), verb)
            return
        if not _HELO_NAME.match(name):
            self._error(Reply(501, "5.5.4", f"Error: invalid {verb.upper()} hostname"), verb)
            return
        esmtp = verb != "helo"

        def answered(refusal):
            if refusal is not None and refusal.code >= 400:
                self._reply(refusal, verb)
                return
            self._abort_transaction()
            self.helo, self.esmtp = name, esmtp
            if esmtp:
                self.stats.count(verb, True)
                self._out.append(self._ehlo_response())
            else:
                self._reply(Reply(250, "", self.hostname), verb)

        self._run(self.handler.helo(self, name, esmtp), answered)

    def do_HELO(self, arg):
        self.do_EHLO(arg, "helo")

    def do_LHLO(self, arg):
        self.do_EHLO(arg, "lhlo")

    def extensions(self):
        ext = ["PIPELINING", f"SIZE {self.limits.message_size}"]
        if self.tls_available and not self.tls:
            ext.append("STARTTLS")
        if self.auth_mechanisms and self.tls and self.auth_user is None:
            ext.append("AUTH " + " ".join(self.auth_mechanisms))
        ext += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        if self.chunking:
            ext.append("CHUNKING")
        if not self.lmtp:
            ext.append("DSN")
        if self.etrn:
            ext.append("ETRN")
        ext += self._private_extensions()
        ext.append("HELP")
        return ext

    def _private_extensions(self):
        """Keywords only our own MDA offers (LMTP; ``XQID``): the handler decides."""
        offer = getattr(self.handler, "private_extensions", None) if self.lmtp else None
        return tuple(offer(self)) if offer is not None else ()

    def _ehlo_response(self):
        lines = [self.hostname] + self.extensions()
        last = len(lines) - 1
        return "".join(f"250{' ' if i == last else '-'}{line}\r\n"
                       for i, line in enumerate(lines)).encode("ascii")

    def do_MAIL(self, arg):
        if self.helo is None:
            self._error(R.NEED_HELO, "mail")
            return
        if self.txn is not None:
            self._error(R.NESTED_MAIL, "mail")
            return
        m = _MAIL_FROM.match(arg)
        if not m:
            self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"), "mail")
            return
        path, ptext = split_path_and_params(arg[m.end():])
        try:
            params = parse_mail_params(ptext, self.limits.message_size,
                                       self._private_extensions(),
                                       auth=bool(self.auth_mechanisms and self.tls)) \
                if ptext.strip() else parse_mail_params("", 0)
            if not self.esmtp and ptext.strip():
                raise ParamError(Reply(555, "5.5.4", "Error: parameters need EHLO"))
            sender = parse_path(path, "sender", smtputf8=params.smtputf8, allow_null=True)
        except (AddressError, ParamError) as e:
            self._error(e.reply, "mail")
            return
        txn = Transaction(sender, params)

        def answered(result):
            if result is None or result.code < 400:
                self.txn = txn
            self._reply(result or R.SENDER_OK, "mail")

        self._run(self.handler.mail(self, txn), answered)

    def do_RCPT(self, arg):
        txn = self.txn
        if txn is None:
            self._error(R.NEED_MAIL, "rcpt")
            return
        m = _RCPT_TO.match(arg)
        if not m:
            self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"), "rcpt")
            return
        if len(txn.recipients) >= self.limits.recipients:
            self._reply(R.TOO_MANY_RECIPIENTS, "rcpt")
            return
        path, ptext = split_path_and_params(arg[m.end():])
        try:
            rcpt = parse_path(path, "recipient", smtputf8=txn.params.smtputf8)
            params = parse_rcpt_params(ptext, txn.params.smtputf8)
            if params.notify is not None and self.lmtp:
                raise ParamError(Reply(555, "5.5.4", "Unsupported option: NOTIFY"))
        except (AddressError, ParamError) as e:
            self._error(e.reply, "rcpt")
            return

        def answered(result):
            if result is None or result.code < 400:
                # A repeated recipient is acknowledged but kept once (one copy).  In
                # LMTP every accepted RCPT is owed its own reply after DATA (RFC 2033
                # 4.2), so there the handler deduplicates the deliveries instead.
                if self.lmtp or all(r != rcpt for r, _ in txn.recipients):
                    txn.recipients.append((rcpt, params))
            self._reply(result or R.RCPT_OK, "rcpt")

        self._run(self.handler.rcpt(self, txn, rcpt, params), answered)

    def do_DATA(self, arg):
        txn = self.txn
        if arg.strip():
            self._error(Reply(501, "5.5.4", "Syntax: DATA"), "data")
            return
        if txn is None:
            self._error(R.NEED_MAIL, "data")
            return
        if not txn.recipients:
            self._error(R.NO_RECIPIENTS, "data")
            return
        if self._chunks is not None:
            self._error(R.BDAT_THEN_DATA, "data")
            return

        def answered(result):
            if result is not None and result.code >= 400:
                self._reply(result, "data")
                return
            txn.handle = result and None
            self._data_size = 0
            self._data_too_big = False
            self._reader = self._data_reader()
            self._arm(self.limits.data_timeout)     # the deadline: 354 plus data_timeout
            self._data_started = self.clock.seconds()
            self._data_received = 0
            self._send(R.START_DATA)

        self._run(self.handler.data(self, txn), answered)

    def _data_reader(self):
        """An LMTP handler that stores LF line ends (``wants_lf``, the MDA) gets
        the body converted as it arrives: no second pass over it later."""
        if self.lmtp and getattr(self.handler, "wants_lf", False):
            return LFDataReader(self._data_chunk)
        return DataReader(self._data_chunk)

    def _data_chunk(self, chunk, size=None):
        # ``size``: an LF chunk's length in CRLF form, so limits and the size
        # handed to data_end are the same whatever the reader.
        self._data_size += len(chunk) if size is None else size
        if self._data_too_big:
            return
        if self._data_size > self.limits.message_size:
            self._data_too_big = True
            return
        self.handler.data_chunk(self, self.txn, chunk)

    def _end_of_data(self):
        reader, self._reader = self._reader, None
        self._finish_message(reader)

    def _finish_message(self, reader, verb="data"):
        """The message is complete (DATA's end marker, or the last BDAT chunk):
        refuse it for a limit or a bare newline, or hand it to the handler; in
        LMTP one reply per recipient either way."""
        txn, self.txn = self.txn, None
        self._deadline = self.clock.seconds() + self.limits.command_timeout
        n = len(txn.recipients) if self.lmtp else 1
        if self._data_too_big or reader.bare_newline:
            refusal = R.MESSAGE_TOO_BIG if self._data_too_big else R.BARE_NEWLINE
            self.handler.data_abort(self, txn, refusal)
            for _ in range(n):
                self._reply(refusal, verb)
            return

        def answered(result):
            if result is None:
                result = R.OK
            replies = result if isinstance(result, list) else [result] * n
            for r in replies:
                self._reply(r, verb)

        self._run(self.handler.data_end(self, txn, self._data_size), answered)

    def do_RSET(self, arg):
        if arg.strip():
            self._error(Reply(501, "5.5.4", "Syntax: RSET"), "rset")
            return
        self._abort_transaction()
        self._reply(R.OK, "rset")

    def _abort_transaction(self):
        txn, self.txn = self.txn, None
        if txn is not None:
            self.handler.data_abort(self, txn, None)
        self._reader = None
        self._chunks = None

    # -- BDAT (RFC 3030 CHUNKING; offered by the MDA's LMTP, for the queue) ------

    def do_BDAT(self, arg):
        """A chunk of the message follows the command line at once, ``size``
        bytes of it, neither dot-stuffed nor ended by a marker.  Its reply comes
        after the last of those bytes, so whatever the chunk's fate its bytes
        are read (and skipped when it cannot be taken) before the next command.
        The last chunk of a transaction gets, in LMTP, one reply per accepted
        recipient (RFC 2033 4.2), as DATA's end does; a chunk refused outside a
        transaction with recipients gets one."""
        m = _BDAT.match(arg)
        if not m:
            # Only the size says where the next command starts: without it the
            # session cannot go on safely.
            self._error(R.BDAT_SYNTAX, "bdat")
            self._close()
            return
        self._chunk_left = int(m.group(1))
        self._chunk_last = m.group(2) is not None
        self._chunk_error = None
        self._arm(self.limits.data_timeout)
        self._data_started = self.clock.seconds()
        self._data_received = 0
        txn = self.txn
        if txn is None:
            self._chunk_error = R.NEED_MAIL
        elif not txn.recipients:
            self._chunk_error = R.NO_RECIPIENTS
        elif self._chunks is None:
            # The transaction's first chunk: the handler is asked, as for DATA.
            def answered(result):
                if result is not None and result.code >= 400:
                    self._chunk_error = result
                else:
                    self._data_size = 0
                    self._data_too_big = False
                    self._chunks = ChunkReader(self._data_reader())
                if not self._chunk_left:
                    self._chunk_end()

            self._run(self.handler.data(self, txn), answered)
            return
        if not self._chunk_left:
            self._chunk_end()

    def _chunk_bytes(self):
        """Take the next bytes of the current chunk from the input buffer."""
        n, buf = self._chunk_left, self._buf
        if len(buf) <= n:
            piece, self._buf = buf, b""
        else:
            piece, self._buf = buf[:n], buf[n:]
        self._chunk_left = n - len(piece)
        self._data_progress(len(piece))
        if self._chunk_error is None:
            self._chunks.feed(piece)
        if not self._chunk_left:
            self._chunk_end()

    def _chunk_end(self):
        self._deadline = self.clock.seconds() + self.limits.command_timeout
        error = self._chunk_error
        if error is not None:
            self._chunk_error = None
            txn = self.txn
            n = len(txn.recipients) if (self.lmtp and self._chunk_last and txn is not None
                                        and txn.recipients) else 1
            for _ in range(n):
                self._reply(error, "bdat")
            # A transaction that lost a chunk cannot carry on: later chunks must
            # not make a message without it (they get "need MAIL").
            self._abort_transaction()
            return
        if not self._chunk_last:
            self._reply(Reply(250, "2.0.0", f"Ok: {self._data_size} octets received"), "bdat")
            return
        reader, self._chunks = self._chunks, None
        reader.finish()
        self._hold = True
        self._finish_message(reader, "bdat")
        if not self._blocked:
            self._hold = False

    def do_NOOP(self, arg):
        self._reply(R.NOOP_OK, "noop")

    def do_QUIT(self, arg):
        self._reply(R.BYE, "quit")
        self._close()

    def do_VRFY(self, arg):
        if not arg.strip():
            self._error(Reply(501, "5.5.4", "Syntax: VRFY address"), "vrfy")
            return
        self._reply(R.VRFY_REPLY, "vrfy")

    def do_EXPN(self, arg):
        self._reply(R.EXPN_DISABLED, "expn")

    def do_ETRN(self, arg):
        """RFC 1985: a site we hold mail for asks for it now.  The handler decides
        who may; the reply never says how much is waiting (the queue may be in
        another process), so it is always 250 "started"."""
        if not self.etrn:
            self._error(Reply(502, "5.5.1", "ETRN is not offered on this port"), "etrn")
            return
        if self.helo is None:
            self._error(Reply(503, "5.5.1", "Error: send HELO/EHLO first"), "etrn")
            return
        if self.txn is not None:
            self._error(Reply(503, "5.5.1", "Error: ETRN is not allowed within a mail transaction"),
                        "etrn")
            return
        node = arg.strip()
        if not node or " " in node:
            self._error(Reply(501, "5.5.4", "Syntax: ETRN domain"), "etrn")
            return
        if node.startswith("#"):
            self._error(Reply(458, "4.3.0", f"Unable to queue messages for node {node[:64]}: "
                                            f"queue names are not supported"), "etrn")
            return
        from mailsys.smtp.address import parse_domain

        domain = parse_domain(node[1:] if node.startswith("@") else node)
        if domain is None or domain.startswith("["):
            self._error(Reply(501, "5.5.4", "Syntax: ETRN domain (a domain name)"), "etrn")
            return
        result = self.handler.etrn(self, domain)
        if result is None:
            self._reply(Reply(250, "2.0.0", f"Queuing for node {domain} started"), "etrn")
        else:
            self._error(result, "etrn")

    def do_HELP(self, arg):
        verbs = ["LHLO"] if self.lmtp else ["EHLO", "HELO"]
        if self.tls_available and not self.tls:
            verbs.append("STARTTLS")
        if self.auth_mechanisms:
            verbs.append("AUTH")
        verbs += ["MAIL", "RCPT", "DATA"] + (["BDAT"] if self.chunking else []) + [
            "RSET", "NOOP", "QUIT", "VRFY", "HELP"]
        if self.etrn:
            verbs.append("ETRN")
        self._reply(Reply(214, "2.0.0", "Commands: " + " ".join(verbs), "See RFC 5321"), "help")

    def do_STARTTLS(self, arg):
        if arg.strip():
            self._error(Reply(501, "5.5.4", "Syntax: STARTTLS"), "starttls")
            return
        if self.tls:
            self._error(Reply(554, "5.5.1", "Error: TLS already active"), "starttls")
            return
        if not self.tls_available:
            self._error(Reply(502, "5.5.1", "Error: command not implemented"), "starttls")
            return
        if self.helo is None:
            self._error(R.NEED_HELO, "starttls")
            return
        self._reply(Reply(220, "2.0.0", "Ready to start TLS"), "starttls")
        self._flush()
        # RFC 3207 section 4.2 and CVE-2011-0411: whatever the client sent after
        # STARTTLS in the clear is thrown away, and the session starts afresh.
        self._buf = b""
        self._direct = False
        self._abort_transaction()
        self.helo, self.esmtp, self.auth_user = None, False, None
        self.transport.startTLS(self.handler.tls_context(self))
        self.tls = True

    def do_AUTH(self, arg):
        if not self.auth_mechanisms:
            self._error(Reply(503, "5.5.1", "Error: authentication not enabled"), "auth")
            return
        if self.helo is None:
            self._error(R.NEED_HELO, "auth")
            return
        if not self.esmtp:      # AUTH is an extension: HELO did not offer it
            self._error(Reply(503, "5.5.1", "Error: send EHLO first"), "auth")
            return
        if not self.tls:
            self._error(Reply(538, "5.7.11", "Encryption required for requested authentication mechanism"),
                        "auth")
            return
        if self.auth_user is not None:
            self._error(Reply(503, "5.5.1", "Error: already authenticated"), "auth")
            return
        if self.txn is not None:
            self._error(Reply(503, "5.5.1", "Error: MAIL transaction in progress"), "auth")
            return
        parts = arg.strip().split(" ")
        mech = parts[0].upper()
        if not mech or len(parts) > 2:
            self._error(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"), "auth")
            return
        if mech not in self.auth_mechanisms or mech not in sasl.MECHANISMS:
            self._error(Reply(504, "5.5.4", "Unrecognized authentication type"), "auth")
            return
        exchange = sasl.MECHANISMS[mech]()
        # The handler logs it (sasl_method=PLAIN, "SASL LOGIN authentication
        # failed"): fail2ban's postfix-sasl filter matches on the mechanism.
        self.sasl_method = mech
        try:
            challenge = exchange.start(parts[1] if len(parts) == 2 else None)
        except sasl.SaslError as e:
            self._sasl_refused(e)
            return
        self._sasl_next(exchange, challenge)

    def _sasl_response(self, raw):
        exchange, self._sasl = self._sasl, None
        try:
            challenge = exchange.step(raw.decode("ascii"))
        except UnicodeDecodeError:
            self._auth_failed(sasl.UNDECODABLE)
            return
        except sasl.SaslError as e:
            self._sasl_refused(e)
            return
        self._sasl_next(exchange, challenge)

    def _sasl_refused(self, error):
        """A malformed exchange is answered here; one naming a user who cannot
        be let in (PLAIN with another authorization identity) goes to the
        handler with no password, to be logged and throttled like wrong
        credentials: fail2ban must see it, and it must cost the client time."""
        if error.user is None:
            self._auth_failed(error.reply)
        else:
            self._authenticate(error.user, None)

    def _sasl_next(self, exchange, challenge):
        if challenge is not None:
            self._sasl = exchange
            self._out.append(f"334 {challenge}\r\n".encode("ascii"))
            return
        user, password = exchange.result
        exchange.result = None
        self._authenticate(user, password)

    def _authenticate(self, user, password):
        """Ask the handler; ``password`` None: refuse, but as a login failure."""

        def answered(result):
            if isinstance(result, Reply):
                self._auth_failed(result)
                return
            self.auth_user = result
            self._reply(Reply(235, "2.7.0", "Authentication successful"), "auth")

        self._run(self.handler.authenticate(self, user, password), answered)

    def _auth_failed(self, reply):
        if reply.code == 535:
            self.auth_failures += 1
            if self.auth_failures >= self.limits.auth_failures:
                self._send(reply)
                self._reply(Reply(421, "4.7.0", f"{self.hostname} Error: too many failed authentications"),
                            "auth")
                return
        self._reply(reply, "auth")

    _commands = {
        "EHLO": do_EHLO, "HELO": do_HELO, "LHLO": do_LHLO, "MAIL": do_MAIL, "RCPT": do_RCPT,
        "DATA": do_DATA, "RSET": do_RSET, "NOOP": do_NOOP, "QUIT": do_QUIT, "VRFY": do_VRFY,
        "EXPN": do_EXPN, "HELP": do_HELP, "STARTTLS": do_STARTTLS, "AUTH": do_AUTH,
        "ETRN": do_ETRN, "BDAT": do_BDAT,
    }
