"""The MDA's LMTP server (RFC 2033): one reply per accepted recipient.

The protocol is mailsys.smtp.server in LMTP mode; this module answers its
questions.  Each RCPT is resolved to accounts once (aliases, plus-addressing)
and their mailbox locations fixed there; after DATA every mailbox is written
on a worker thread, and each recipient gets the reply of its own deliveries:
250 only when every mailbox it stands for has the message.  A failure is never
reported as delivered (maddy #453 lost mail exactly that way); when one of
several alias targets fails the whole recipient fails, since a retry that
duplicates a copy is better than a copy lost.

Messages from our own queue carry its queue id (``XQID``); every copy stored
for one is recorded in the delivery log (mailsys.mda.dedupe), and a message
the queue recovered after a crash (``XREDELIVERY``) is not stored again in a
mailbox that provably holds it already: exactly once, even across a crash.
"""
import dataclasses
import os
import time

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mailsys.delivery import ALIAS_QUEUED_TEXT, EXPANDED_TEXT, Delivered, PermFail, TempFail
from mailsys.logs import MailLog
from mailsys.mda.dedupe import DeliveryLog
from mailsys.mda.maildir import MaildirStore
from mailsys.mda.mbox import MboxStore
from mailsys.mda.store import Body, UnsafeMailbox, mailbox_location
from mailsys.offload import Offload
from mailsys.policy import client_address
from mailsys.smtp import reply as R
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from mailsys.spool import QueueIds

log = MailLog("mailsys.lmtp")

UNKNOWN = Reply(550, "5.1.1", "User unknown in local recipient table")
BAD_MAILBOX = Reply(553, "5.1.3", "Mailbox name not allowed")
LOOP = Reply(554, "5.4.6", "Mail loop: already delivered to this mailbox")
ALREADY = Reply(250, "2.0.0", "Ok: already delivered")


def delivered_to(head):
    """Addresses in Delivered-To headers of the header section (lowercased).

    ``head`` has LF line ends, as the MDA receives messages (LFDataReader)."""
    end = head.find(b"\n\n")
    section = head if end < 0 else head[:end + 1]
    found = set()
    for line in (b"\n" + section).split(b"\n"):
        if line[:13].lower() == b"delivered-to:":
            found.add(line[13:].strip().decode("utf-8", "replace").strip("<>").lower())
    return found


TARGETS_MEMO = 10000    # recipients remembered by MDA.targets between accounts changes

#: How much more than ``limits.message_size`` the MDA's LMTP accepts.  The
#: limit is checked when mail arrives (SMTP, sendmail), on the bytes the client
#: sent; what the queue then hands the MDA is bigger: the Received field the
#: receiving side adds (and on submission Date and Message-ID), and a delivery
#: report quotes the original (whole up to mailsys.dsn.MAX_ORIGINAL, 1 MiB)
#: beside its own parts.  With the bare limit here a message within a few
#: hundred bytes of it got ``250`` from SMTP and was then bounced by our own
#: MDA with 552 5.3.4 (its report, from <>, was dropped outright).  Postfix
#: checks message_size_limit once, at entry, and its local delivery agents
#: none; Dovecot's LMTP has no size limit.  The MDA keeps one, with this
#: headroom, so a peer feeding listen.lmtp still cannot store without bound.
SIZE_HEADROOM = 1024 * 1024


def mda_limits(limits):
    """The limits of the MDA's LMTP listeners: ``limits`` with the message size
    raised by :data:`SIZE_HEADROOM`."""
    return dataclasses.replace(limits, message_size=limits.message_size + SIZE_HEADROOM)


class MDA:
    """What every LMTP session shares: stores, accounts, mailbox settings."""

    def __init__(self, config, accounts, reactor, stores=None, worker=0, run=None, spool=None):
        self.config = config
        self.accounts = accounts
        self.reactor = reactor
        self.root = config.mailbox.root
        self.default_store = config.mailbox.default_store
        self.default_quota = config.mailbox.quota
        self.local_domains = frozenset(config.domains.local)
        self.stores = stores or {"maildir": MaildirStore(), "mbox": MboxStore()}
        self.ids = QueueIds(worker=worker)
        # The delivery log of messages from our queue (XQID); none without a state_dir.
        state_dir = getattr(getattr(config, "server", None), "state_dir", None)
        self.delivery_log = (DeliveryLog(os.path.join(state_dir, "mda"), worker)
                             if state_dir else None)
        self.batcher = DeliveryBatcher(reactor, self.stores, run=run, log=self.delivery_log)
        self.spool = spool      # for alias targets outside our domains (relayed by the queue)
        self._seen, self._memo = None, {}    # targets() per address, per accounts snapshot

    def targets(self, address):
        """([(account, store kind, quota, location)], (address for the queue, ...),
        (problem, ...)) for a recipient, or a Reply.

        Addresses for the queue come from aliases: targets outside our domains,
        which it relays, and targets in our domains that are nobody (a typo in
        the aliases file), which its attempt bounces to the sender with the
        alias as the original recipient, as Postfix's local(8) bounces an
        unknown alias member while the others get their copies.  Neither is
        dropped.  An alias none of whose targets works is refused outright:
        550 5.1.1 naming the target, 554 5.4.6 for a loop.  The problems (one
        line each) are logged with every message that meets them.

        Remembered per address for as long as the accounts files stay the same
        (``Accounts.snapshot`` is checked, with its ``stat``, on every call): the
        expansion, the account and its checked mailbox path were a tenth of the
        MDA process's work in profiles of end-to-end delivery."""
        snapshot = getattr(self.accounts, "snapshot", None)
        if snapshot is None:
            return self._targets(address)
        current = snapshot()
        if current is not self._seen:
            self._seen, self._memo = current, {}
        hit = self._memo.get(address)
        if hit is None:
            hit = self._targets(address)
            if len(self._memo) < TARGETS_MEMO:
                self._memo[address] = hit
        return hit

    def _targets(self, address):
        if "@" not in address:
            address = f"{address}@{sorted(self.local_domains)[0]}"
        domain = address.rpartition("@")[2].lower()
        if domain not in self.local_domains:
            return UNKNOWN
        expansion = self.accounts.expand(address)
        remote = tuple(expansion.remote) if self.spool is not None else ()
        if not expansion.local_users and not remote:
            return _refusal(expansion)
        if self.spool is not None:
            remote += tuple(expansion.missing)
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
        return tuple(out), remote, tuple(expansion.errors)

    def relay(self, sender, pairs, message):
        """Spool one copy for alias targets outside our domains; the queue relays it.
        ``pairs`` are (remote address, the alias it came from, for ORCPT)."""
        writer = self.spool.new_message()
        writer.write(message)
        envelope = {"arrival": time.time(), "sender": sender, "params": {},
                    "recipients": [{"rcpt": r, "state": "queued", "orcpt": ["rfc822", orig]}
                                   for r, orig in pairs],
                    "client": {"ip": "", "name": "localhost", "helo": "", "proto": "LMTP",
                               "role": "alias", "auth": None}}

        def queued(entry):
            log.queued(entry.queue_id, sender, entry.message_size, len(pairs))
            return entry

        return self.spool.commit(writer, envelope).addCallback(queued)


class LMTPHandler:
    # The stores keep LF line ends: the DATA reader converts the body as it
    # arrives (mailsys.smtp.data.LFDataReader), so it is never walked again for it.
    wants_lf = True

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

    def private_extensions(self, proto):
        """XQID: the queue may name its message, so a redelivery is not stored twice."""
        return ("XQID",) if self.mda.delivery_log is not None else ()

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
        local, remote, problems = targets
        for problem in problems:
            log.warn(f"{txn.queue_id}: warning: alias expansion of <{rcpt}>: {problem}",
                     qid=txn.queue_id, rcpt=str(rcpt), problem=problem)
        self._targets.append((str(rcpt), local, remote))
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
        message = Body(self._chunks, size)
        self._chunks = None
        targets, self._targets = self._targets, []
        sender = str(txn.sender) if txn.sender else ""
        arrival = time.time()
        local = [(rcpt, accounts) for rcpt, accounts, _ in targets if accounts]
        pairs = [(r, rcpt) for rcpt, _, remote in targets for r in remote]
        params = txn.params
        stored = (self.mda.batcher.submit(local, message, sender, qid=params.xqid,
                                          redelivery=params.redelivery)
                  if local else defer.succeed([]))
        if pairs:
            relayed = self.mda.relay(sender, pairs, _to_crlf(bytes(message))).addCallbacks(
                lambda entry: Delivered(Reply(250, "2.0.0", ALIAS_QUEUED_TEXT.format(qid=entry.queue_id))),
                lambda f: TempFail(Reply(451, "4.3.0", "Could not queue the copy for an alias's "
                                                       "remote targets")))
            d = defer.gatherResults([stored, relayed])
        else:
            d = stored.addCallback(lambda results: [results])

        def merge(results):
            by_rcpt = dict(zip((rcpt for rcpt, _ in local), results[0]))
            relayed = results[1] if pairs else None
            outcomes = []
            for rcpt, _, remote in targets:
                parts = ([by_rcpt[rcpt]] if rcpt in by_rcpt else []) + ([relayed] if remote else [])
                outcomes.append(_worst(parts))
            return outcomes

        d.addCallback(merge)

        def done(outcomes):
            replies = []
            delay = time.time() - arrival
            for (rcpt, accounts, remote), outcome in zip(targets, outcomes):
                if outcome.delivered and len(accounts) + len(remote) > 1:
                    # RFC 3461 6.2.7.3: an alias of several addresses is reported
                    # (NOTIFY=SUCCESS) as "expanded"; the courier reads it from here.
                    text = EXPANDED_TEXT.format(n=len(accounts) + len(remote))
                    if outcome.reply.text == ALREADY.text:     # a redelivery found it done
                        text += ", already delivered"
                    outcome = Delivered(outcome.reply.with_text(text))
                # The contract's words (sent|deferred|bounced): a permanent refusal
                # is a bounce for the client, which returns the mail (our queue
                # keeps a full mailbox's for a retry and logs it deferred).
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


def _to_crlf(message):
    """The spool keeps messages as received, CRLF; ours arrived converted to LF
    (and with no bare CR or LF, which were refused), so this is exact."""
    return message.replace(b"\n", b"\r\n")


class DeliveryBatcher:
    """Runs the deliveries of every message that finished DATA at about the same
    time as one batch on a dedicated thread, so the stores can make them durable
    together (mailsys.mda.durable).  Like the spool's group commit: while one batch
    is being written, the next one gathers."""

    def __init__(self, reactor, stores, run=None, log=None):
        self.reactor = reactor
        self.stores = stores
        self.log = log
        self._pending = []
        self._running = False
        self._pool = None
        self._run = run or self._in_thread
        self.in_flight = 0      # deliveries submitted and not yet answered
        self.on_load = None     # called with in_flight as it changes (mailsys.steering)

    def _in_thread(self, f, *args):
        if self._pool is None:
            self._pool = Offload(self.reactor, "mailsys-mda")
            self.reactor.addSystemEventTrigger("after", "shutdown", self._pool.stop)
        return self._pool.run(f, *args)

    def submit(self, targets, message, sender, qid=None, redelivery=False):
        d = defer.Deferred()
        self.in_flight += 1
        if self.on_load is not None:
            self.on_load(self.in_flight)
        self._pending.append((targets, message, sender, (qid, redelivery), d))
        if not self._running:
            self._start()
        return d

    def _start(self):
        batch, self._pending = self._pending, []
        self._running = True
        jobs = [(t, m, s) + mark for t, m, s, mark, _ in batch]
        d = self._run(deliver_batch, self.stores, jobs, self.log)
        d.addBoth(self._done, batch)

    def _done(self, result, batch):
        self._running = False
        self.in_flight -= len(batch)
        if self.on_load is not None:
            self.on_load(self.in_flight)
        for i, (targets, _, _, _, d) in enumerate(batch):
            if isinstance(result, list):
                d.callback(result[i])
            else:   # a bug in the batch: temporary failure for all, never "delivered"
                fail = TempFail(Reply(451, "4.3.0", "Local delivery error"))
                d.callback([fail for _ in targets])
        if self._pending:
            self._start()


def deliver_batch(stores, jobs, log=None):
    """Worker thread: every job's mailboxes; per job, one Outcome per recipient.

    A job is ``(targets, message, sender[, qid, redelivery])``, the message
    with LF line ends (as the stores keep it).  With a queue id
    and a delivery ``log`` every copy is recorded (by the store, before it is
    visible); on a redelivery a mailbox the log and the store agree already
    holds the message gets no second copy."""
    when = time.time()
    per_store = {}      # kind -> [(job, rcpt, slot)], items, keys
    results = []        # per job: per recipient: list of Outcomes (filled below)
    shared = []         # (slots, k, source slots, source k): a mailbox already in this job
    for j, job in enumerate(jobs):
        targets, message, sender = job[:3]
        qid, redelivery = (job[3], job[4]) if len(job) > 3 and log is not None else (None, False)
        seen_loop = delivered_to(message.head(65536) if isinstance(message, Body) else message[:65536])
        results.append([])
        placed = {}     # (kind, location) -> where its outcome will be, in this job
        for r, (rcpt, accounts) in enumerate(targets):
            slots = results[j].append([]) or results[j][r]
            for account, kind, quota, location in accounts:
                if account.lower() in seen_loop:
                    slots.append(PermFail(LOOP))
                    continue
                if (kind, location) in placed:
                    # The same mailbox through another RCPT (a repeat, an alias): one copy.
                    slots.append(None)
                    shared.append((slots, len(slots) - 1) + placed[(kind, location)])
                    continue
                if redelivery and _holds(stores[kind], log, qid, location):
                    slots.append(Delivered(ALREADY))
                    placed[(kind, location)] = (slots, len(slots) - 1)
                    continue
                prefix = f"Return-Path: <{sender}>\nDelivered-To: {account}\n".encode("utf-8")
                slots.append(None)
                placed[(kind, location)] = (slots, len(slots) - 1)
                refs, items, keys = per_store.setdefault(kind, ([], [], []))
                refs.append((slots, len(slots) - 1))
                items.append((location, prefix, message, quota, sender or "MAILER-DAEMON", when))
                keys.append((qid, rcpt) if qid else None)
    for kind, (refs, items, keys) in per_store.items():
        try:
            if any(keys):
                outcomes = stores[kind].deliver_many(items, log=log, keys=keys)
            else:
                outcomes = stores[kind].deliver_many(items)
        except Exception as e:  # a bug must not turn into "delivered"
            outcomes = [TempFail(Reply(451, "4.3.0", f"Local delivery error: {type(e).__name__}"))] * len(items)
        for (slots, k), outcome in zip(refs, outcomes):
            slots[k] = outcome
    for slots, k, source, sk in shared:
        slots[k] = source[sk]
    return [[_worst(slots) for slots in per_rcpt] for per_rcpt in results]


def _holds(store, log, qid, location):
    """True when the delivery log names a copy of ``qid`` in ``location`` and the
    store confirms it is there (a record alone is not enough: the copy may have
    failed after the record was written, or been deleted since)."""
    holds = getattr(store, "holds", None)
    try:
        where = log.find(qid, location)
        return where is not None and holds is not None and bool(holds(location, where))
    except (OSError, ValueError, TypeError):
        return False    # deliver: a possible duplicate, never a loss


def _refusal(expansion):
    """The reply for a recipient that stands for no mailbox: an unknown address,
    or an alias none of whose targets works, with the first problem in the text
    so that the report to the sender (and the log) says which."""
    if not expansion.errors or not (expansion.missing or expansion.looped):
        return UNKNOWN       # the address itself is nobody: no alias to explain
    more = len(expansion.errors) - 1
    detail = expansion.errors[0] + (f" (and {more} more)" if more else "")
    if expansion.missing:
        return Reply(550, "5.1.1", f"{UNKNOWN.text}: {detail}")
    return Reply(554, "5.4.6", detail[:1].upper() + detail[1:])


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
        # A TCP peer as the other listeners name it (an IPv4-mapped address
        # as plain IPv4); a unix socket peer by its path, if it has one.
        peer = (client_address(getattr(addr, "host", None))[1] or getattr(addr, "name", None)
                or "local")
        if isinstance(peer, bytes):
            peer = peer.decode("utf-8", "replace")
        handler = LMTPHandler(self.mda, str(peer))
        proto = SMTPServerProtocol(handler, self.hostname, limits=self.limits, clock=self.clock,
                                   lmtp=True, chunking=True)
        proto.factory = self
        return proto
