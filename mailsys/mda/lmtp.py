"""The MDA's LMTP server (RFC 2033): one reply per accepted recipient.

The protocol is mailsys.smtp.server in LMTP mode; this module answers its
questions.  Each RCPT is resolved to accounts once (aliases, plus-addressing)
and their mailbox locations fixed there; after DATA every mailbox is written
on a worker thread, and each recipient gets the reply of its own deliveries:
250 only when every mailbox it stands for has the message.  A failure is never
reported as delivered (maddy #453 lost mail exactly that way); when one of
several alias targets fails the whole recipient fails, since a retry that
duplicates a copy is better than a copy lost.
"""
import time

from twisted.internet import threads
from twisted.internet.protocol import ServerFactory

from mailsys.delivery import Delivered, PermFail, TempFail
from mailsys.logs import MailLog
from mailsys.mda.maildir import MaildirStore
from mailsys.mda.mbox import MboxStore
from mailsys.mda.store import UnsafeMailbox, mailbox_location
from mailsys.smtp import reply as R
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from mailsys.spool import QueueIds

log = MailLog("mailsys.lmtp")

UNKNOWN = Reply(550, "5.1.1", "User unknown in local recipient table")
BAD_MAILBOX = Reply(553, "5.1.3", "Mailbox name not allowed")
LOOP = Reply(554, "5.4.6", "Mail loop: already delivered to this mailbox")


def delivered_to(head):
    """Addresses in Delivered-To headers of the header section (lowercased)."""
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[:end + 2]
    found = set()
    for line in (b"\r\n" + section).split(b"\r\n"):
        if line[:13].lower() == b"delivered-to:":
            found.add(line[13:].strip().decode("utf-8", "replace").strip("<>").lower())
    return found


class MDA:
    """What every LMTP session shares: stores, accounts, mailbox settings."""

    def __init__(self, config, accounts, reactor, stores=None, worker=0):
        self.config = config
        self.accounts = accounts
        self.reactor = reactor
        self.root = config.mailbox.root
        self.default_store = config.mailbox.default_store
        self.default_quota = config.mailbox.quota
        self.local_domains = frozenset(config.domains.local)
        self.stores = stores or {"maildir": MaildirStore(), "mbox": MboxStore()}
        self.ids = QueueIds(worker=worker)

    def targets(self, address):
        """[(account, store kind, quota, location)] for a recipient, or a Reply."""
        if "@" not in address:
            address = f"{address}@{sorted(self.local_domains)[0]}"
        domain = address.rpartition("@")[2].lower()
        if domain not in self.local_domains:
            return UNKNOWN
        expansion = self.accounts.expand(address)
        if not expansion.local_users:
            return UNKNOWN
        out = []
        for account in expansion.local_users:
            user = self.accounts.user(account)
            if user is None:
                return UNKNOWN
            kind = user.store or self.default_store
            quota = user.quota if user.quota is not None else self.default_quota
            try:
                location = mailbox_location(self.root, user.address, kind)
            except UnsafeMailbox:
                return BAD_MAILBOX
            out.append((user.address, kind, quota, location))
        return out


class LMTPHandler:
    def __init__(self, mda, peer):
        self.mda = mda
        self.peer = peer
        self._targets = []
        self._chunks = None

    def client_name(self, proto):
        return self.peer

    def connected(self, proto):
        return None

    def disconnected(self, proto):
        pass

    def helo(self, proto, name, esmtp):
        return None

    def mail(self, proto, txn):
        txn.queue_id = self.mda.ids.next()
        self._targets = []
        return None

    def rcpt(self, proto, txn, rcpt, params):
        targets = self.mda.targets(str(rcpt))
        if isinstance(targets, Reply):
            log.info(f"{txn.queue_id}: reject: RCPT from {self.peer}: {targets.code} {targets.status} "
                     f"<{rcpt}>: {targets.text}", qid=txn.queue_id, rcpt=str(rcpt))
            return targets.with_text(f"<{rcpt}>: {targets.text}")
        self._targets.append((str(rcpt), targets))
        return None

    def data(self, proto, txn):
        self._chunks = []
        return None

    def data_chunk(self, proto, txn, chunk):
        self._chunks.append(chunk)

    def data_abort(self, proto, txn, refusal):
        self._chunks = None
        self._targets = []

    def tls_context(self, proto):
        return None

    def authenticate(self, proto, user, password):
        return R.BAD_SEQUENCE

    def data_end(self, proto, txn, size):
        message = b"".join(self._chunks)
        self._chunks = None
        targets, self._targets = self._targets, []
        sender = str(txn.sender) if txn.sender else ""
        arrival = time.time()
        d = threads.deferToThreadPool(self.mda.reactor, self.mda.reactor.getThreadPool(),
                                      deliver_all, self.mda.stores, targets, message, sender)

        def done(outcomes):
            replies = []
            delay = time.time() - arrival
            for (rcpt, _), outcome in zip(targets, outcomes):
                status = "sent" if outcome.delivered else ("bounced" if outcome.permanent else "deferred")
                log.info(f"{txn.queue_id}: to=<{rcpt}>, relay=local, delay={delay:.2f}, "
                         f"dsn={outcome.reply.status}, status={status} ({outcome.reply.text})",
                         qid=txn.queue_id, rcpt=rcpt, status=status, dsn=outcome.reply.status)
                reply = outcome.reply
                if not outcome.delivered:
                    reply = reply.with_text(f"<{rcpt}>: {reply.text}")
                replies.append(reply)
            return replies

        d.addCallback(done)
        return d


def deliver_all(stores, targets, message, sender):
    """Worker thread: every recipient's mailboxes, in RCPT order; one Outcome each."""
    seen_loop = delivered_to(message[:65536])
    when = time.time()
    outcomes = []
    for rcpt, accounts in targets:
        results = []
        for account, kind, quota, location in accounts:
            if account.lower() in seen_loop:
                results.append(PermFail(LOOP))
                continue
            prefix = f"Return-Path: <{sender}>\r\nDelivered-To: {account}\r\n".encode("utf-8")
            try:
                results.append(stores[kind].deliver(location, prefix, message, quota,
                                                    sender=sender or "MAILER-DAEMON", when=when))
            except Exception as e:  # a bug must not turn into "delivered"
                results.append(TempFail(Reply(451, "4.3.0", f"Local delivery error: {type(e).__name__}")))
        outcomes.append(_worst(results))
    return outcomes


def _worst(results):
    for cls in (TempFail, PermFail):
        for r in results:
            if isinstance(r, cls):
                return r
    return results[0] if results else TempFail(Reply(451, "4.3.0", "No mailbox for recipient"))


class LMTPFactory(ServerFactory):
    noisy = False

    def __init__(self, mda, limits, hostname, clock):
        self.mda, self.limits, self.hostname, self.clock = mda, limits, hostname, clock

    def buildProtocol(self, addr):
        peer = getattr(addr, "host", None) or getattr(addr, "name", None) or "local"
        if isinstance(peer, bytes):
            peer = peer.decode("utf-8", "replace")
        handler = LMTPHandler(self.mda, str(peer))
        proto = SMTPServerProtocol(handler, self.hostname, limits=self.limits, clock=self.clock,
                                   lmtp=True)
        proto.factory = self
        return proto
