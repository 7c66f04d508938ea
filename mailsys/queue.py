"""The queue manager: from spool to mailbox, with retries and delivery reports.

A Service with an injected clock, running in worker 0.  It learns of every
message the moment it is spooled (its own spool's commit hook, and the other
workers' notifications), so there is no polling delay.  Recipients are grouped
by next hop: local domains go over LMTP to our own MDA (``listen.lmtp``), the
rest to the remote courier (mailsys.couriers.remote; without one they stay
deferred with a clear reason).  Every courier answers per recipient with the
one delivery contract (mailsys.delivery): Delivered, TempFail or PermFail.

Each final result is written to the journal (mailsys.journal) and made durable
*before* the queue moves on, so a crash re-sends nothing recorded as delivered
and forgets no recipient (a deferral rides along with the next write: losing
it costs only an earlier retry); the only window for a duplicate is a crash
between the MDA's own fsync and ours, as in every MTA.  Temporary failures are
retried with exponential backoff (``queue.retry_min`` doubling up to
``retry_max``, with jitter) until ``queue.lifetime``; then, and on permanent
failures, the sender gets an RFC 3464 report (mailsys.dsn), itself queued like
any message from ``<>``.  A message from ``<>`` is never bounced.
"""
import os
import random
import re
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailsys.delivery import DELIVERED, PASSED_ON, TempFail
from mailsys.logs import MailLog
from mailsys.smtp.reply import Reply
from mailsys.spool import SegmentReaper

log = MailLog("mailsys.queue")
_tlog = Logger(namespace="mailsys.queue")

FINAL = ("sent", "failed")
NO_REMOTE = Reply(451, "4.4.1", "Remote delivery is not available in this version; "
                                "the message stays queued")
NO_LMTP = Reply(451, "4.3.5", "No LMTP listener is configured (listen.lmtp is empty)")
EXPIRED_STATUS = "4.4.7"
# A deferred message whose segment is closed and has at most this share of its
# messages still queued is copied into worker 0's current segment, so that the
# rest of the file can go (see _copy_forward).
COPY_FORWARD_SHARE = 0.25
POSTMASTER_ROLE = "postmaster-notice"   # envelope client role of a double-bounce notice
TOO_MANY_RECIPIENTS = "4.5.3"           # RFC 3463: too many recipients (in this transaction)


class Recipient:
    __slots__ = ("index", "addr", "state", "error", "notify", "orcpt", "when", "status", "mta",
                 "reported", "action", "local")

    def __init__(self, index, spec):
        self.index = index
        self.addr = spec["rcpt"]
        self.state = "queued"
        self.error = None
        self.notify = spec.get("notify")
        self.orcpt = tuple(spec["orcpt"]) if spec.get("orcpt") else None
        self.when = None
        self.status = None
        self.mta = None          # host name of the remote MTA that last answered
        self.reported = False    # its failure already went back to the sender
        # Once sent: the success notice's Action (mailsys.delivery), or PASSED_ON
        # when the next hop took the NOTIFY request and reports itself.
        self.action = DELIVERED
        # Its error is one mailsys made up (no server said it): the report's
        # Diagnostic-Code is "X-Mailsys;", not "smtp;" (_diagnostic_of).
        self.local = False

    @property
    def domain(self):
        return self.addr.rpartition("@")[2].lower() if "@" in self.addr else ""


class Message:
    __slots__ = ("qid", "entry", "envelope", "rcpts", "arrival", "attempts", "next_attempt",
                 "warned", "active", "timer", "redelivery", "held", "finals")

    def __init__(self, entry):
        self.qid = entry.queue_id
        self.entry = entry
        self.envelope = entry.envelope
        self.rcpts = [Recipient(i, r) for i, r in enumerate(entry.envelope.get("recipients", []))]
        self.arrival = float(entry.envelope.get("arrival", time.time()))
        self.attempts = 0
        self.next_attempt = 0.0
        self.warned = False
        self.active = False
        self.timer = None
        # Recovered at start-up: a delivery may have completed just before the
        # crash without our record of it; the courier asks the MDA to check.
        self.redelivery = False
        self.held = False        # `mailsys queue hold`: no attempt until released
        self.finals = 0          # recipients done before the current attempt

    @property
    def sender(self):
        return self.envelope.get("sender", "")

    def due(self):
        return [r for r in self.rcpts if r.state not in FINAL]


class QueueManager(service.Service):
    def __init__(self, *, config, spool, journal, clock, lmtp=None, remote=None, local_domains=(),
                 hostname="localhost", rng=random.random, max_active=100):
        self.config = config
        self.spool = spool
        self.journal = journal
        self.clock = clock
        self.lmtp = lmtp
        self.remote = remote
        self.local_domains = frozenset(local_domains)
        self.hostname = hostname
        self.rng = rng
        self.max_active = max_active
        self.messages = {}
        self.reaper = SegmentReaper()
        self._copying = set()     # queue ids being copied forward (_copy_forward)
        self._active = 0
        self._waiting = []
        self.running = False

    # -- loading and compaction ------------------------------------------------------

    def load(self, entries, records):
        """Rebuild the queue from the spool's messages and the journal's records.
        Returns the records that describe the live queue (for compaction) and the
        set of queue ids that are finished."""
        by_id = {}
        for e in entries:
            if e.queue_id:
                by_id[e.queue_id] = e
        state = {}
        done = set()
        for rec in records:
            qid = rec.get("id")
            if qid is None:
                continue
            if rec.get("done"):
                done.add(qid)
                state.pop(qid, None)
                continue
            state.setdefault(qid, []).append(rec)
        live = []
        for qid, entry in by_id.items():
            if qid in done:
                continue
            msg = Message(entry)
            msg.redelivery = True
            for rec in state.get(qid, ()):
                self._apply_record(msg, rec)
            # A message whose recipients are all final but that was not marked done
            # (a crash in between) is finished at its first attempt: its reports go
            # out then, at worst a second time, never not at all.
            self.messages[qid] = msg
            self.reaper.track(entry.segment, qid)
            live.extend(state.get(qid, ()))
        # Every segment found at start-up is closed (each worker writes a new one
        # from now on), and the scan saw every message in it.  Those with nothing
        # queued are open_queue's to delete, now.
        in_segment = {}
        for e in entries:
            in_segment[e.segment] = in_segment.get(e.segment, 0) + 1
        for segment in {m.entry.segment for m in self.messages.values()}:
            self.reaper.close(segment, self.reaper.seen(segment), total=in_segment.get(segment))
        return live, done

    def snapshot(self):
        """The queue now, as journal records: what :meth:`load` needs to rebuild
        each queued message, and a done mark for every finished message whose
        segment is still on disk.  The journal is compacted to this while the
        server runs (mailsys.journal); every record sets a value, so the records
        appended after it replay on top of it to the same state."""
        out = []
        for msg in self.messages.values():
            qid = msg.qid
            reported = []
            for r in msg.rcpts:
                if r.reported:
                    reported.append(r.index)
                if r.state == "queued":
                    continue
                rec = {"id": qid, "r": r.index, "s": r.state, "e": r.error, "t": r.when,
                       "dsn": r.status}
                if r.mta:
                    rec["mta"] = r.mta
                if r.action != DELIVERED:
                    rec["a"] = r.action
                if r.local:
                    rec["local"] = True
                out.append(rec)
            if reported:
                out.append({"id": qid, "reported": reported})
            if msg.attempts or msg.next_attempt:
                out.append({"id": qid, "next": msg.next_attempt, "attempts": msg.attempts})
            if msg.warned:
                out.append({"id": qid, "warned": True})
            if msg.held:
                out.append({"id": qid, "hold": True})
        out.extend({"id": qid, "done": True} for qid in self.reaper.done_marks()
                   if qid not in self.messages)
        return out

    def _apply_record(self, msg, rec):
        if "r" in rec and 0 <= rec["r"] < len(msg.rcpts):
            r = msg.rcpts[rec["r"]]
            r.state = rec.get("s", r.state)
            r.error = rec.get("e")
            r.when = rec.get("t")
            r.status = rec.get("dsn")
            r.mta = rec.get("mta")
            r.action = rec.get("a", DELIVERED)
            r.local = bool(rec.get("local"))
        if "next" in rec:
            msg.next_attempt = rec["next"]
            msg.attempts = rec.get("attempts", msg.attempts)
        if rec.get("warned"):
            msg.warned = True
        if "hold" in rec:
            msg.held = bool(rec["hold"])
        for i in rec.get("reported", ()):
            if 0 <= i < len(msg.rcpts):
                msg.rcpts[i].reported = True

    # -- service ---------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.running = True
        now = self.clock.seconds()
        for msg in list(self.messages.values()):
            if not msg.held:
                self._schedule(msg, max(now, msg.next_attempt))
        if self.messages:
            log.info(f"queue: {len(self.messages)} messages to deliver", count=len(self.messages))

    def stopService(self):
        self.running = False
        for msg in self.messages.values():
            if msg.timer is not None and msg.timer.active():
                msg.timer.cancel()
        return super().stopService()

    def add(self, entry):
        """A message has just been spooled (durably): deliver it now."""
        if not entry.queue_id or entry.queue_id in self.messages:
            return
        msg = Message(entry)
        self.messages[msg.qid] = msg
        self.reaper.track(entry.segment, msg.qid)
        if self.running:
            self._schedule(msg, self.clock.seconds())

    def add_at(self, segment, offset):
        """Another worker spooled a message: read it from its segment and queue it."""
        from mailsys.spool import read_entry

        entry = read_entry(segment, offset)
        if entry is None:
            _tlog.error("queue: no intact record at {segment}:{offset}", segment=segment, offset=offset)
            return
        self.add(entry)

    def segment_closed(self, segment, committed):
        """A spool writer left ``segment`` after committing ``committed`` messages
        to it (mailsys.spool.Spool.on_close; another worker's through its pipe)."""
        self.reaper.close(segment, committed)

    def _schedule(self, msg, when):
        if msg.timer is not None and msg.timer.active():
            msg.timer.cancel()
        msg.timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._attempt, msg)

    # -- delivery --------------------------------------------------------------------

    def _attempt(self, msg):
        msg.timer = None
        if not self.running or msg.active or msg.held or msg.qid not in self.messages:
            return
        if self._active >= self.max_active:
            self._waiting.append(msg)
            return
        msg.active = True
        self._active += 1
        d = defer.maybeDeferred(self._deliver, msg)
        d.addErrback(self._attempt_failed, msg)
        d.addBoth(self._attempted, msg)

    def _attempt_failed(self, failure, msg):
        """A bug or a journal failure: log it and try the message again later, so
        it is never left without a next attempt."""
        _tlog.failure("queue: delivery attempt for {qid} failed", failure, qid=msg.qid)
        if self.running and msg.qid in self.messages and msg.timer is None and not msg.held:
            self._schedule(msg, self.clock.seconds() + self.config.queue.retry_min)

    def _attempted(self, _, msg):
        msg.active = False
        self._active -= 1
        while self._waiting and self._active < self.max_active:
            self._attempt(self._waiting.pop(0))

    # The path every message takes (deliver, record, settle, finish) is written
    # with plain callbacks, not inlineCallbacks: a generator and its Deferred
    # bookkeeping at each of those steps were a tenth of worker 0's work in
    # profiles of end-to-end delivery (bench/e2e.py).  The rare branches
    # (expiry, retries, reports) stay generators.

    def _deliver(self, msg):
        due = msg.due()
        msg.finals = len(msg.rcpts) - len(due)
        local = [r for r in due if r.domain in self.local_domains or r.domain == ""]
        remote = [r for r in due if r not in local] if len(local) < len(due) else []
        if local and remote:
            d = defer.gatherResults([self._via(msg, local, self.lmtp, NO_LMTP, "lmtp"),
                                     self._via(msg, remote, self.remote, NO_REMOTE, "remote")],
                                    consumeErrors=True)
        elif local:
            d = self._via(msg, local, self.lmtp, NO_LMTP, "lmtp")
        elif remote:
            d = self._via(msg, remote, self.remote, NO_REMOTE, "remote")
        else:
            return self._settle(msg)
        return d.addCallback(lambda _: self._settle(msg))

    @defer.inlineCallbacks
    def _expire(self, msg, due):
        now = self.clock.seconds()
        reply = Reply(451, EXPIRED_STATUS, "Delivery time expired")
        for r in due:
            # The report's Diagnostic-Code is the last attempt's reply as it was
            # (RFC 3464 2.3.6); how long we tried is the log's and the text's.
            last = r.error or "no delivery attempt succeeded"
            yield self._record(msg, r, "failed", last, status=EXPIRED_STATUS, relay="none",
                               reply=reply.with_text(f"Delivery time expired after "
                                                     f"{int(now - msg.arrival)} s"),
                               local=r.local or r.error is None, when=r.when)
        yield self._settle(msg)

    def _via(self, msg, rcpts, courier, missing, relay):
        """Hand ``rcpts`` to ``courier``; the Deferred fires once every one's
        result is journaled (durably, unless deferred)."""
        started = self.clock.seconds()
        if courier is None:
            return self._results([TempFail(missing) for _ in rcpts], msg, rcpts, courier, relay, started)
        message = msg.entry.read_message()
        params = msg.envelope.get("params", {})
        pairs = [(r.addr, _rcpt_options(r)) for r in rcpts]
        try:
            d = courier.deliver(msg.sender, pairs, message, params, qid=msg.qid, redelivery=msg.redelivery)
        except Exception:
            d = defer.fail()

        def courier_bug(failure):      # a temporary failure, never success
            failure.trap(Exception)
            return [TempFail(Reply(451, "4.3.0", f"Delivery error: {failure.type.__name__}"))
                    for _ in rcpts]

        d.addErrback(courier_bug)
        return d.addCallback(self._results, msg, rcpts, courier, relay, started)

    def _results(self, outcomes, msg, rcpts, courier, relay, started):
        delay = self.clock.seconds() - msg.arrival
        waits = []
        for r, outcome in zip(rcpts, outcomes):
            status = None
            if outcome.permanent and (outcome.reply.status or "").endswith(".2.2"):
                # Mailbox full: RFC 3463 calls x.2.2 a persistent *transient* failure,
                # and RFC 5321 4.5.3.1.10 asks clients to take a 552 as temporary;
                # the owner may make room, so retry until queue.lifetime.  The log
                # and the report's Status say 4.2.2, as for any deferral (Postfix
                # does the same); the server's own reply stays as it said it.
                outcome = TempFail(outcome.reply, outcome.relay)
            if (not outcome.delivered and not outcome.permanent
                    and (outcome.reply.status or "").startswith("5")):
                # A deferral says 4.x.x whatever the server's reply (kept as it
                # is for the report's Diagnostic-Code): a full mailbox, a server
                # that greets with 5xx and is skipped.
                status = "4" + outcome.reply.status[1:]
            state = "sent" if outcome.delivered else ("failed" if outcome.permanent else "deferred")
            where = getattr(outcome, "relay", None)
            r.mta = where.partition("[")[0] if where else None
            r.action = getattr(outcome, "action", DELIVERED) if outcome.delivered else DELIVERED
            # Appended in order, waited for together: the journal writes them in
            # one batch instead of one fdatasync after another.
            waits.append(self._record(msg, r, state, str(outcome.reply),
                                      relay=where or getattr(courier, "name", relay),
                                      delay=delay, reply=outcome.reply, started=started,
                                      local=not outcome.from_peer, status=status))
        if len(waits) == 1:
            return waits[0]
        return defer.gatherResults(waits, consumeErrors=True)

    def _record(self, msg, r, state, error, *, relay, reply, status=None, delay=None, started=None,
                local=False, when=None):
        """Journal one recipient's result; the Deferred fires once it is durable.
        ``local``: ``error`` is a reply mailsys made up, not one a server sent.
        ``when``: the time of the attempt it is the result of (default: now)."""
        status = status or reply.status or ("2.0.0" if state == "sent" else
                                            "5.0.0" if state == "failed" else "4.0.0")
        r.state, r.error, r.status = state, error, status
        r.when = when if when is not None else self.clock.seconds()
        r.local = local and state != "sent"
        shown = {"sent": "sent", "failed": "bounced", "deferred": "deferred"}[state]
        delay = self.clock.seconds() - msg.arrival if delay is None else delay
        log.info(f"{msg.qid}: to=<{r.addr}>, relay={relay}, delay={delay:.2f}, dsn={status}, "
                 f"status={shown} ({reply.text if reply else error})",
                 qid=msg.qid, rcpt=r.addr, status=shown, dsn=status)
        rec = {"id": msg.qid, "r": r.index, "s": state, "e": error, "t": r.when, "dsn": status}
        if r.mta:
            rec["mta"] = r.mta
        if state == "sent" and r.action != DELIVERED:
            rec["a"] = r.action     # a restart must not send (or mislabel) its success notice
        if r.local:
            rec["local"] = True     # the report after a restart says X-Mailsys too
        return self.journal.append(rec, durable=state != "deferred")

    def _settle(self, msg):
        if msg.qid not in self.messages:      # deleted by the administrator meanwhile
            self.reaper.done(msg.entry.segment, msg.qid)
            return None
        due = msg.due()
        if not due:
            return self._finish(msg)
        cfg = self.config.queue
        if cfg.lifetime and self.clock.seconds() - msg.arrival >= cfg.lifetime:
            # Past queue.lifetime, after the attempt that was due then (as
            # Postfix's queue manager gives up only when an attempt fails):
            # the recipients still deferred fail now.
            return self._expire(msg, due)
        return self._retry_later(msg, due)

    @defer.inlineCallbacks
    def _retry_later(self, msg, due):
        now = self.clock.seconds()
        # Recipients that failed for good are reported now, not when the last
        # deferred one is settled days later (Postfix does the same).
        failed = [r for r in msg.rcpts if r.state == "failed" and not r.reported]
        if failed:
            yield self._report(msg, "failure", failed)
            for r in failed:
                r.reported = True
            yield self.journal.append({"id": msg.qid, "reported": [r.index for r in failed]})
        cfg = self.config.queue
        if (len(msg.rcpts) - len(due) > msg.finals
                and any(r.status == TOO_MANY_RECIPIENTS for r in due)):
            # The server took some recipients and said "452 4.5.3 too many
            # recipients" to the rest: RFC 5321 4.5.3.1.10 has the client send
            # them in another transaction, at once (as Postfix does), not after
            # a backoff.  Each such attempt settles some recipients, so this ends.
            nxt = now
        else:
            msg.attempts += 1
            backoff = min(cfg.retry_min * 2 ** (msg.attempts - 1), cfg.retry_max)
            backoff *= 0.9 + 0.2 * self.rng()            # jitter: spread retries of a burst
            nxt = now + backoff
        if cfg.lifetime:
            nxt = min(nxt, msg.arrival + cfg.lifetime)
        msg.next_attempt = nxt
        schedule = {"id": msg.qid, "next": nxt, "attempts": msg.attempts}
        if cfg.warn_after and not msg.warned and now - msg.arrival >= cfg.warn_after:
            msg.warned = True
            yield self._report(msg, "delay", due)
            # Durable: a warning is sent once, not again after a restart.
            yield self.journal.append(schedule, {"id": msg.qid, "warned": True})
        else:
            yield self.journal.append(schedule, durable=False)
        if not msg.held and msg.qid in self.messages:
            self._schedule(msg, nxt)
            self._copy_forward(msg)

    def _copy_forward(self, msg):
        """Copy a deferred message into this process's current spool segment
        when it is one of the few still queued from a closed segment.

        Why: a segment goes only when every message in it is done, so one
        message deferred for days would keep up to 128 MiB of finished mail on
        disk with it.  The copy is an ordinary spool commit under the same
        queue id (same envelope, same bytes, fsynced); only then does the
        message point at it and let go of the old segment.  The journal needs
        no record: its records are keyed by queue id.  A crash in between
        leaves two copies of one queue id, and start-up takes one of them.  A
        segment that is still mostly queued (an outage) is left alone: copying
        would only double the writes."""
        old = msg.entry
        if (msg.qid in self._copying or self.spool is None
                or not self.reaper.stranded(old.segment, COPY_FORWARD_SHARE)):
            return
        try:
            data = old.read_message()
        except OSError as e:
            _tlog.error("{qid}: cannot copy forward from {segment}: {error}", qid=msg.qid,
                        segment=old.segment, error=e.strerror)
            return
        writer = self.spool.new_message(msg.qid)
        try:
            writer.write(data)
        except OSError as e:     # spilling a large one to spool/incoming failed
            writer.discard()
            _tlog.error("{qid}: cannot copy forward: {error}", qid=msg.qid, error=e.strerror)
            return
        self._copying.add(msg.qid)
        d = self.spool.commit(writer, old.envelope, notify=False)

        def moved(new):
            self._copying.discard(msg.qid)
            self.reaper.track(new.segment, msg.qid)
            if self.messages.get(msg.qid) is not msg:     # finished or deleted meanwhile
                self.reaper.done(new.segment, msg.qid)
                return
            msg.entry = new
            self.reaper.done(old.segment, msg.qid)
            log.info(f"{msg.qid}: copied forward from {os.path.basename(old.segment)} "
                     f"to {os.path.basename(new.segment)}", qid=msg.qid)

        def failed(f):
            self._copying.discard(msg.qid)
            _tlog.error("{qid}: cannot copy forward: {error}", qid=msg.qid, error=f.getErrorMessage())

        d.addCallbacks(moved, failed)

    def _finish(self, msg):
        failed = [r for r in msg.rcpts if r.state == "failed" and not r.reported]
        # A next hop that offers DSN reports success itself (RFC 3461 5.2).
        sent = [r for r in msg.rcpts if r.state == "sent" and r.action is not PASSED_ON]
        d = self._report(msg, "failure", failed) if failed else defer.succeed(False)
        if sent:
            d.addCallback(lambda reported: self._report(msg, "success", sent).addCallback(
                lambda also: also or reported))
        # "done" needs its own fdatasync only when a report went out: without
        # it, a crash that loses the record makes the restarted queue finish
        # the message again (load() above), and finishing a message that needs
        # no report has no effect but a second "removed" line.  Every
        # recipient's "sent" is durable already; this saves a journal flush
        # per message.
        d.addCallback(lambda reported: self.journal.append({"id": msg.qid, "done": True},
                                                           durable=reported))
        return d.addCallback(self._removed, msg)

    def _removed(self, _, msg):
        self.messages.pop(msg.qid, None)
        log.info(f"{msg.qid}: removed", qid=msg.qid)
        # Every recipient's final state is durable by now (even when "done" is
        # not): its segment may go once nothing else in it is queued.
        self.reaper.done(msg.entry.segment, msg.qid)

    # -- operator commands (mailsys.control) ---------------------------------------

    def describe(self, msg):
        """What `mailsys queue list --json` shows of one message: the truth of
        each recipient's state and last error, as journaled."""
        return {
            "id": msg.qid,
            "arrival": msg.arrival,
            "size": msg.entry.message_size,
            "sender": msg.sender,
            "state": "held" if msg.held else ("active" if msg.active else
                                              "deferred" if msg.attempts else "queued"),
            "attempts": msg.attempts,
            "next_attempt": None if msg.held else (msg.next_attempt or None),
            "recipients": [{"address": r.addr, "state": r.state, "error": r.error,
                            "dsn": r.status, "last_attempt": r.when} for r in msg.rcpts],
        }

    def list(self):
        return [self.describe(m) for m in sorted(self.messages.values(), key=lambda m: (m.arrival, m.qid))]

    def find(self, qid):
        """The messages ``qid`` names: one, or every one for ``ALL`` (as postsuper)."""
        if qid == "ALL":
            return list(self.messages.values())
        msg = self.messages.get(qid)
        return [msg] if msg is not None else []

    def flush(self, domain=None):
        """Attempt now every message not held (with a recipient due in
        ``domain`` or below it, when given): ``mailsys queue flush``, ETRN.
        Returns how many messages were scheduled.

        The remote courier first forgets that the destinations involved are
        down (all of them, or those of ``domain``'s mail), or the attempt
        would be deferred again unseen; Postfix's ``postqueue -f`` does the
        same."""
        if domain is not None:
            domain = domain.lower().rstrip(".")
        picked = []
        domains = None if domain is None else {domain}
        for msg in list(self.messages.values()):
            if msg.held or msg.active:
                continue
            if domain is not None:
                mine = {r.domain for r in msg.due()
                        if r.domain == domain or r.domain.endswith("." + domain)}
                if not mine:
                    continue
                domains |= mine
            picked.append(msg)
        forget = getattr(self.remote, "forget_dead", None)    # only the remote courier keeps them
        if forget is not None:
            forget(domains)
        now = self.clock.seconds()
        for msg in picked:
            msg.next_attempt = now
            if self.running:
                self._schedule(msg, now)
        n = len(picked)
        log.info(f"flush: {n} message(s) scheduled" + (f" for {domain}" if domain else ""),
                 domain=domain, count=n)
        return n

    @defer.inlineCallbacks
    def hold(self, qid):
        msgs = [m for m in self.find(qid) if not m.held]
        for msg in msgs:
            msg.held = True
            if msg.timer is not None and msg.timer.active():
                msg.timer.cancel()
            msg.timer = None
        if msgs:
            yield self.journal.append(*({"id": m.qid, "hold": True} for m in msgs))
        for msg in msgs:
            log.info(f"{msg.qid}: placed on hold", qid=msg.qid)
        return [m.qid for m in msgs]

    @defer.inlineCallbacks
    def release(self, qid):
        msgs = [m for m in self.find(qid) if m.held]
        for msg in msgs:
            msg.held = False
        if msgs:
            yield self.journal.append(*({"id": m.qid, "hold": False} for m in msgs))
        now = self.clock.seconds()
        for msg in msgs:
            log.info(f"{msg.qid}: released from hold", qid=msg.qid)
            if self.running and not msg.active:
                self._schedule(msg, now)
        return [m.qid for m in msgs]

    @defer.inlineCallbacks
    def delete(self, qid):
        """Drop messages without a report to anyone (as ``postsuper -d``).  One
        being delivered right now finishes its attempt first: the recipients it
        reaches stay reached; then it is gone."""
        msgs = self.find(qid)
        for msg in msgs:
            self.messages.pop(msg.qid, None)
            if msg.timer is not None and msg.timer.active():
                msg.timer.cancel()
            msg.timer = None
        for msg in msgs:
            # Its done mark must survive a compaction of the journal even while
            # a delivery still reads its segment.
            self.reaper.finished(msg.entry.segment, msg.qid)
        if msgs:
            yield self.journal.append(*({"id": m.qid, "done": True} for m in msgs))
        for msg in msgs:
            log.info(f"{msg.qid}: removed (deleted by the administrator)", qid=msg.qid)
            if not msg.active:     # one being delivered still reads its segment
                self.reaper.done(msg.entry.segment, msg.qid)
        return [m.qid for m in msgs]

    def _report(self, msg, kind, rcpts):
        """Queue an RFC 3464 report to the sender; never for a message from <>.

        An undeliverable message from <> (a bounce that bounced, say) goes to
        the postmaster instead, once, as Postfix's double-bounce notice does;
        that notice is itself from <> and marked, so it never causes another.

        The Deferred fires with True once a report is queued, False when none
        was due."""
        from mailsys import dsn

        if dsn.never_bounce(msg.envelope):
            if kind != "failure":
                return defer.succeed(False)
            log.info(f"{msg.qid}: undeliverable message from <> not returned "
                     f"({len(rcpts)} recipient(s) failed)", qid=msg.qid)
            if msg.envelope.get("client", {}).get("role") == POSTMASTER_ROLE:
                return defer.succeed(False)
            if self._on_the_way_to_postmaster(rcpts):
                # The notice would take the path that just failed (a postmaster
                # alias leading to an address that refuses mail): one more
                # notice, one more failure, for ever.  The log says it instead.
                log.warn(f"{msg.qid}: postmaster notification not sent: the message failed "
                         f"on its way to <{self.postmaster}>; check the postmaster alias",
                         qid=msg.qid)
                return defer.succeed(False)
            return self._queue_report(msg, kind, rcpts, to=self.postmaster, role=POSTMASTER_ROLE)
        specs = msg.envelope.get("recipients", [])
        wanted = [r for r in rcpts if dsn.wants(specs[r.index], kind)]
        if not wanted:
            return defer.succeed(False)
        return self._queue_report(msg, kind, wanted)

    def _on_the_way_to_postmaster(self, rcpts):
        """Whether a failed recipient is the postmaster's address, or a copy our
        MDA made for it (an alias target, ORCPT naming the address): a copy of
        a postmaster notice whose alias leads elsewhere loses the notice's
        role on the way, so the role alone cannot stop that loop."""
        postmaster = self.postmaster.lower()
        for r in rcpts:
            if r.addr.lower() == postmaster:
                return True
            if r.orcpt and r.orcpt[0].lower() == "rfc822" and r.orcpt[1].lower() == postmaster:
                return True
        return False

    @property
    def postmaster(self):
        domains = self.config.domains.local
        return f"postmaster@{domains[0] if domains else self.hostname}"

    def _queue_report(self, msg, kind, rcpts, *, to=None, role="dsn"):
        from mailsys import dsn

        statuses = [dsn.RecipientStatus(
            rcpt=r.addr,
            action={"failure": "failed", "delay": "delayed", "success": r.action}[kind],
            status=_status_of(r, kind),
            diagnostic=_diagnostic_of(r) if kind != "success" else None,
            remote_mta=r.mta, orcpt=r.orcpt, last_attempt=r.when,
            will_retry_until=msg.arrival + self.config.queue.lifetime if kind == "delay" else None)
            for r in rcpts]
        envelope = msg.envelope
        if role == POSTMASTER_ROLE:
            # The postmaster learns what failed and its headers, not the text of
            # somebody else's message (docs/dsn.rst).
            envelope = dict(envelope, params=dict(envelope.get("params") or {}, ret="HDRS"))
        report = dsn.make_report(reporting_mta=self.hostname, queue_id=msg.qid, envelope=envelope,
                                 original=msg.entry.read_message(), statuses=statuses, kind=kind,
                                 now=self.clock.seconds(), to=to)
        writer = self.spool.new_message()
        writer.write(report)
        envelope = {"arrival": self.clock.seconds(), "sender": "", "params": dsn.dsn_params(report),
                    "recipients": [{"rcpt": to or msg.sender, "state": "queued", "notify": ["NEVER"]}],
                    "client": {"ip": "", "name": "localhost", "helo": self.hostname, "proto": "DSN",
                               "role": role, "auth": None}}
        d = self.spool.commit(writer, envelope)
        who = "postmaster" if to else "sender"

        def queued(entry):
            log.info(f"{msg.qid}: {who} {kind} notification: {entry.queue_id}",
                     qid=msg.qid, dsn_id=entry.queue_id, kind=kind)
            log.queued(entry.queue_id, "", entry.message_size, 1)
            return True

        return d.addCallback(queued)


def _rcpt_options(r):
    """The DSN requests of a recipient that a next hop offering DSN gets (RFC 3461)."""
    options = {}
    if r.orcpt:
        options["orcpt"] = r.orcpt
    if r.notify:
        options["notify"] = list(r.notify)
    return options


_MADE_UP_CODE = re.compile(r"\d{3} (?:[245]\.\d{1,3}\.\d{1,3} )?")


def _diagnostic_of(r):
    """The Diagnostic-Code of a recipient's last error (RFC 3464 2.3.6): a
    server's reply as ``smtp; CODE X.Y.Z text``; one mailsys made up (no
    server said it: a refused connection, DNS trouble, a destination taken as
    down) as ``X-Mailsys; text``, without the reply code that only stands in
    for it (the Status field has the enhanced code), as Postfix writes
    ``X-Postfix;``."""
    if not r.error or not r.local:
        return r.error
    m = _MADE_UP_CODE.match(r.error)
    return "X-Mailsys; " + (r.error[m.end():] if m else r.error)


def _status_of(r, kind):
    if kind == "success":
        return "2.0.0"
    return r.status or ("5.0.0" if kind == "failure" else "4.0.0")


def open_queue(config, spool, reactor, *, lmtp=None, remote=None):
    """Rebuild the queue at start-up, before anything listens.

    Reads the journal, loads every message the spool holds that is not done,
    deletes segments with nothing left in them (empty or torn ones too, but
    never the one being written), and rewrites the journal with only what is
    still needed: the live state, and ``done`` marks for messages whose segment
    stays.  Returns ``(QueueManager, Journal)``; the journal is open for appends.
    """
    from mailsys.journal import Journal, replay, rewrite

    journal_path = os.path.join(config.server.state_dir, "spool", "queue.jnl")
    journal = Journal(journal_path, reactor)
    queue = QueueManager(config=config, spool=spool, journal=journal, clock=reactor, lmtp=lmtp,
                         remote=remote, local_domains=config.domains.local,
                         hostname=config.server.hostname)
    live, done = queue.load(spool.entries, replay(journal_path))
    # The MDA's delivery logs need only the records of messages still queued
    # (docs/queue.rst, "Exactly once after a crash"); no MDA runs yet.
    from mailsys.mda.dedupe import compact

    compact(os.path.join(config.server.state_dir, "mda"), queue.messages)
    by_segment = {}
    for e in spool.entries:
        by_segment.setdefault(e.segment, []).append(e.queue_id)
    for name in os.listdir(spool.segments):
        segment = os.path.join(spool.segments, name)
        if name.endswith(".seg") and segment not in by_segment and segment != spool.current_segment:
            os.unlink(segment)     # nothing intact in it: an empty or wholly torn segment
    keep_done = []
    for segment, ids in by_segment.items():
        if segment != spool.current_segment and all(q in done for q in ids):
            os.unlink(segment)
        else:
            finished = [q for q in ids if q in done]
            keep_done.extend({"id": q, "done": True} for q in finished)
            queue.reaper.remember_done(segment, finished)
    rewrite(journal_path, keep_done + live)
    spool.entries = []      # the queue has them now; the spool keeps no index
    journal.snapshot = queue.snapshot
    journal.sync_first = (spool.segments,)
    journal.open()
    return queue, journal
