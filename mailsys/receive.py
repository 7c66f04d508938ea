"""Receiving mail: the glue between the SMTP wire, the policy and the spool.

One :class:`ReceiveHandler` per connection answers the protocol's questions
(mailsys.smtp.server) using the pure decisions of mailsys.policy and writes
accepted messages through the one way into the queue, mailsys.spool.  The same
handler serves the MX-facing ``mta`` role and, with authentication, the
submission roles.
"""
import email.utils
import ipaddress
import time

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from mailsys import policy
from mailsys.smtp import reply as R
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from mailsys.spool import SpoolError

log = Logger(namespace="mailsys.smtpd")

MAX_HOPS = 50   # RFC 5321 6.3; Postfix's hopcount_limit


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
    __slots__ = ("ip", "port", "name", "role")

    def __init__(self, ip, port, role):
        self.ip, self.port, self.role = ip, port, role
        self.name = "unknown"

    def __str__(self):
        return f"{self.name}[{self.ip}]" if self.ip is not None else self.name


def count_hops(head):
    """Received headers in the header section of ``head`` (the message's first bytes)."""
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[:end + 2]
    return (b"\r\n" + section.lower()).count(b"\r\nreceived:")


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
        self._writer = None

    # -- session --------------------------------------------------------------

    def client_name(self, proto):
        return str(self.client)

    def connected(self, proto):
        ip = self.client.ip
        if not self.service.limiter.acquire(ip):
            log.info("reject: connect from {client}: too many connections", client=self.client)
            return Reply(421, "4.7.0", f"{self.config.server.hostname} Error: too many connections")
        self.admitted = True
        name = self.service.rdns.cached(ip) if ip is not None else "localhost"
        if name is not None:
            return self._named(name)
        d = self.service.rdns.lookup(ip)
        d.addCallback(self._named)
        return d

    def _named(self, name):
        self.client.name = name
        log.info("connect from {client}", client=self.client)
        return None

    def disconnected(self, proto):
        if self.admitted:
            self.service.limiter.release(self.client.ip)
            log.info("disconnect from {client} {stats}", client=self.client, stats=proto.stats)

    def helo(self, proto, name, esmtp):
        return None

    # -- transaction ----------------------------------------------------------

    def mail(self, proto, txn):
        txn.queue_id = self.service.spool.ids.next()
        return None

    def rcpt(self, proto, txn, rcpt, params):
        refusal = policy.check_recipient(
            rcpt,
            local_domains=self.service.local_domains,
            relay_domains=self.service.relay_domains,
            accounts=self.service.accounts,
            may_relay=self.service.may_relay(self.client.ip) or proto.auth_user is not None)
        if refusal is not None:
            log.info("NOQUEUE: reject: RCPT from {client}: {code} {status} <{rcpt}>: {text}; "
                     "from=<{sender}> to=<{rcpt}> proto={proto} helo=<{helo}>",
                     client=self.client, code=refusal.code, status=refusal.status, rcpt=rcpt,
                     text=refusal.text, sender=txn.sender or "", proto="ESMTP" if proto.esmtp else "SMTP",
                     helo=proto.helo)
            return refusal.with_text(f"<{rcpt}>: {refusal.text}") if refusal.code != 452 else refusal
        return None

    def data(self, proto, txn):
        self._writer = self.service.spool.new_message(txn.queue_id)
        self._writer.write(self._received_header(proto, txn))
        return None

    def _received_header(self, proto, txn):
        c = self.client
        ip = f"IPv6:{c.ip}" if c.ip is not None and c.ip.version == 6 else str(c.ip)
        lines = [f"Received: from {proto.helo} ({c.name} [{ip}])",
                 f"\tby {self.config.server.hostname} (mailsys) with {protocol_keyword(proto)} id {txn.queue_id}"]
        if len(txn.recipients) == 1:
            rcpt = txn.recipients[0][0]
            lines.append(f"\tfor <{rcpt}>; {email.utils.formatdate(localtime=False)}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{email.utils.formatdate(localtime=False)}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def data_chunk(self, proto, txn, chunk):
        self._writer.write(chunk)

    def data_abort(self, proto, txn, refusal):
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        if refusal is not None:
            log.info("{qid}: reject: DATA from {client}: {reply}; from=<{sender}>",
                     qid=txn.queue_id, client=self.client, reply=refusal, sender=txn.sender or "")

    def data_end(self, proto, txn, size):
        writer, self._writer = self._writer, None
        if count_hops(writer.head) > MAX_HOPS + 1:   # ours plus more than 50
            writer.discard()
            log.info("{qid}: reject: DATA from {client}: {reply}", qid=txn.queue_id,
                     client=self.client, reply=R.MAIL_LOOP)
            return R.MAIL_LOOP
        envelope = {
            "arrival": time.time(),
            "sender": str(txn.sender) if txn.sender else "",
            "params": txn.params.as_dict(),
            "recipients": [dict(rcpt=str(m), state="queued", **p.as_dict())
                           for m, p in txn.recipients],
            "client": {"ip": str(self.client.ip), "name": self.client.name, "helo": proto.helo,
                       "proto": protocol_keyword(proto), "role": self.client.role,
                       "auth": proto.auth_user},
        }
        d = self.service.spool.commit(writer, envelope)

        def queued(entry):
            log.info("{qid}: client={client}, from=<{sender}>, size={size}, nrcpt={nrcpt} (queued)",
                     qid=txn.queue_id, client=self.client, sender=envelope["sender"],
                     size=entry.message_size, nrcpt=len(txn.recipients))
            return Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")

        def failed(f):
            err = f.value
            log.error("{qid}: spool write failed: {error}", qid=txn.queue_id, error=str(err))
            if isinstance(err, SpoolError) and err.nospace:
                return R.NO_SPACE
            return R.IO_ERROR

        d.addCallbacks(queued, failed)
        return d


class ReceiveFactory(ServerFactory):
    """Builds one protocol + handler per connection for a listening role."""

    def __init__(self, service, role):
        self.service = service
        self.role = role

    def buildProtocol(self, addr):
        ip = getattr(addr, "host", None)
        try:
            ip = ipaddress.ip_address(ip) if ip else None
        except ValueError:
            ip = None
        client = ClientInfo(ip, getattr(addr, "port", None), self.role)
        handler = ReceiveHandler(self.service, client)
        cfg = self.service.config
        proto = SMTPServerProtocol(handler, cfg.server.hostname, limits=cfg.limits,
                                   clock=self.service.clock)
        proto.factory = self
        return proto
