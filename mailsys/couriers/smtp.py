"""The SMTP client: one session with one remote server, any number of transactions.

The protocol speaks the wire and nothing else; mailsys.couriers.remote decides
where to connect, which policy applies, and when a session is reused.

A session: greeting, ``EHLO`` (``HELO`` when EHLO is refused with 5xx),
``STARTTLS`` per the TLS policy and ``EHLO`` again, ``AUTH`` when credentials
were given (only ever over verified TLS), then :meth:`SMTPClientProtocol.send`
runs transactions: ``MAIL``, ``RCPT`` (in one write with PIPELINING), ``DATA``
and the dot-stuffed message; ``RSET`` before every transaction after the first.

:attr:`ready` fires with True once transactions may start, or with a
:class:`Refusal` that says why not and whether the next address is worth
trying (connection trouble, any refusal at the greeting, 4xx at EHLO).  Nothing fails a
Deferred: every problem becomes an Outcome with the reply that explains it,
the remote's own reply when there is one, ``relay`` set to ``host[ip]:port``.

Timeouts are RFC 5321 section 4.5.3.2's, one per wait (:data:`TIMEOUTS`).
After STARTTLS's 220 anything else already received is thrown away (it was
sent before the handshake and could be an injected reply, CVE-2011-0411's
client side).  Outgoing commands are built from checked addresses and are
refused if they would hold a CR or LF; the message's line ends are made CRLF,
and a line longer than 998 octets is broken with CRLF SPACE (:func:`fold_long_lines`).
"""
import base64
import re
from collections import deque
from functools import partial

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from mailsys.couriers.downgrade import downgrade
from mailsys.couriers.lmtp import (
    CHUNK, ProtocolError, ReplyParser, _BodyProducer, _clean, parse_reply, stuffed_chunks, xtext,
)
from mailsys.delivery import PASSED_ON, RELAYED, Delivered, PermFail, TempFail
from mailsys.logs import MailLog
from mailsys.smtp.data import crlf_clean
from mailsys.smtp.reply import Reply

log = MailLog("mailsys.courier.smtp")

# RFC 5321 4.5.3.2, in seconds.
GREETING_TIMEOUT = 300
EHLO_TIMEOUT = 300          # not in the RFC; as long as MAIL
STARTTLS_TIMEOUT = 300
AUTH_TIMEOUT = 300
MAIL_TIMEOUT = 300
RCPT_TIMEOUT = 300
DATA_INIT_TIMEOUT = 120
DATA_BLOCK_TIMEOUT = 180
DATA_END_TIMEOUT = 600
RSET_TIMEOUT = 300
QUIT_TIMEOUT = 60

TIMEOUTS = {"greeting": GREETING_TIMEOUT, "EHLO": EHLO_TIMEOUT, "HELO": EHLO_TIMEOUT,
            "STARTTLS": STARTTLS_TIMEOUT, "AUTH": AUTH_TIMEOUT, "MAIL FROM": MAIL_TIMEOUT,
            "RCPT TO": RCPT_TIMEOUT, "DATA": DATA_INIT_TIMEOUT, "message body": DATA_BLOCK_TIMEOUT,
            "end of data": DATA_END_TIMEOUT, "RSET": RSET_TIMEOUT, "QUIT": QUIT_TIMEOUT}

_BARE = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r?\n\r?\n")    # the blank line after the header section


class Refusal:
    """Why a session cannot carry mail: ``outcome`` for every recipient;
    ``try_next`` when another address may do better; ``plaintext`` when a
    failed opportunistic TLS handshake should be retried without TLS."""

    __slots__ = ("outcome", "try_next", "plaintext")

    def __init__(self, outcome, try_next=True, plaintext=False):
        self.outcome, self.try_next, self.plaintext = outcome, try_next, plaintext

    def __repr__(self):
        return f"Refusal({self.outcome!r}, try_next={self.try_next})"


RETRY = object()   # send()'s answer when a reused session died before the transaction began


class TLSPolicy:
    """``level`` none | may | encrypt.  ``context(verify)`` builds the client TLS
    options: ``may`` never verifies (Postfix's default: encryption against
    passive eavesdroppers only); ``encrypt`` verifies against ``trust_root``
    (None: the platform's CA bundle) for ``server_name``."""

    def __init__(self, level="may", trust_root=None):
        if level not in ("none", "may", "encrypt"):
            raise ValueError(f"unknown TLS level {level!r}")
        self.level = level
        self.trust_root = trust_root

    def options(self, server_name):
        from twisted.internet import ssl

        if self.level == "encrypt":
            trust = self.trust_root if self.trust_root is not None else ssl.platformTrust()
            return ssl.optionsForClientTLS(server_name, trustRoot=trust)
        return ssl.CertificateOptions(verify=False)


class Transaction:
    """One message for some recipients of one session."""

    __slots__ = ("sender", "recipients", "message", "params", "qid", "reused", "result")

    def __init__(self, sender, recipients, message, params=None, qid=None):
        self.sender = sender or ""
        self.recipients = [(a, dict(o or {})) for a, o in recipients]
        self.message = bytes(message)
        self.params = dict(params or {})
        self.qid = qid
        self.reused = False
        self.result = defer.Deferred()


def _failure(reply, relay):
    """A negative reply as an outcome: 5xx permanent, everything else temporary."""
    if reply.code >= 500:
        return PermFail(reply, relay)
    if reply.code >= 400:
        return TempFail(reply, relay)
    return TempFail(Reply(451, "4.5.0", _clean(f"protocol error: unexpected reply {reply}")), relay)


def crlf_lines(message):
    """``message`` with every line end CRLF (no bare CR or LF on the wire)."""
    if crlf_clean(message):
        return message
    return _BARE.sub(b"\r\n", message)


# RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1: at most 998 octets per line, CRLF not counted.
MAX_LINE = 998


def has_long_line(message, limit=MAX_LINE):
    """Whether a line of ``message`` (CRLF line ends) is longer than ``limit``.

    Exact, without a Python step per line: from the start of a line, the last LF
    within the next ``limit + 2`` bytes ends every line started before it, and
    all of those fit; with no LF there (and more than ``limit`` bytes left) the
    line is too long.  So each step moves about ``limit`` bytes with one
    ``rfind``: about a thousand steps per MiB whatever the line lengths.
    """
    window = limit + 2              # a line of ``limit`` octets and its CRLF
    n = len(message)
    pos = 0                         # the start of a line
    while n - pos > limit:
        last = message.rfind(b"\n", pos, pos + window)
        if last < 0:
            return True
        pos = last + 1
    return False


def fold_long_lines(message, limit=MAX_LINE):
    """``message`` (CRLF line ends) with every line longer than ``limit`` octets
    broken by inserting CRLF and a space, so that no line sent is longer.

    Why: a server may refuse or cut a longer line (RFC 5321 4.5.3.1.6), and mail
    from elsewhere (or a program's output) sometimes has them.  Breaking with
    CRLF SPACE is what Postfix does (``smtp_line_length_limit``): in a header it
    is folding, so the field stays one field; in a body it changes the least.
    The message is returned as it is, the same object, when no line is too long.
    """
    if not has_long_line(message, limit):
        return message
    step = limit - 1                # a continuation line starts with the space
    lines = message.split(b"\r\n")
    for i, line in enumerate(lines):
        if len(line) > limit:
            pieces = [line[:limit]]
            pieces += [b" " + line[j:j + step] for j in range(limit, len(line), step)]
            lines[i] = b"\r\n".join(pieces)
    return b"\r\n".join(lines)


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """One SMTP session; see the module docstring.

    ``helo_name`` our host name; ``server_name`` the name we expect the server to
    be (TLS verification, messages); ``relay`` its ``host[ip]:port``; ``tls`` a
    :class:`TLSPolicy` or None; ``auth`` ``(username, password)`` or None.
    """

    def __init__(self, helo_name, relay, *, clock, server_name=None, tls=None, auth=None,
                 chunk_size=CHUNK, timeouts=None, qid=None):
        self.helo_name = helo_name
        self.relay = relay
        self.server_name = server_name or relay.partition("[")[0]
        self.clock = clock
        self.tls = tls
        self.auth = auth
        self.chunk_size = chunk_size
        self.timeouts = dict(TIMEOUTS, **(timeouts or {}))
        self.qid = qid
        self.extensions = {}
        self.secure = False
        self.verified = False
        self.tls_info = None
        self.transactions = 0
        self.ready = defer.Deferred()
        self.closed = defer.Deferred()
        self._parser = ReplyParser()
        self._expect = deque()
        self._timer = None
        self._waiting_for = "greeting"
        self._txn = None
        self._lost = self._closing = self._quitting = False
        self._in_handshake = False
        self._producer = None

    # -- readiness --------------------------------------------------------------------

    @property
    def usable(self):
        return self.ready.called and not self._lost and not self._closing and self._txn is None

    def _refuse(self, outcome, try_next=True, plaintext=False):
        if not self.ready.called:
            self.ready.callback(Refusal(outcome, try_next, plaintext))
        self.quit()

    def _become_ready(self):
        self._cancel_timer()
        self._waiting_for = "nothing"
        if not self.ready.called:
            self.ready.callback(True)

    # -- connection and timers ----------------------------------------------------------

    def connectionMade(self):
        self._await(self._on_greeting, "greeting")

    def connectionLost(self, reason=None):
        self._lost = self._closing = True
        self._cancel_timer()
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        why = reason.getErrorMessage() if reason is not None else "closed"
        if self._in_handshake:
            outcome = TempFail(Reply(451, "4.7.5", _clean(
                f"TLS handshake with {self.relay} failed: {why}")), self.relay)
            plaintext = self.tls is not None and self.tls.level == "may"
            if not self.ready.called:
                self.ready.callback(Refusal(outcome, True, plaintext))
        lost = TempFail(Reply(451, "4.4.2", _clean(
            f"lost connection with {self.relay} while {self._during()}")), self.relay)
        if not self.ready.called:
            self.ready.callback(Refusal(lost))
        self._end_transaction(lost, lost_early=True)
        if not self.closed.called:
            self.closed.callback(None)

    def _during(self):
        what = self._waiting_for
        if what in ("message body", "end of data"):
            return "sending the message" if what == "message body" else \
                "waiting for the reply to the end of data"
        if what == "nothing":
            return "idle"
        return f"waiting for the reply to {what}" if what != "greeting" else "receiving the greeting"

    def _await(self, handler, what):
        self._expect.append((handler, what))
        if len(self._expect) == 1:
            self._arm(what)

    def _arm(self, what):
        self._waiting_for = what
        self._cancel_timer()
        if not self._lost:
            self._timer = self.clock.callLater(self.timeouts[what], self._timed_out, what)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, what):
        self._timer = None
        shown = "sending the message" if what == "message body" else (
            "receiving the greeting" if what == "greeting" else f"waiting for the reply to {what}")
        outcome = TempFail(Reply(451, "4.4.2", _clean(
            f"conversation with {self.relay} timed out while {shown}")), self.relay)
        if not self.ready.called:
            self.ready.callback(Refusal(outcome))
        self._end_transaction(outcome)
        self._abort()

    def _abort(self):
        self._closing = True
        if not self._lost:
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()

    # -- input ----------------------------------------------------------------------------

    def dataReceived(self, data):
        if self._closing and not self._quitting:
            return
        for item in self._parser.feed(data):
            if self._lost:
                return
            if isinstance(item, ProtocolError):
                self._protocol_error(str(item))
                return
            code, texts = item
            try:
                discard = self._reply(code, texts)
            except Exception:
                log.failure("SMTP client error")
                outcome = TempFail(Reply(451, "4.3.0", "SMTP client error, see the log"), self.relay)
                if not self.ready.called:
                    self.ready.callback(Refusal(outcome))
                self._end_transaction(outcome)
                self._abort()
                return
            if discard:
                return

    def _reply(self, code, texts):
        if not self._expect:
            if self._quitting:
                return False
            self._protocol_error(f"unexpected reply {parse_reply(code, texts)}")
            return True
        handler, _ = self._expect.popleft()
        if self._expect:
            self._arm(self._expect[0][1])
        else:
            self._cancel_timer()
        if code == 421 and not self._quitting:
            # The server is closing the connection (RFC 5321 3.8).
            self._expect.clear()
            reply = parse_reply(code, texts)
            outcome = TempFail(reply, self.relay)
            if not self.ready.called:
                self.ready.callback(Refusal(outcome))
            self._end_transaction(outcome)
            self._closing = True
            self.transport.loseConnection()
            return True
        return handler(code, texts)

    def _protocol_error(self, what):
        outcome = TempFail(Reply(451, "4.5.0", _clean(
            f"protocol error talking to {self.relay}: {what}")), self.relay)
        if not self.ready.called:
            self.ready.callback(Refusal(outcome))
        self._end_transaction(outcome)
        self._abort()

    # -- output ---------------------------------------------------------------------------

    def _command(self, text):
        line = text.encode("utf-8")
        if b"\r" in line or b"\n" in line:
            raise ValueError("a command line must not hold CR or LF")
        return line + b"\r\n"

    def _send(self, text, handler, what):
        self.transport.write(self._command(text))
        self._await(handler, what)

    def quit(self):
        """End the session politely (or at once, when it never got going)."""
        if self._lost or self._quitting:
            return
        self._quitting = self._closing = True
        self._expect.clear()
        self.transport.write(b"QUIT\r\n")
        self._await(self._on_quit, "QUIT")

    def _on_quit(self, code, texts):
        self.transport.loseConnection()
        return True

    # -- session set-up ----------------------------------------------------------------------

    def _on_greeting(self, code, texts):
        if code // 100 != 2:
            # A server that greets with 5xx is skipped like one that greets with
            # 4xx: the next MX may well take the mail, and with none left the
            # mail waits for a retry rather than bouncing (Postfix's default,
            # smtp_skip_5xx_greeting = yes).  The server's words are kept.
            reply = parse_reply(code, texts)
            self._refuse(TempFail(reply, self.relay) if code >= 500 else _failure(reply, self.relay),
                         try_next=True)
            return True
        self._send(f"EHLO {self.helo_name}", self._on_ehlo, "EHLO")
        return False

    def _on_ehlo(self, code, texts):
        if code // 100 == 2:
            self.extensions = {}
            for text in texts[1:]:
                keyword, _, argument = text.strip().partition(" ")
                self.extensions[keyword.upper()] = argument.strip()
            return self._after_hello()
        if code >= 500 and not self.secure:
            self._send(f"HELO {self.helo_name}", self._on_helo, "HELO")
            return False
        self._refuse(_failure(parse_reply(code, texts), self.relay), try_next=True)
        return True

    def _on_helo(self, code, texts):
        if code // 100 != 2:
            self._refuse(_failure(parse_reply(code, texts), self.relay), try_next=code < 500)
            return True
        self.extensions = {}
        return self._after_hello()

    def _after_hello(self):
        level = self.tls.level if self.tls is not None else "none"
        if not self.secure and level != "none":
            if "STARTTLS" in self.extensions and hasattr(self.transport, "startTLS"):
                self._send("STARTTLS", self._on_starttls, "STARTTLS")
                return False
            if level == "encrypt":
                self._refuse(TempFail(Reply(451, "4.7.4", _clean(
                    f"TLS is required, but was not offered by host {self.relay}")), self.relay))
                return True
        if self.auth is not None:
            return self._authenticate()
        self._become_ready()
        return False

    def _on_starttls(self, code, texts):
        if code != 220:
            if self.tls.level == "encrypt":
                reply = parse_reply(code, texts)
                self._refuse(TempFail(Reply(451, "4.7.4", _clean(
                    f"TLS is required, but host {self.relay} refused to start TLS: {reply}")),
                    self.relay))
                return True
            # Opportunistic: go on in plaintext on this connection.
            self._plain_after_starttls()
            return False
        # Anything the server sent after its 220 arrived before the handshake and is
        # not protected by it: discard it with the parser's state (RFC 3207 section 4.2).
        self._parser = ReplyParser()
        self._expect.clear()
        self._in_handshake = True
        try:
            self.transport.startTLS(self.tls.options(self.server_name))
        except Exception as e:
            self._in_handshake = False
            self._refuse(TempFail(Reply(451, "4.7.5", _clean(
                f"cannot start TLS with {self.relay}: {e}")), self.relay),
                plaintext=self.tls.level == "may")
            self._abort()
            return True
        self.secure = True
        self.verified = self.tls.level == "encrypt"
        self.extensions = {}
        self._send(f"EHLO {self.helo_name}", self._on_ehlo, "EHLO")
        return True

    def _plain_after_starttls(self):
        if self.auth is not None:
            self._authenticate()
        else:
            self._become_ready()

    def handshakeCompleted(self):
        self._in_handshake = False
        protocol, cipher = "TLS", "unknown"
        try:
            handle = self.transport.getHandle()
            protocol = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
        except Exception:
            pass
        self.tls_info = (protocol, cipher)
        kind = "Verified" if self.verified else "Anonymous"
        prefix = f"{self.qid}: " if self.qid else ""
        log.info(f"{prefix}{kind} TLS connection established to {self.relay}: {protocol} "
                 f"with cipher {cipher}", qid=self.qid, relay=self.relay, tls_protocol=protocol,
                 cipher=cipher, verified=self.verified)

    def _authenticate(self):
        if not self.verified:
            self._refuse(TempFail(Reply(451, "4.7.0", _clean(
                f"not sending credentials to {self.relay} without verified TLS")), self.relay))
            return True
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = self.auth
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
            self._send(f"AUTH PLAIN {token}", self._on_auth, "AUTH")
        elif "LOGIN" in mechanisms:
            self._send("AUTH LOGIN", partial(self._on_login, 0), "AUTH")
        else:
            self._refuse(TempFail(Reply(451, "4.7.0", _clean(
                f"host {self.relay} offers no AUTH mechanism we support (PLAIN, LOGIN)")),
                self.relay))
            return True
        return False

    def _on_login(self, step, code, texts):
        if code != 334:
            return self._on_auth(code, texts)
        user, password = self.auth
        secret = (user if step == 0 else password).encode()
        self._send(base64.b64encode(secret).decode(),
                   partial(self._on_login, 1) if step == 0 else self._on_auth, "AUTH")
        return False

    def _on_auth(self, code, texts):
        if code // 100 == 2:
            prefix = f"{self.qid}: " if self.qid else ""
            log.info(f"{prefix}authenticated to {self.relay} as {self.auth[0]}",
                     qid=self.qid, relay=self.relay, sasl_username=self.auth[0])
            self._become_ready()
            return False
        reply = parse_reply(code, texts)
        # A refused login is the operator's to fix: keep the mail (Postfix's soft bounce).
        self._refuse(TempFail(Reply(451, "4.7.0", _clean(
            f"SASL authentication failed with {self.relay}: server said: {reply}")), self.relay))
        return True

    # -- transactions ----------------------------------------------------------------------

    def send(self, txn):
        """Run one transaction; Deferred of one Outcome per recipient (or RETRY)."""
        if not self.usable:
            txn.result.callback(RETRY if txn.reused else [TempFail(Reply(
                451, "4.4.2", f"session with {self.relay} is not usable"), self.relay)]
                * len(txn.recipients))
            return txn.result
        self._txn = txn
        self._outcomes = [None] * len(txn.recipients)
        self._accepted = []
        self._mail_ok = None
        self._rcpt_left = 0
        try:
            self._start(txn)
        except Exception:
            log.failure("SMTP client error")
            self._end_transaction(TempFail(Reply(451, "4.3.0", "SMTP client error, see the log"),
                                           self.relay))
            self._abort()
        return txn.result

    def _start(self, txn):
        if self.transactions:
            txn.reused = True
            self._send("RSET", self._on_rset, "RSET")
        else:
            self._begin()

    def _on_rset(self, code, texts):
        if code // 100 != 2:
            self._end_transaction(None, lost_early=True)
            self.quit()
            return True
        self._begin()
        return False

    def _check(self):
        """Refusals we can tell before MAIL: SMTPUTF8, 8BITMIME, SIZE.  Also makes
        the message what goes on the wire (7-bit if it must be, CRLF, no line over
        998 octets), so that ``SIZE=`` and the size check count the bytes sent.
        The 7-bit conversion comes before the line folding: its encodings break
        long lines without changing the text, where folding inserts spaces."""
        txn = self._txn
        if "SMTPUTF8" not in self.extensions and self._needs_utf8() and self._utf8_used():
            return PermFail(Reply(553, "5.6.7", (
                f"SMTPUTF8 is required, but was not offered by host {self.relay}")), self.relay)
        if not txn.message.isascii() and "8BITMIME" not in self.extensions:
            converted = downgrade(txn.message)
            if converted is None:
                return PermFail(Reply(554, "5.6.3", (
                    f"8-bit message content cannot be converted to 7-bit for host {self.relay}, "
                    "which does not offer 8BITMIME")), self.relay)
            txn.message = converted
        txn.message = fold_long_lines(crlf_lines(txn.message))
        limit = self.extensions.get("SIZE", "")
        if limit.isascii() and limit.isdigit() and int(limit) and len(txn.message) > int(limit):
            return PermFail(Reply(552, "5.3.4", (
                f"message size {len(txn.message)} exceeds size limit {int(limit)} of server "
                f"{self.relay}")), self.relay)
        return None

    def _needs_utf8(self):
        txn = self._txn
        return (bool(txn.params.get("smtputf8")) or not txn.sender.isascii()
                or any(not a.isascii() for a, _ in txn.recipients))

    def _utf8_used(self):
        """Whether the envelope or the header section holds UTF-8, which a server
        without SMTPUTF8 cannot take.  A message its client flagged SMTPUTF8
        that turns out to be ASCII there goes without the flag (RFC 6531 3.4:
        a client should not ask for SMTPUTF8 it does not need; Postfix sends
        such mail on too); an 8-bit body is the 8BITMIME check's business."""
        txn = self._txn
        if not txn.sender.isascii() or any(not a.isascii() for a, _ in txn.recipients):
            return True
        end = _HEADER_END.search(txn.message)
        return not txn.message[:end.start() if end else len(txn.message)].isascii()

    def _mail_command(self):
        txn = self._txn
        parts = [f"MAIL FROM:<{txn.sender}>"]
        ext = self.extensions
        if "SIZE" in ext:
            parts.append(f"SIZE={len(txn.message)}")
        if "8BITMIME" in ext and (not txn.message.isascii()
                                  or str(txn.params.get("body") or "").upper() == "8BITMIME"):
            parts.append("BODY=8BITMIME")
        if "SMTPUTF8" in ext and self._needs_utf8():
            parts.append("SMTPUTF8")
        if "DSN" in ext:
            ret = str(txn.params.get("ret") or "").upper()
            if ret in ("FULL", "HDRS"):
                parts.append(f"RET={ret}")
            envid = txn.params.get("envid")
            if envid:
                parts.append(f"ENVID={xtext(str(envid))}")
        return " ".join(parts)

    def _rcpt_command(self, i):
        address, options = self._txn.recipients[i]
        parts = [f"RCPT TO:<{address}>"]
        if "DSN" in self.extensions:
            notify = options.get("notify")
            if notify:
                parts.append("NOTIFY=" + ",".join(str(n).upper() for n in notify))
            orcpt = options.get("orcpt")
            if orcpt:
                kind, original = orcpt
                parts.append(f"ORCPT={kind};{xtext(original)}")
        return " ".join(parts)

    def _begin(self):
        self.transactions += 1
        refused = self._check()
        if refused is not None:
            self._end_transaction(refused)
            return
        txn = self._txn
        mail = self._mail_command()
        if "PIPELINING" in self.extensions:
            lines = [mail] + [self._rcpt_command(i) for i in range(len(txn.recipients))]
            self.transport.write(b"".join(self._command(line) for line in lines))
            self._rcpt_left = len(txn.recipients)
            self._await(self._on_mail, "MAIL FROM")
            for i in range(len(txn.recipients)):
                self._await(partial(self._on_rcpt, i), "RCPT TO")
        else:
            self._send(mail, self._on_mail, "MAIL FROM")

    def _on_mail(self, code, texts):
        self._mail_ok = code // 100 == 2
        if not self._mail_ok:
            outcome = _failure(parse_reply(code, texts), self.relay)
            self._outcomes = [outcome] * len(self._outcomes)
            if "PIPELINING" not in self.extensions:
                self._end_transaction(None)
            return False
        if "PIPELINING" not in self.extensions:
            self._next_rcpt(0)
        return False

    def _next_rcpt(self, i):
        if i < len(self._txn.recipients):
            self._send(self._rcpt_command(i), partial(self._on_rcpt, i), "RCPT TO")
        else:
            self._after_rcpts()

    def _on_rcpt(self, i, code, texts):
        if self._mail_ok:
            if code // 100 == 2:
                self._accepted.append(i)
            else:
                self._outcomes[i] = _failure(parse_reply(code, texts), self.relay)
        if "PIPELINING" in self.extensions:
            self._rcpt_left -= 1
            if self._rcpt_left == 0:
                self._after_rcpts()
        else:
            self._next_rcpt(i + 1)
        return False

    def _after_rcpts(self):
        if not self._mail_ok or not self._accepted:
            self._end_transaction(None)
            return
        self._send("DATA", self._on_data, "DATA")

    def _on_data(self, code, texts):
        if code != 354:
            outcome = _failure(parse_reply(code, texts), self.relay)
            for i in self._accepted:
                self._outcomes[i] = outcome
            self._end_transaction(None)
            return False
        message = self._txn.message     # made CRLF and folded by _check
        if len(message) <= self.chunk_size:
            self.transport.write(b"".join(stuffed_chunks(message, max(2, self.chunk_size))))
            self._body_sent()
        else:
            self._arm("message body")
            self._producer = _BodyProducer(self, stuffed_chunks(message, self.chunk_size))
            self.transport.registerProducer(self._producer, False)
        return False

    def _touch(self):
        """The body producer made progress: the data block timeout starts again."""
        self._arm("message body")

    def _body_sent(self):
        self._producer = None
        self._await(self._on_end_of_data, "end of data")

    def _on_end_of_data(self, code, texts):
        reply = parse_reply(code, texts)
        if code // 100 == 2:
            # The success notice: the server reports if it offers DSN (it got the
            # NOTIFY request with the RCPT); otherwise ours says "relayed".
            outcome = Delivered(reply, self.relay,
                                action=PASSED_ON if "DSN" in self.extensions else RELAYED)
        else:
            outcome = _failure(reply, self.relay)
        for i in self._accepted:
            self._outcomes[i] = outcome
        self._end_transaction(None)
        return False

    def _end_transaction(self, outcome, lost_early=False):
        """Answer the running transaction: ``outcome`` for every recipient still
        open.  A reused session lost before its MAIL was answered asks for a retry
        on a fresh connection (``lost_early``)."""
        txn = self._txn
        if txn is None:
            return
        self._txn = None
        if lost_early and txn.reused and self._mail_ok is None:
            txn.result.callback(RETRY)
            return
        fill = outcome or TempFail(Reply(451, "4.4.2", _clean(
            f"session with {self.relay} ended without a reply")), self.relay)
        outcomes = [o if o is not None else fill for o in self._outcomes]
        if not self._lost and not self._closing:
            self._waiting_for = "nothing"
        txn.result.callback(outcomes)
