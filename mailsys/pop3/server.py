"""The POP3 wire (RFC 1939, CAPA RFC 2449, STLS RFC 2595, SASL RFC 5034): a
small state machine apart from mailbox policy.

Why not twisted.mail.pop3.POP3: it has no STLS, offers USER and APOP in the
clear, reads the whole message list through its own IMailbox calls with no
place for an asynchronous login-then-lock step, and answers some malformed
input with tracebacks in the log.  What the wire needs is small enough to own.

The protocol parses, bounds and times out; a *backend* (mailsys.pop3.service)
decides: ``connected(proto)`` (None or the text of an ``-ERR`` to close with),
``tls_context(proto)``, ``login(proto, user, password, method)`` (a Deferred
of a *maildrop* or a :class:`Refusal`) and ``disconnected(proto)`` (called once,
after the last maildrop call has finished, so that its counts are final).  A
maildrop (mailsys.pop3.service.Maildrop) has ``entries`` (uid, size),
``unquote``, ``open(entry)`` (a Deferred of a reader), ``commit(deleted, seen)``
(a Deferred, called only at QUIT) and ``close()``.  Their failures with
:class:`~mailsys.pop3.mailbox.MailboxError` are expected conditions (another
program holds or changed the mailbox): one line each in the log, no traceback.

Commands are handled strictly in order (PIPELINING): while a login, a message
transfer or the final commit is under way, input is buffered (reading pauses
past a bound) and resumes afterwards.  Every reply is exact text; nothing a
client sends can raise out of ``dataReceived``.
"""
import re

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from mailsys import fastio
from mailsys.fastio import CLOSE_GRACE, MAX_UNSENT, ClientBounds
from mailsys.logs import MailLog
from mailsys.pop3.mailbox import MailboxError
from mailsys.pop3.wire import WireEncoder
from mailsys.smtp import sasl

log = MailLog("mailsys.pop3")

MAX_LINE = 2048          # bytes per command line with its CRLF (RFC 2449 asks for 255; SASL needs more)
MAX_ERRORS = 10          # protocol errors before the connection is closed
MAX_BUFFERED = 64 * 1024  # pipelined input held while a command is in progress
IDLE_TIMEOUT = 600       # RFC 1939 section 3: an autologout timer of at least 10 minutes
CHUNK = 64 * 1024

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"

NEED_TLS = "[AUTH] Authentication requires TLS: send STLS first"
AUTH_FAILED = "[AUTH] Authentication failed"
_NUMBER = re.compile(r"[0-9]{1,9}\Z")
_ALL_VERBS = frozenset(("CAPA", "STLS", "USER", "PASS", "AUTH", "APOP", "QUIT", "STAT", "LIST",
                        "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "LAST"))


class Refusal:
    """A login that did not open a maildrop; ``text`` follows ``-ERR ``."""

    def __init__(self, text, auth_failure=False):
        self.text = text
        self.auth_failure = auth_failure

    def __repr__(self):
        return f"Refusal({self.text!r}, auth_failure={self.auth_failure})"


class Stats:
    """Counts for the disconnect log line, Dovecot-style."""

    def __init__(self):
        self.retr = self.retr_bytes = self.top = self.dele = 0
        self.deleted = 0

    def __str__(self):
        return (f"retr={self.retr}/{self.retr_bytes}, top={self.top}, dele={self.dele}, "
                f"deleted={self.deleted}")


@implementer(IPullProducer)
class _MessageSender:
    """Streams one message through a WireEncoder as the transport asks for data."""

    def __init__(self, proto, reader, encoder):
        self.proto, self.reader, self.encoder = proto, reader, encoder
        self.deferred = defer.Deferred()
        self.sent = 0
        self._ended = False

    def start(self, first):
        self.proto.transport.write(first)
        self.proto.transport.registerProducer(self, False)
        return self.deferred

    def resumeProducing(self):
        if self._ended:
            return
        try:
            chunk = self.reader.read(CHUNK)
            out = self.encoder.feed(chunk) if chunk else b""
        except Exception as e:   # disk trouble mid-message: the reply cannot be fixed
            self._end()
            self.deferred.errback(e)
            return
        if not chunk or self.encoder.done:
            out += self.encoder.finish()
            self.proto.transport.write(out)
            self.sent += len(out)
            self._end()
            self.deferred.callback(self.sent)
            return
        if out:
            self.proto.transport.write(out)
            self.sent += len(out)

    def _end(self):
        self._ended = True
        try:
            self.reader.close()
        finally:
            self.proto.transport.unregisterProducer()

    def pauseProducing(self):
        pass

    def stopProducing(self):
        if not self._ended:
            self._ended = True
            self.reader.close()
            self.deferred.errback(ConnectionError("connection lost during a transfer"))


class POP3Server(ClientBounds, Protocol):
    """One POP3 session.  ``tls`` is True from the start on the pop3s role."""

    def __init__(self, backend, hostname, *, clock, tls_available=False, tls=False,
                 idle_timeout=IDLE_TIMEOUT, max_auth_failures=3, label="unknown"):
        self.backend = backend
        self.hostname = hostname
        self.clock = clock
        self.tls_available = tls_available
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.max_auth_failures = max_auth_failures
        self.label = label
        self.state = AUTHORIZATION
        self.user = None           # after USER
        self.address = None        # after a login
        self.maildrop = None
        self.deleted = set()       # indexes
        self.retrieved = set()     # indexes
        self.auth_failures = 0
        self.errors = 0
        self.stats = Stats()
        self._sasl = False
        self._buf = b""
        self._discarding = False
        self._blocked = False
        self._paused = False
        self._closing = False
        self._in_process = False
        self._lost = False
        self._pending = False      # a maildrop call (open, commit) runs in the thread pool
        self._notified = False     # backend.disconnected was called
        self._sender = None
        self._timer = None
        self._out_full = False     # reading paused: replies the client does not read pile up
        self._abort_timer = None

    # -- connection lifecycle -----------------------------------------------------

    def connectionMade(self):
        self._timer = self.clock.callLater(self.idle_timeout, self._timed_out)
        refusal = self.backend.connected(self)
        if refusal is not None:
            self._send(f"-ERR {refusal}")
            self._close()
            return
        self._send(f"+OK {self.hostname} POP3 server ready")

    def connectionLost(self, reason=None):
        self._lost = True
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        if not self._pending:
            self._finish()

    def _finish(self):
        """The session's end, once the connection is gone and no maildrop call
        runs any more: the maildrop is let go (never under a call that still
        uses its descriptor) and the backend is told once, with counts that
        are final (a commit still running sets ``stats.deleted``)."""
        self._release()
        if self._notified:
            return
        self._notified = True
        try:
            self.backend.disconnected(self)
        except Exception:
            log.failure("POP3 backend failed at disconnect")

    def _settled(self):
        """A maildrop call has finished: True when the connection is gone
        meanwhile (the session is then finished here and the result unused)."""
        self._pending = False
        if self._lost:
            self._finish()
            return True
        return False

    def _release(self):
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            try:
                maildrop.close()
            except Exception:
                log.failure("closing a POP3 maildrop failed")

    def _timed_out(self):
        self._timer = None
        if self._closing or self.state == UPDATE:
            return
        log.info(f"{self.label}: pop3 autologout after {self.idle_timeout} s idle",
                 client=self.label)
        self._send("-ERR Autologout: idle for too long")
        self._close()

    def _rearm(self):
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        elif not self._closing:
            self._timer = self.clock.callLater(self.idle_timeout, self._timed_out)

    def _close(self):
        if self._closing:
            return
        self._closing = True
        self._buf = b""
        self.transport.loseConnection()
        # A client that reads nothing, or never finishes the TLS handshake,
        # would keep a closing connection (and its slot) open for ever: cut it
        # after the grace time, as the SMTP listeners do (mailsys.smtp.server).
        self._abort_timer = self.clock.callLater(min(CLOSE_GRACE, self.idle_timeout), self._abort)

    def _send(self, line):
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def _multi(self, first, lines):
        out = [first] + lines + ["."]
        self.transport.write("".join(f"{line}\r\n" for line in out).encode("utf-8"))

    def _error(self, text, counts=True):
        """A protocol error: ``-ERR text``; too many of them close the session."""
        if counts:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                self._send(f"-ERR {text}; too many errors, closing the connection")
                self._close()
                return
        self._send(f"-ERR {text}")

    # -- input ------------------------------------------------------------------------

    def dataReceived(self, data):
        if self._closing:
            return
        self._buf += data
        self._process_safely()
        if not self._out_full and not self._closing and fastio.unsent(self.transport) > MAX_UNSENT:
            self._check_output()

    def _process_safely(self):
        """Run the command loop; a bug ends the session with a reply, never
        escapes to the reactor."""
        try:
            self._process()
        except Exception:
            log.failure(f"{self.label}: POP3 session failed", client=self.label)
            if not self._closing:
                self._send("-ERR [SYS/TEMP] Internal error")
                self._close()

    def _process(self):
        if self._in_process:
            return   # a command that finished at once: the loop below goes on
        self._in_process = True
        try:
            self._process_lines()
        finally:
            self._in_process = False

    def _process_lines(self):
        while not self._blocked and not self._closing:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self._discarding = True
                    self._buf = b""
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            if self._discarding or len(line) + 1 > MAX_LINE:
                self._discarding = False
                self._sasl = False
                self._rearm()
                self._error("Line too long")
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self._rearm()
            self._line(line)
        if self._blocked and len(self._buf) > MAX_BUFFERED and not self._paused:
            self._paused = True
            pause = getattr(self.transport, "pauseProducing", None)
            if pause is not None and not self._out_full:
                pause()

    def _block(self):
        self._blocked = True

    def _unblock(self):
        self._blocked = False
        if self._closing:
            return
        if self._paused:
            self._paused = False
            resume = getattr(self.transport, "resumeProducing", None)
            if resume is not None and not self._out_full:
                resume()
        self._process_safely()

    def _line(self, raw):
        if self._sasl:
            self._sasl = False
            self._sasl_response(raw)
            return
        if b"\x00" in raw:
            self._error("Invalid characters in command")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error("Invalid characters in command")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = self._COMMANDS[self.state].get(verb)
        if handler is None:
            if verb in _ALL_VERBS:
                self._error("Command not valid in this state")
            else:
                self._error("Unknown command")
            return
        handler(self, arg)

    # -- AUTHORIZATION ----------------------------------------------------------------

    def capabilities(self):
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if self.tls:
                caps += ["USER", "SASL PLAIN"]
            elif self.tls_available:
                caps.append("STLS")
        caps.append("IMPLEMENTATION mailsys")
        return caps

    def do_CAPA(self, arg):
        if arg.strip():
            self._error("Syntax: CAPA")
            return
        self._multi("+OK Capability list follows", self.capabilities())

    def do_STLS(self, arg):
        if arg.strip():
            self._error("Syntax: STLS")
            return
        if self.tls:
            self._error("TLS is already active")
            return
        if not self.tls_available:
            self._error("STLS is not available: no certificate is configured")
            return
        self._send("+OK Begin TLS negotiation")
        # RFC 2595 section 4 and the STARTTLS injection class (CVE-2011-0411):
        # whatever followed STLS in the clear is thrown away.
        self._buf = b""
        self._discarding = False
        self.user = None
        self.transport.startTLS(self.backend.tls_context(self))
        self.tls = True

    def do_USER(self, arg):
        if not self.tls:
            self._error(NEED_TLS)
            return
        name = arg.strip()
        if not name or " " in name or len(name.encode("utf-8")) > sasl.MAX_CREDENTIAL:
            self._error("Syntax: USER name")
            return
        self.user = name
        self._send("+OK Send your password")

    def do_PASS(self, arg):
        if not self.tls:
            self._error(NEED_TLS)
            return
        user, self.user = self.user, None
        if user is None:
            self._error("Send USER first")
            return
        if not arg or len(arg.encode("utf-8")) > sasl.MAX_CREDENTIAL:
            self._error("Syntax: PASS password")
            return
        self._login(user, arg, "USER")

    def do_AUTH(self, arg):
        if not self.tls:
            self._error(NEED_TLS)
            return
        parts = arg.split()
        if not parts:
            self._multi("+OK Supported SASL mechanisms follow", ["PLAIN"])
            return
        if len(parts) > 2:
            self._error("Syntax: AUTH mechanism [initial-response]")
            return
        if parts[0].upper() != "PLAIN":
            self._error("Unsupported authentication mechanism")
            return
        self.user = None
        if len(parts) == 1:
            self._sasl = True
            self.transport.write(b"+ \r\n")
            return
        self._sasl_response(parts[1].encode("ascii", "replace"))

    def _sasl_response(self, raw):
        try:
            user, password = sasl.decode_plain(sasl.decode_response(raw.decode("ascii")))
        except UnicodeDecodeError:
            self._auth_failed("[AUTH] Cannot decode response")
            return
        except sasl.SaslError as e:
            if e.reply is sasl.CANCELLED:
                self._error("Authentication aborted", counts=False)
                return
            self._auth_failed("[AUTH] " + e.reply.lines[0])
            return
        self._login(user, password, "PLAIN")

    def _login(self, user, password, method):
        self._block()
        try:
            d = self.backend.login(self, user, password, method)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._logged_in, self._login_error)

    def _logged_in(self, result):
        if isinstance(result, Refusal):
            if self._lost:
                return
            if result.auth_failure:
                self._auth_failed(result.text)
            else:
                self._send(f"-ERR {result.text}")
            self._unblock()
            return
        if self._lost:
            result.close()
            return
        self.maildrop = result
        self.address = getattr(result, "address", None)
        self.state = TRANSACTION
        n, size = self._totals()
        self._send(f"+OK Logged in: {n} messages ({size} octets)")
        self._unblock()

    def _login_error(self, failure):
        log.failure(f"{self.label}: POP3 login failed unexpectedly", failure, client=self.label)
        if self._lost:
            return
        self._send("-ERR [SYS/TEMP] Cannot open the mailbox now, try again later")
        self._unblock()

    def _auth_failed(self, text):
        self.auth_failures += 1
        if self.auth_failures >= self.max_auth_failures:
            self._send(f"-ERR {text}; too many failures, closing the connection")
            self._close()
            return
        self._send(f"-ERR {text}")

    def do_QUIT(self, arg):
        if self.state == AUTHORIZATION:
            self._send(f"+OK {self.hostname} POP3 server signing off")
            self._close()
            return
        self.state = UPDATE
        self._block()
        self._pending = True
        entries = self.maildrop.entries
        deleted = [entries[i] for i in sorted(self.deleted)]
        seen = [entries[i] for i in sorted(self.retrieved)]
        try:
            d = self.maildrop.commit(deleted, seen)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._committed, self._commit_failed)

    def _committed(self, failed):
        self.stats.deleted = len(self.deleted) - failed
        if self._settled():
            return
        self._release()
        if failed:
            self._send(f"-ERR [SYS/TEMP] {failed} deleted messages were not removed")
        else:
            self._send(f"+OK Logging out ({len(self.deleted)} messages deleted)")
        self._close()

    def _commit_failed(self, failure):
        if failure.check(MailboxError):
            log.warn(f"pop3: warning: {self.label}: user=<{self.address}>: deleted messages "
                     f"were not removed: {failure.value}",
                     client=self.label, user=self.address, error=str(failure.value))
        else:
            log.failure(f"{self.label}: POP3 update of {self.address} failed", failure,
                        client=self.label)
        if self._settled():
            return
        self._release()
        self._send("-ERR [SYS/TEMP] Deleted messages were not removed: "
                   "the mailbox could not be updated")
        self._close()

    # -- TRANSACTION ------------------------------------------------------------------

    def _totals(self):
        entries = self.maildrop.entries
        n = size = 0
        for i, e in enumerate(entries):
            if i not in self.deleted:
                n += 1
                size += e.size
        return n, size

    def _message(self, arg, syntax):
        """The index of the message ``arg`` names, or None (the reply is sent)."""
        if not _NUMBER.match(arg):
            self._error(f"Syntax: {syntax}")
            return None
        n = int(arg)
        if n < 1 or n > len(self.maildrop.entries):
            self._send("-ERR No such message")
            return None
        if n - 1 in self.deleted:
            self._send(f"-ERR Message {n} is deleted")
            return None
        return n - 1

    def do_STAT(self, arg):
        if arg.strip():
            self._error("Syntax: STAT")
            return
        n, size = self._totals()
        self._send(f"+OK {n} {size}")

    def _listing(self, arg, verb, field):
        args = arg.split()
        if len(args) > 1 or (arg and not args):
            self._error(f"Syntax: {verb} [msg]")
            return
        if args:
            i = self._message(args[0], f"{verb} [msg]")
            if i is not None:
                self._send(f"+OK {i + 1} {field(self.maildrop.entries[i])}")
            return
        lines = [f"{i + 1} {field(e)}" for i, e in enumerate(self.maildrop.entries)
                 if i not in self.deleted]
        n, size = self._totals()
        first = f"+OK {n} messages ({size} octets)" if verb == "LIST" else "+OK Unique-ID listing follows"
        self._multi(first, lines)

    def do_LIST(self, arg):
        self._listing(arg, "LIST", lambda e: e.size)

    def do_UIDL(self, arg):
        self._listing(arg, "UIDL", lambda e: e.uid)

    def do_RETR(self, arg):
        i = self._message(arg.strip() if arg.count(" ") == 0 else "", "RETR msg")
        if i is not None:
            self._transfer(i, None)

    def do_TOP(self, arg):
        args = arg.split(" ")
        if len(args) != 2 or not _NUMBER.match(args[1]):
            self._error("Syntax: TOP msg lines")
            return
        i = self._message(args[0], "TOP msg lines")
        if i is not None:
            self._transfer(i, int(args[1]))

    def _transfer(self, i, lines):
        entry = self.maildrop.entries[i]
        self._block()
        self._pending = True
        try:
            d = self.maildrop.open(entry)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(i, lines),
                       errbackArgs=(i,))

    def _open_failed(self, failure, i):
        if failure.check(MailboxError):
            log.info(f"{self.label}: pop3 cannot open message {i + 1} of {self.address}: "
                     f"{failure.value}", client=self.label, error=str(failure.value))
        else:
            log.failure(f"{self.label}: pop3 cannot open message {i + 1} of {self.address}",
                        failure, client=self.label)
        if self._settled():
            return
        self._send(f"-ERR [SYS/TEMP] Message {i + 1} cannot be read now")
        self._unblock()

    def _opened(self, reader, i, lines):
        if self._settled():
            reader.close()
            return
        entry = self.maildrop.entries[i]
        encoder = WireEncoder(unquote=self.maildrop.unquote, body_lines=lines)
        first = f"+OK {entry.size} octets\r\n" if lines is None else "+OK Top of message follows\r\n"
        self._sender = _MessageSender(self, reader, encoder)
        d = self._sender.start(first.encode("ascii"))

        def sent(n):
            self._sender = None
            if lines is None:
                self.retrieved.add(i)
                self.stats.retr += 1
                self.stats.retr_bytes += n
            else:
                self.stats.top += 1
            self._rearm()
            self._unblock()

        def failed(f):
            self._sender = None
            if self._lost:
                return
            log.info(f"{self.label}: pop3 transfer of message {i + 1} of {self.address} failed: "
                     f"{f.getErrorMessage()}", client=self.label)
            self._close()   # the multi-line reply cannot be completed

        d.addCallbacks(sent, failed)

    def do_DELE(self, arg):
        i = self._message(arg.strip() if arg.count(" ") == 0 else "", "DELE msg")
        if i is not None:
            self.deleted.add(i)
            self.stats.dele += 1
            self._send(f"+OK Message {i + 1} deleted")

    def do_RSET(self, arg):
        if arg.strip():
            self._error("Syntax: RSET")
            return
        self.deleted.clear()
        n, size = self._totals()
        self._send(f"+OK {n} messages ({size} octets)")

    def do_NOOP(self, arg):
        if arg.strip():
            self._error("Syntax: NOOP")
            return
        self._send("+OK")

    _COMMANDS = {
        AUTHORIZATION: {"CAPA": do_CAPA, "STLS": do_STLS, "USER": do_USER, "PASS": do_PASS,
                        "AUTH": do_AUTH, "QUIT": do_QUIT},
        TRANSACTION: {"CAPA": do_CAPA, "STAT": do_STAT, "LIST": do_LIST, "UIDL": do_UIDL,
                      "RETR": do_RETR, "TOP": do_TOP, "DELE": do_DELE, "RSET": do_RSET,
                      "NOOP": do_NOOP, "QUIT": do_QUIT},
        UPDATE: {},
    }
