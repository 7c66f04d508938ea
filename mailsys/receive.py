"""Receiving mail: the glue between the SMTP wire, the policy and the spool.

One :class:`ReceiveHandler` per connection answers the protocol's questions
(mailsys.smtp.server) using the pure decisions of mailsys.policy and writes
accepted messages through the one way into the queue, mailsys.spool.  The same
handler serves the MX-facing ``mta`` role and, with authentication, the
submission roles.
"""
import datetime
import email.utils
import re
import time

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.protocol import ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsys import policy
from mailsys.auth import IMailUser
from mailsys.logs import MailLog
from mailsys.smtp import reply as R
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from mailsys.spool import SpoolError

log = MailLog("mailsys.smtpd")

MAX_HOPS = 50   # RFC 5321 6.3; Postfix's hopcount_limit
MAX_HEADER_HOLD = 256 * 1024   # submission: header bytes held back to look for Date/Message-ID
SUBMISSION_ROLES = ("submission", "submissions")

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
NULL_SENDER_REFUSED = Reply(553, "5.7.1", "Sender address rejected: <> is not allowed on submission")


_stamp = [None, ""]     # (second, its RFC 5322 date): made once a second


def _now_rfc5322(now=time.time):
    """The date of a Received or Date header, to the second as RFC 5322 has it.

    ``email.utils.format_datetime`` of a new ``datetime`` for every message was
    3% of a receiving worker's work; every message of one second gets the same
    text anyway."""
    second = int(now())
    if second != _stamp[0]:
        when = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        _stamp[:] = [second, email.utils.format_datetime(when)]
    return _stamp[1]


class ConnectionLimiter:
    """Counts connections over every listener together, in total and per IP."""

    def __init__(self, total, per_ip):
        self.total_limit, self.per_ip_limit = total, per_ip
        self.total = 0
        self.per_ip = {}

    def acquire(self, ip):
        if self.total >= self.total_limit or self.per_ip.get(ip, 0) >= self.per_ip_limit:
            return False
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip):
        self.total -= 1
        n = self.per_ip[ip] - 1
        if n:
            self.per_ip[ip] = n
        else:
            del self.per_ip[ip]


class ClientInfo:
    """Who is connected; ``label`` is the Postfix-style ``name[ip]`` used on every log line."""

    __slots__ = ("ip", "ip_text", "port", "name", "role", "label")

    def __init__(self, ip, port, role, ip_text=None):
        self.ip, self.port, self.role = ip, port, role
        self.ip_text = ip_text if ip_text is not None else (str(ip) if ip is not None else "")
        self.set_name("unknown")

    @classmethod
    def from_peer(cls, addr, role):
        """The client behind a listener's peer address ``addr`` (IPv4-mapped
        addresses as plain IPv4: :func:`mailsys.policy.client_address`)."""
        ip, text = policy.client_address(getattr(addr, "host", None))
        return cls(ip, getattr(addr, "port", None), role, text)

    def set_name(self, name):
        self.name = name
        self.label = f"{name}[{self.ip_text}]" if self.ip is not None else name

    def __str__(self):
        return self.label


_RECEIVED_FIELD = re.compile(rb"\r\nreceived[ \t]*:", re.I)
_FIELD_START = re.compile(rb"[!-9;-~]+:")            # a field name and its colon (RFC 5322 2.2)
_NOT_A_FIELD = re.compile(rb"[!-9;-~]*[^!-9;-~:]")    # something else comes first
OPENING_LIMIT = 1000    # bytes after which a message that showed no field name has none


def starts_with_field(data):
    """Whether a message's first bytes begin a header field: True, False, or
    None while they cannot tell yet (a field name still arriving).

    What we put in front of a message (Received; on submission Date and
    Message-ID) must not change what the client's bytes mean.  A message that
    starts with white space would continue our last field, and one that starts
    with a line that is no field (a body with no header) would sit in the
    header section; both get a blank line after our fields, so that the
    client's bytes are body, as RFC 5322 2.1 reads a message without a header."""
    if not data or data.startswith(b"\r\n"):
        return True            # no header section: the blank line is there already
    head = data[:OPENING_LIMIT]     # the same verdict however the bytes arrive
    if _FIELD_START.match(head):
        return True
    if data == b"\r":
        return None
    if _NOT_A_FIELD.match(head) or len(data) >= OPENING_LIMIT:
        return False           # (a field name longer than a line may be is none)
    return None


def count_hops(head):
    """Received headers in the header section of ``head`` (the message's first bytes)."""
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[:end + 2]
    return len(_RECEIVED_FIELD.findall(b"\r\n" + section))


def protocol_keyword(proto):
    """RFC 3848 / RFC 6531 'with' keyword for the Received header."""
    if not proto.esmtp:
        return "SMTP"
    utf8 = proto.txn is not None and proto.txn.params.smtputf8
    base = ("UTF8LMTP" if utf8 else "LMTP") if proto.lmtp else ("UTF8SMTP" if utf8 else "ESMTP")
    return base + ("S" if proto.tls else "") + ("A" if proto.auth_user else "")


class ReceiveHandler:
    """Answers one SMTP session; see mailsys.smtp.server for the calling contract."""

    def __init__(self, service, client):
        self.service = service
        self.client = client
        self.config = service.config
        self.admitted = False
        self.submission = client.role in SUBMISSION_ROLES
        self._writer = None
        self._held = None     # submission: header bytes not yet written
        self._opening = None  # the message's first bytes, until they show a field name or not

    # -- session --------------------------------------------------------------

    def client_name(self, proto):
        return self.client.label

    def connected(self, proto):
        ip = self.client.ip
        if not self.service.limiter.acquire(ip):
            log.info(f"reject: connect from {self.client}: too many connections",
                     client=self.client.label)
            return Reply(421, "4.7.0", f"{self.config.server.hostname} Error: too many connections")
        self.admitted = True
        name = self.service.rdns.cached(ip) if ip is not None else "localhost"
        if name is not None:
            return self._named(name)
        d = self.service.rdns.lookup(ip)
        d.addCallback(self._named)
        return d

    def _named(self, name):
        self.client.set_name(name)
        log.info(f"connect from {self.client}", client=self.client.label)
        return None

    def disconnected(self, proto):
        if self.admitted:
            self.service.limiter.release(self.client.ip)
            # A session with no command at all says so as Postfix does, rather
            # than ending its line in a space.
            stats = str(proto.stats) or "commands=0/0"
            log.info(f"disconnect from {self.client} {stats}", client=self.client.label, stats=stats)

    def helo(self, proto, name, esmtp):
        return None

    def etrn(self, proto, domain):
        """RFC 1985 on the mta port: only for clients that may relay (a site
        behind us pulling its mail), like Postfix's default ETRN restriction."""
        if not (self.service.may_relay(self.client.ip) or proto.auth_user is not None):
            log.info(f"reject: ETRN from {self.client}: 459 4.7.1 {domain}: "
                     f"client not in relay.mynetworks", client=self.client.label, domain=domain)
            return Reply(459, "4.7.1", f"<{domain}>: Node not allowed: client not in relay.mynetworks")
        log.info(f"ETRN from {self.client}: {domain}", client=self.client.label, domain=domain)
        self.service.request_flush(domain)
        return None

    def tls_context(self, proto):
        return self.service.tls

    def authenticate(self, proto, user, password):
        """Check credentials after this IP's failure penalty; a Reply on failure,
        else the account's canonical address."""
        ip = self.client.ip
        throttle = self.service.auth_throttle
        creds = credentials.UsernamePassword(user, password)

        def check(_):
            if password is None:      # the protocol refused it (mailsys.smtp.sasl)
                raise UnauthorizedLogin("another authorization identity")
            return self.service.portal.login(creds, None, IMailUser)

        method = getattr(proto, "sasl_method", None) or "AUTH"

        def ok(result):
            _, address, _ = result
            throttle.succeeded(ip)
            log.info(f"{self.client.label}: sasl_method={method}, sasl_username={address}",
                     client=self.client.label, sasl_method=method, sasl_username=address)
            return address

        def failed(f):
            throttle.failed(ip)
            # Postfix's words, which fail2ban's postfix-sasl filter expects.
            log.info(f"warning: {self.client.label}: SASL {method} authentication failed: "
                     f"authentication failure", client=self.client.label, sasl_method=method)
            return AUTH_FAILED

        d = throttle.wait(ip)
        d.addCallback(check)
        d.addCallbacks(ok, failed)
        return d

    # -- transaction ----------------------------------------------------------

    def mail(self, proto, txn):
        if self.submission:
            if proto.auth_user is None:
                return self._reject_mail(proto, txn, AUTH_REQUIRED)
            if txn.sender is None:
                return self._reject_mail(proto, txn, NULL_SENDER_REFUSED)
            if not self.service.accounts.owns(proto.auth_user, str(txn.sender)):
                return self._reject_mail(proto, txn, Reply(
                    553, "5.7.1", f"<{txn.sender}>: Sender address rejected: "
                                  f"not owned by user {proto.auth_user}"))
        txn.queue_id = self.service.spool.ids.next()
        return None

    def _reject_mail(self, proto, txn, refusal):
        """Log a refused MAIL as Postfix does (the reply as sent, then from=,
        proto= and helo=), so that every refusal of a client has its line."""
        sender = str(txn.sender) if txn.sender is not None else ""
        log.info(f"NOQUEUE: reject: MAIL from {self.client}: {refusal}; "
                 f"from=<{sender}> proto=ESMTP helo=<{proto.helo}>",
                 client=self.client.label, sender=sender, user=proto.auth_user)
        return refusal

    def rcpt(self, proto, txn, rcpt, params):
        refusal = policy.check_recipient(
            rcpt,
            local_domains=self.service.local_domains,
            relay_domains=self.service.relay_domains,
            accounts=self.service.accounts,
            may_relay=self.service.may_relay(self.client.ip) or proto.auth_user is not None)
        self._held = None
        if refusal is not None:
            sender = str(txn.sender or "")
            kind = "ESMTP" if proto.esmtp else "SMTP"
            log.info(f"NOQUEUE: reject: RCPT from {self.client}: {refusal.code} {refusal.status} "
                     f"<{rcpt}>: {refusal.text}; from=<{sender}> to=<{rcpt}> proto={kind} "
                     f"helo=<{proto.helo}>",
                     client=self.client.label, reply=str(refusal), sender=sender, rcpt=str(rcpt))
            return refusal.with_text(f"<{rcpt}>: {refusal.text}") if refusal.code != 452 else refusal
        return None

    def data(self, proto, txn):
        self._writer = self.service.spool.new_message(txn.queue_id)
        self._writer.write(self._received_header(proto, txn))
        self._held = [] if self.submission else None
        self._opening = b""
        self._keyword = protocol_keyword(proto)
        return None

    def _received_header(self, proto, txn):
        c = self.client
        ip = f"IPv6:{c.ip_text}" if c.ip is not None and c.ip.version == 6 else c.ip_text
        lines = [f"Received: from {proto.helo} ({c.name} [{ip}])"]
        if proto.auth_user:
            lines[0] += f" (Authenticated sender: {proto.auth_user})"
        lines += [
                  f"\tby {self.config.server.hostname} (mailsys) with {protocol_keyword(proto)} "
                  f"id {txn.queue_id}"]
        if len(txn.recipients) == 1:
            rcpt = txn.recipients[0][0]
            lines.append(f"\tfor <{rcpt}>; {_now_rfc5322()}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{_now_rfc5322()}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def data_chunk(self, proto, txn, chunk):
        if self._opening is not None:
            chunk = self._opening + chunk
            starts = starts_with_field(chunk)
            if starts is None:
                self._opening = chunk
                return
            self._opening = None
            if not starts:
                chunk = b"\r\n" + chunk
        self._take(txn, chunk)

    def _take(self, txn, chunk):
        held = self._held
        if held is None:
            self._writer.write(chunk)
            return
        held.append(chunk)
        head = b"".join(held)
        if head.startswith(b"\r\n") or b"\r\n\r\n" in head or len(head) > MAX_HEADER_HOLD:
            self._release_headers(txn, head)

    def _release_headers(self, txn, head):
        """RFC 6409 section 8.3/8.4: add Date and Message-ID when the author left them out."""
        self._held = None
        end = head.find(b"\r\n\r\n")
        # A message that starts with the blank line has no header fields at all.
        section = b"" if head.startswith(b"\r\n") else \
            b"\r\n" + (head if end < 0 else head[:end + 2]).lower()
        extra = []
        if b"\r\ndate:" not in section:
            extra.append(f"Date: {_now_rfc5322()}\r\n")
        if b"\r\nmessage-id:" not in section:
            extra.append(f"Message-ID: <{txn.queue_id}@{self.config.server.hostname}>\r\n")
        if extra:
            self._writer.write("".join(extra).encode("ascii"))
        self._writer.write(head)

    def data_abort(self, proto, txn, refusal):
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        self._held = None
        self._opening = None
        if refusal is not None:
            sender = str(txn.sender or "")
            log.info(f"{txn.queue_id}: reject: DATA from {self.client}: {refusal}; from=<{sender}>",
                     qid=txn.queue_id, client=self.client.label, reply=str(refusal), sender=sender)

    def data_end(self, proto, txn, size):
        opening, self._opening = self._opening, None
        if opening:        # too short to show a field name: no field, so body
            self._take(txn, b"\r\n" + opening)
        if self._held is not None:
            self._release_headers(txn, b"".join(self._held))
        writer, self._writer = self._writer, None
        if count_hops(writer.head) > MAX_HOPS + 1:   # ours plus more than 50
            writer.discard()
            log.info(f"{txn.queue_id}: reject: DATA from {self.client}: {R.MAIL_LOOP}",
                     qid=txn.queue_id, client=self.client.label, reply=str(R.MAIL_LOOP))
            return R.MAIL_LOOP
        envelope = {
            "arrival": time.time(),
            "sender": str(txn.sender) if txn.sender else "",
            "params": txn.params.as_dict(),
            "recipients": [dict(rcpt=str(m), state="queued", **p.as_dict())
                           for m, p in txn.recipients],
            "client": {"ip": self.client.ip_text, "name": self.client.name, "helo": proto.helo,
                       "proto": self._keyword, "role": self.client.role,
                       "auth": proto.auth_user},
        }
        d = self.service.spool.commit(writer, envelope)

        def queued(entry):
            log.info(f"{txn.queue_id}: client={self.client}", qid=txn.queue_id,
                     client=self.client.label)
            log.queued(txn.queue_id, envelope["sender"], entry.message_size, len(txn.recipients))
            return Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")

        def failed(f):
            err = f.value
            log.error(f"{txn.queue_id}: spool write failed: {err}", qid=txn.queue_id, error=str(err))
            if isinstance(err, SpoolError) and err.nospace:
                return R.NO_SPACE
            return R.IO_ERROR

        d.addCallbacks(queued, failed)
        return d


class ReceiveFactory(ServerFactory):
    """Builds one protocol + handler per connection for a listening role."""

    noisy = False

    def __init__(self, service, role):
        self.service = service
        self.role = role

    def buildProtocol(self, addr):
        client = ClientInfo.from_peer(addr, self.role)
        handler = ReceiveHandler(self.service, client)
        cfg = self.service.config
        tls = self.service.tls
        submission = self.role in SUBMISSION_ROLES
        proto = SMTPServerProtocol(
            handler, cfg.server.hostname, limits=cfg.limits, clock=self.service.clock,
            tls_available=tls is not None and tls.available and self.role != "submissions",
            auth_mechanisms=("PLAIN", "LOGIN") if submission else (),
            etrn=self.role == "mta")
        if self.role == "submissions":
            proto.tls = True
        proto.factory = self
        return proto


def implicit_tls(factory, tls):
    """Wrap a role's factory so every connection starts with a TLS handshake (RFC 8314)."""
    return TLSMemoryBIOFactory(tls, False, factory)
