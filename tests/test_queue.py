"""The queue manager on task.Clock: scheduling, backoff, lifetime, reports, restart."""
import email
import email.policy
import os
import re
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from mailsys.delivery import EXPANDED, PASSED_ON, RELAYED, Delivered, PermFail, TempFail
from mailsys.queue import NO_LMTP, NO_REMOTE, QueueManager
from mailsys.smtp.reply import Reply

RETRY_MIN, RETRY_MAX, LIFETIME, WARN = 300, 3600, 86400, 14400


class Entry:
    def __init__(self, qid, sender, rcpts, arrival=0.0, message=b"Subject: t\r\n\r\nbody\r\n"):
        self.queue_id = qid
        self.segment, self.offset = "/seg", 0
        self.envelope = {"id": qid, "arrival": arrival, "sender": sender, "params": {},
                         "recipients": [r if isinstance(r, dict) else {"rcpt": r, "state": "queued"}
                                        for r in rcpts]}
        self._message = message
        self.message_size = len(message)

    def read_message(self):
        return self._message


class Spool:
    """Commits at once; reports land in ``committed``."""

    def __init__(self):
        self.committed = []
        self.n = 0

    def new_message(self):
        self.n += 1
        return SimpleNamespace(queue_id=f"DSN{self.n}", chunks=[], write=None)

    def commit(self, writer, envelope):
        raise AssertionError("replaced in fixture")


class Journal:
    def __init__(self):
        self.records = []
        self.durable = []

    def append(self, *records, durable=True):
        self.records.extend(records)
        self.durable.extend([durable] * len(records))
        return defer.succeed(None)


class Courier:
    def __init__(self, name):
        self.name = name
        self.calls = []
        self.flags = []
        self.script = []     # list of outcome lists, or a callable(rcpts) -> outcomes

    def deliver(self, sender, recipients, message, params, *, qid=None, redelivery=False):
        self.calls.append((sender, [r for r, _ in recipients], message))
        self.flags.append((qid, redelivery))
        outcome = self.script.pop(0) if self.script else None
        if callable(outcome):
            outcome = outcome(recipients)
        if outcome is None:
            outcome = [Delivered() for _ in recipients]
        return defer.succeed(outcome)


@pytest.fixture
def q():
    clock = task.Clock()
    spool = Spool()

    def new_message():
        spool.n += 1
        w = SimpleNamespace(queue_id=f"DSN{spool.n}", data=[])
        w.write = w.data.append
        return w

    def commit(w, envelope):
        data = b"".join(w.data)
        spool.committed.append((w.queue_id, envelope, data))
        return defer.succeed(SimpleNamespace(queue_id=w.queue_id, message_size=len(data)))

    spool.new_message, spool.commit = new_message, commit
    config = SimpleNamespace(queue=SimpleNamespace(retry_min=RETRY_MIN, retry_max=RETRY_MAX,
                                                   lifetime=LIFETIME, warn_after=WARN),
                             domains=SimpleNamespace(local=("example.com", "example.net")))
    lmtp = Courier("lmtp")
    journal = Journal()
    qm = QueueManager(config=config, spool=spool, journal=journal, clock=clock, lmtp=lmtp,
                      remote=None, local_domains=["example.com"], hostname="mx.example.com",
                      rng=lambda: 0.5)
    qm.startService()
    return SimpleNamespace(qm=qm, clock=clock, spool=spool, journal=journal, lmtp=lmtp)


def states(q, qid):
    return [(r["r"], r["s"]) for r in q.journal.records if r.get("id") == qid and "r" in r]


def test_delivered_at_once_then_removed(q):
    q.qm.add(Entry("Q1", "a@b.org", ["joe@example.com", "ann@example.com"]))
    assert q.lmtp.calls == []          # scheduled, not yet run: no work inside add()
    q.clock.advance(0)
    assert q.lmtp.calls == [("a@b.org", ["joe@example.com", "ann@example.com"],
                             b"Subject: t\r\n\r\nbody\r\n")]
    assert states(q, "Q1") == [(0, "sent"), (1, "sent")]
    assert q.journal.records[-1] == {"id": "Q1", "done": True}
    assert "Q1" not in q.qm.messages
    assert q.spool.committed == []      # no report for a plain success


def test_backoff_doubles_to_the_maximum(q):
    temp = [TempFail(Reply(451, "4.2.0", "busy"))]
    q.lmtp.script = [temp] * 6
    q.qm.add(Entry("Q2", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    times = []
    for _ in range(5):
        nxt = q.qm.messages["Q2"].next_attempt
        times.append(nxt)
        q.clock.advance(nxt - q.clock.seconds())
    gaps = [b - a for a, b in zip([0] + times, times)]
    assert gaps == [300, 600, 1200, 2400, 3600]
    assert len(q.lmtp.calls) == 6
    assert q.lmtp.script == []
    q.clock.advance(q.qm.messages["Q2"].next_attempt - q.clock.seconds())
    assert states(q, "Q2")[-1] == (0, "sent")


def test_no_attempt_twice_at_once(q):
    hold = defer.Deferred()
    q.lmtp.script = [lambda rcpts: None]
    q.lmtp.deliver = lambda *a, **k: hold
    msg = q.qm.messages
    q.qm.add(Entry("Q3", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    q.qm._attempt(msg["Q3"])            # a second trigger while the first runs
    assert msg["Q3"].active
    hold.callback([Delivered()])
    assert "Q3" not in msg


def test_permanent_failure_bounces_with_a_report(q):
    q.lmtp.script = [[PermFail(Reply(550, "5.1.1", "<ghost@example.com>: User unknown")), Delivered()]]
    q.qm.add(Entry("Q4", "a@b.org", ["ghost@example.com", "joe@example.com"]))
    q.clock.advance(0)
    assert len(q.spool.committed) == 1
    qid, envelope, report = q.spool.committed[0]
    assert envelope["sender"] == ""
    assert envelope["recipients"] == [{"rcpt": "a@b.org", "state": "queued", "notify": ["NEVER"]}]
    msg = email.message_from_bytes(report, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg["To"] == "a@b.org"
    status = report.decode()
    assert "Final-Recipient: rfc822; ghost@example.com" in status
    assert "Status: 5.1.1" in status
    assert "joe@example.com" not in status.split("Final-Recipient")[-1]
    assert q.journal.records[-1] == {"id": "Q4", "done": True}


def test_null_sender_is_never_bounced_but_the_postmaster_hears_once(q):
    q.lmtp.script = [[PermFail(Reply(550, "5.1.1", "User unknown"))]]
    q.qm.add(Entry("Q5", "", ["ghost@example.com"],
                   message=b"Subject: private\r\n\r\nthe text of somebody's message\r\n"))
    q.clock.advance(0)
    assert len(q.spool.committed) == 1
    qid, envelope, report = q.spool.committed[0]
    assert envelope["sender"] == ""
    assert envelope["recipients"] == [{"rcpt": "postmaster@example.com", "state": "queued",
                                       "notify": ["NEVER"]}]
    assert envelope["client"]["role"] == "postmaster-notice"
    msg = email.message_from_bytes(report, policy=email.policy.default)
    assert msg["To"] == "postmaster@example.com"
    assert "Final-Recipient: rfc822; ghost@example.com" in report.decode()
    # Headers only (RET=HDRS), never the text of somebody else's message.
    assert b"Content-Type: text/rfc822-headers" in report and b"Subject: private" in report
    assert b"the text of somebody's message" not in report
    assert q.journal.records[-1] == {"id": "Q5", "done": True}


def test_a_failed_postmaster_notice_causes_nothing_more(q):
    q.lmtp.script = [[PermFail(Reply(550, "5.1.1", "User unknown"))]]
    entry = Entry("Q5b", "", ["postmaster@example.com"])
    entry.envelope["client"] = {"role": "postmaster-notice"}
    q.qm.add(entry)
    q.clock.advance(0)
    assert q.spool.committed == []
    assert q.journal.records[-1] == {"id": "Q5b", "done": True}


@pytest.mark.parametrize("rcpt", [
    # A copy our MDA spooled for the postmaster alias's target (ORCPT names it).
    {"rcpt": "joe@example.com", "state": "queued", "orcpt": ["rfc822", "Postmaster@example.com"]},
    # Mail from <> to the postmaster itself.
    {"rcpt": "postmaster@example.com", "state": "queued"},
])
def test_mail_from_null_failing_on_its_way_to_the_postmaster_notifies_nobody(q, rcpt):
    """The notice would fail the same way and come back as one more message from
    <> without the notice's role (an alias copy has its own): a loop of notices.
    The log says it instead."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        q.lmtp.script = [[PermFail(Reply(550, "5.1.1", "User unknown"))]]
        entry = Entry("Q5c", "", [rcpt])
        entry.envelope["client"] = {"role": "alias"}
        q.qm.add(entry)
        q.clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert q.spool.committed == []
    assert q.journal.records[-1] == {"id": "Q5c", "done": True}
    lines = [e["text"] for e in events if e.get("log_namespace") == "mailsys.queue"]
    assert "Q5c: postmaster notification not sent: the message failed on its way to " \
           "<postmaster@example.com>; check the postmaster alias" in lines


def test_notify_never_and_success(q):
    q.lmtp.script = [[PermFail(Reply(550, "5.1.1", "x"))], [Delivered()]]
    q.qm.add(Entry("Q6", "a@b.org", [{"rcpt": "ghost@example.com", "state": "queued", "notify": ["NEVER"]}]))
    q.clock.advance(0)
    assert q.spool.committed == []
    q.qm.add(Entry("Q7", "a@b.org", [{"rcpt": "joe@example.com", "state": "queued", "notify": ["SUCCESS"]}]))
    q.clock.advance(0)
    assert len(q.spool.committed) == 1
    assert b"Action: delivered" in q.spool.committed[0][2]


def test_lifetime_expiry_bounces_with_4_4_7(q):
    q.lmtp.script = [[TempFail(Reply(451, "4.3.0", "disk trouble"))]] * 100
    q.qm.add(Entry("Q8", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    while "Q8" in q.qm.messages:
        q.clock.advance(q.qm.messages["Q8"].next_attempt - q.clock.seconds())
    assert q.clock.seconds() == LIFETIME
    reports = [r for _, _, r in q.spool.committed]
    assert len(reports) == 2                       # the delay warning, then the bounce
    assert b"Action: delayed" in reports[0]
    assert b"Action: failed" in reports[1] and b"Status: 4.4.7" in reports[1]
    # The Diagnostic-Code is the last reply as it was, and the Last-Attempt-Date
    # is that of the last attempt, made when the lifetime ran out.
    assert b"Diagnostic-Code: X-Mailsys; disk trouble\r\n" in reports[1]
    assert b"Last-Attempt-Date: Fri, 02 Jan 1970 00:00:00 +0000\r\n" in reports[1]
    # That last attempt was made: one courier call for every deferral journaled.
    deferrals = [r for r in q.journal.records if r.get("id") == "Q8" and r.get("s") == "deferred"]
    assert len(q.lmtp.calls) == len(deferrals) and deferrals[-1]["t"] == LIFETIME


def test_delay_warning_only_once(q):
    q.lmtp.script = [[TempFail(Reply(451, "4.3.0", "later"))]] * 30
    q.qm.add(Entry("Q9", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    while q.clock.seconds() < WARN + 4 * RETRY_MAX:
        q.clock.advance(q.qm.messages["Q9"].next_attempt - q.clock.seconds())
    assert len(q.spool.committed) == 1
    assert [r for r in q.journal.records if r.get("warned")] == [{"id": "Q9", "warned": True}]


def test_remote_and_missing_lmtp_stay_deferred_with_a_reason(q):
    q.qm.lmtp = None
    q.qm.add(Entry("QA", "a@b.org", ["joe@example.com", "x@example.org"]))
    q.clock.advance(0)
    recs = [r for r in q.journal.records if r.get("id") == "QA" and "r" in r]
    assert sorted((r["r"], r["s"], r["e"]) for r in recs) == [
        (0, "deferred", str(NO_LMTP)), (1, "deferred", str(NO_REMOTE))]
    assert "QA" in q.qm.messages


def test_restart_resumes_and_never_resends_what_was_sent(q):
    entry = Entry("QB", "a@b.org", ["joe@example.com", "ann@example.com"])
    records = [{"id": "QB", "r": 0, "s": "sent", "e": "250 2.0.0 ok", "t": 1},
               {"id": "QB", "r": 1, "s": "deferred", "e": "451 4.2.0 busy", "t": 1},
               {"id": "QB", "next": 500.0, "attempts": 1},
               {"id": "QGONE", "done": True}]
    fresh = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock,
                         lmtp=q.lmtp, local_domains=["example.com"], rng=lambda: 0.5)
    live, done = fresh.load([entry, Entry("QGONE", "a@b.org", ["joe@example.com"])], records)
    assert done == {"QGONE"}
    assert list(fresh.messages) == ["QB"]
    assert live == records[:3]
    fresh.startService()
    q.clock.advance(499)
    assert q.lmtp.calls == []
    q.clock.advance(1)
    assert q.lmtp.calls == [("a@b.org", ["ann@example.com"], entry.read_message())]


def test_concurrency_cap(q):
    q.qm.max_active = 2
    pending = []
    q.lmtp.deliver = lambda *a, **k: pending.append(defer.Deferred()) or pending[-1]
    for i in range(5):
        q.qm.add(Entry(f"C{i}", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    assert len(pending) == 2
    pending[0].callback([Delivered()])
    assert len(pending) == 3
    for d in pending[1:]:
        d.callback([Delivered()])
    while len(pending) < 5:
        pending[-1].callback([Delivered()]) if not pending[-1].called else None
    for d in pending:
        if not d.called:
            d.callback([Delivered()])
    assert q.qm.messages == {}


def test_courier_exception_is_a_temporary_failure(q):
    def boom(*a):
        raise RuntimeError("bug")

    q.lmtp.deliver = boom
    q.qm.add(Entry("QC", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    assert states(q, "QC") == [(0, "deferred")]
    assert "QC" in q.qm.messages


def test_mailbox_full_is_retried_not_bounced(q):
    full = PermFail(Reply(552, "5.2.2", "<joe@example.com>: Mailbox full: over quota"))
    q.lmtp.script = [[full], [full], [Delivered()]]
    q.qm.add(Entry("QF", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    assert states(q, "QF") == [(0, "deferred")]
    q.clock.advance(RETRY_MIN)
    q.clock.advance(2 * RETRY_MIN)
    assert states(q, "QF") == [(0, "deferred"), (0, "deferred"), (0, "sent")]
    assert q.spool.committed == []
    # Logged and reported as the deferral it is: 4.2.2, the server's words kept.
    deferrals = [r for r in q.journal.records if r.get("s") == "deferred"]
    assert [(r["dsn"], r["e"]) for r in deferrals] == [
        ("4.2.2", "552 5.2.2 <joe@example.com>: Mailbox full: over quota")] * 2


def test_mailbox_full_at_a_remote_host_keeps_the_host(q):
    """The host that said 552 stays named (the log's relay=, Remote-MTA)."""
    full = PermFail(Reply(552, "5.2.2", "mailbox full"), relay="mx.remote.test[127.0.0.9]:25")
    q.lmtp.script = [[full]]
    q.qm.add(Entry("QG", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    rcpt = q.qm.messages["QG"].rcpts[0]
    assert (rcpt.state, rcpt.status, rcpt.mta) == ("deferred", "4.2.2", "mx.remote.test")


def test_too_many_recipients_sends_the_rest_at_once(q):
    """452 4.5.3 to the recipients past a server's limit: the rest go in the
    next transaction at once, not after queue.retry_min (RFC 5321 4.5.3.1.10)."""
    many = TempFail(Reply(452, "4.5.3", "Error: too many recipients"))
    rcpts = [f"u{i}@example.com" for i in range(5)]
    q.lmtp.script = [[Delivered(), Delivered(), many, many, many], [Delivered(), many, many],
                     [Delivered(), Delivered()]]
    q.qm.add(Entry("QT", "a@b.org", rcpts))
    q.clock.advance(0)
    q.clock.advance(0)
    q.clock.advance(0)
    assert [c[1] for c in q.lmtp.calls] == [rcpts, rcpts[2:], rcpts[3:]]
    assert "QT" not in q.qm.messages
    assert q.clock.seconds() == 0


def test_too_many_recipients_without_progress_backs_off(q):
    many = TempFail(Reply(452, "4.5.3", "Error: too many recipients"))
    q.lmtp.script = [[many, many], [Delivered(), Delivered()]]
    q.qm.add(Entry("QU", "a@b.org", ["u1@example.com", "u2@example.com"]))
    q.clock.advance(0)
    q.clock.advance(0)
    assert len(q.lmtp.calls) == 1
    q.clock.advance(RETRY_MIN)
    assert len(q.lmtp.calls) == 2 and "QU" not in q.qm.messages


def test_only_deferrals_skip_the_fdatasync(q):
    q.lmtp.script = [[TempFail(Reply(451, "4.2.0", "busy"))], [Delivered()]]
    q.qm.add(Entry("QD", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    q.clock.advance(RETRY_MIN)
    kinds = [(r.get("s") or ("done" if r.get("done") else "next"), d)
             for r, d in zip(q.journal.records, q.journal.durable)]
    assert kinds == [("deferred", False), ("next", False), ("sent", True), ("done", False)]


def test_done_is_durable_only_when_a_report_went_out(q):
    q.lmtp.script = [[Delivered()], [PermFail(Reply(550, "5.1.1", "x"))], [Delivered()]]
    q.qm.add(Entry("QN", "a@b.org", ["joe@example.com"]))
    q.qm.add(Entry("QB", "a@b.org", ["ghost@example.com"]))
    q.qm.add(Entry("QS", "a@b.org", [{"rcpt": "joe@example.com", "state": "queued",
                                      "notify": ["SUCCESS"]}]))
    q.clock.advance(0)
    done = {r["id"]: d for r, d in zip(q.journal.records, q.journal.durable) if r.get("done")
            and r["id"] in ("QN", "QB", "QS")}
    assert done == {"QN": False, "QB": True, "QS": True}
    assert len(q.spool.committed) == 2          # the bounce of QB, the success report of QS


def test_a_lost_done_record_finishes_the_message_again_without_a_second_delivery(q):
    from mailsys.queue import QueueManager

    q.lmtp.script = [[Delivered()]]
    entry = Entry("QL", "a@b.org", ["joe@example.com"])
    q.qm.add(entry)
    q.clock.advance(0)
    assert [r.get("s") or "done" for r in q.journal.records if r.get("id") == "QL"] == ["sent", "done"]
    # A crash lost the lazy "done": the restarted queue sees the durable "sent" only.
    kept = [r for r, d in zip(q.journal.records, q.journal.durable) if d]
    fresh = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock,
                         lmtp=q.lmtp, remote=None, local_domains=["example.com"],
                         hostname="mx.example.com", rng=lambda: 0.5)
    fresh.load([entry], kept)
    assert "QL" in fresh.messages
    fresh.startService()
    q.clock.advance(0)
    assert "QL" not in fresh.messages
    assert q.journal.records[-1] == {"id": "QL", "done": True}
    assert q.spool.committed == []
    assert len(q.lmtp.calls) == 1               # nothing delivered a second time


def test_an_attempt_that_blows_up_is_retried_later(q):
    from mailsys import queue as queue_mod

    real = queue_mod.QueueManager._settle
    calls = []

    def broken(self, msg):
        calls.append(msg.qid)
        if len(calls) == 1:
            raise RuntimeError("bug in settle")
        return real(self, msg)

    queue_mod.QueueManager._settle = broken
    try:
        q.lmtp.script = [[TempFail(Reply(451, "4.2.0", "busy"))], [Delivered()]]
        q.qm.add(Entry("QE", "a@b.org", ["joe@example.com"]))
        q.clock.advance(0)
        assert "QE" in q.qm.messages and q.qm.messages["QE"].timer.active()
        q.clock.advance(RETRY_MIN)
        assert "QE" not in q.qm.messages
    finally:
        queue_mod.QueueManager._settle = real


# -- operator commands (mailsys queue ...) ----------------------------------------------

def test_list_tells_each_recipients_state_and_last_error(q):
    q.lmtp.script = [[Delivered(), TempFail(Reply(452, "4.2.2", "Mailbox full"))]]
    q.qm.add(Entry("QL", "a@b.org", ["joe@example.com", "ann@example.com"], arrival=5.0))
    q.clock.advance(0)
    [item] = q.qm.list()
    assert item["id"] == "QL" and item["sender"] == "a@b.org" and item["arrival"] == 5.0
    assert item["size"] == len(b"Subject: t\r\n\r\nbody\r\n")
    assert item["state"] == "deferred" and item["attempts"] == 1
    assert item["next_attempt"] == RETRY_MIN          # jitter 0.5 -> factor 1.0
    assert [(r["address"], r["state"], r["error"], r["dsn"]) for r in item["recipients"]] == [
        ("joe@example.com", "sent", "250 2.0.0 Ok: delivered", "2.0.0"),
        ("ann@example.com", "deferred", "452 4.2.2 Mailbox full", "4.2.2")]


def test_hold_stops_attempts_until_release(q):
    q.lmtp.script = [[TempFail(Reply(451, "4.3.0", "later"))]]
    q.qm.add(Entry("QH", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    assert len(q.lmtp.calls) == 1
    assert q.qm.hold("QH").result == ["QH"]
    assert q.journal.records[-1] == {"id": "QH", "hold": True}
    assert q.qm.list()[0]["state"] == "held"
    q.clock.advance(RETRY_MAX * 10)
    assert len(q.lmtp.calls) == 1                       # held: never attempted
    assert q.qm.flush() == 0                            # flush leaves held mail alone
    assert q.qm.release("QH").result == ["QH"]
    assert q.journal.records[-2] == {"id": "QH", "hold": False} or \
        {"id": "QH", "hold": False} in q.journal.records
    q.clock.advance(0)
    assert len(q.lmtp.calls) == 2
    assert "QH" not in q.qm.messages                    # delivered on release


def test_hold_survives_a_restart(q):
    entry = Entry("QR", "a@b.org", ["joe@example.com"])
    qm2 = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock, lmtp=q.lmtp,
                       local_domains=["example.com"], rng=lambda: 0.5)
    qm2.load([entry], [{"id": "QR", "hold": True}])
    qm2.startService()
    q.clock.advance(10000)
    assert q.lmtp.calls == []
    assert qm2.messages["QR"].held and qm2.messages["QR"].redelivery


def test_delete_drops_without_a_report(q):
    q.qm.add(Entry("QD", "a@b.org", ["ghost@example.com"]))
    q.qm.add(Entry("QE", "a@b.org", ["joe@example.com"]))
    assert q.qm.delete("QD").result == ["QD"]
    assert q.journal.records[-1] == {"id": "QD", "done": True}
    assert q.qm.delete("nope").result == []
    q.clock.advance(0)
    assert [c[1] for c in q.lmtp.calls] == [["joe@example.com"]]
    assert q.spool.committed == []


def test_flush_by_domain_attempts_only_that_domains_mail_now(q):
    q.lmtp.script = [[TempFail(Reply(451, "4.3.0", "later"))]] * 2
    q.qm.add(Entry("QA", "a@b.org", ["joe@example.com"]))
    q.qm.add(Entry("QB", "a@b.org", ["joe@sub.example.net"]))
    q.clock.advance(0)
    assert len(q.lmtp.calls) == 1       # sub.example.net is not local: no remote courier
    assert q.qm.flush("EXAMPLE.net.") == 1
    assert q.qm.flush("example.com") == 1
    q.clock.advance(0)
    assert len(q.lmtp.calls) == 2       # QA again, at once, not after RETRY_MIN


def test_deleting_a_message_in_flight_lets_the_attempt_finish(q):
    hold = defer.Deferred()
    q.lmtp.deliver = lambda *a, **k: hold
    q.qm.add(Entry("QF", "a@b.org", ["joe@example.com"]))
    q.clock.advance(0)
    q.qm.delete("QF")
    hold.callback([TempFail(Reply(451, "4.3.0", "later"))])
    assert "QF" not in q.qm.messages
    assert q.clock.getDelayedCalls() == [] or all(
        c.func.__name__ != "_attempt" for c in q.clock.getDelayedCalls())


def test_a_permanent_failure_is_reported_at_once_while_others_wait(q):
    q.lmtp.script = [[PermFail(Reply(550, "5.1.1", "<ghost@example.com>: User unknown")),
                      TempFail(Reply(452, "4.2.2", "Mailbox full"))],
                     [Delivered()]]
    q.qm.add(Entry("QP", "a@b.org", ["ghost@example.com", "ann@example.com"]))
    q.clock.advance(0)
    assert len(q.spool.committed) == 1                  # at once, not after ann is settled
    report = q.spool.committed[0][2].decode()
    assert "Final-Recipient: rfc822; ghost@example.com" in report
    assert "ann@example.com" not in report.split("\r\n\r\n", 2)[2].split("Content-Type: message")[0] \
        or "Final-Recipient: rfc822; ann@example.com" not in report
    assert {"id": "QP", "reported": [0]} in q.journal.records
    q.clock.advance(RETRY_MIN)
    assert "QP" not in q.qm.messages
    assert len(q.spool.committed) == 1                  # ghost is not reported twice


def test_reported_failures_are_not_reported_again_after_a_restart(q):
    entry = Entry("QS", "a@b.org", ["ghost@example.com", "ann@example.com"])
    qm2 = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock,
                       lmtp=q.lmtp, local_domains=["example.com"], rng=lambda: 0.5)
    qm2.load([entry], [{"id": "QS", "r": 0, "s": "failed", "e": "550 5.1.1 x", "t": 0, "dsn": "5.1.1"},
                       {"id": "QS", "reported": [0]}])
    qm2.startService()
    q.clock.advance(0)
    assert "QS" not in qm2.messages
    assert q.spool.committed == []


def _success_wanted(qid, *rcpts):
    return Entry(qid, "a@b.org", [{"rcpt": r, "state": "queued", "notify": ["SUCCESS"]} for r in rcpts])


def test_success_notice_says_relayed_or_nothing_for_a_remote_next_hop(q):
    """RFC 3461 5.2: a server that offers DSN got the NOTIFY request and reports
    itself, so we send nothing for it; one that does not gets "relayed" from us."""
    remote = Courier("smtp")
    remote.script = [[Delivered(Reply(250, "2.0.0", "queued as A"), "mx.dsn.test[127.0.0.1]:25",
                                action=PASSED_ON),
                      Delivered(Reply(250, "2.0.0", "queued as B"), "mx.dsn.test[127.0.0.1]:25",
                                action=PASSED_ON),
                      Delivered(Reply(250, "2.0.0", "queued as C"), "mx.old.test[127.0.0.1]:25",
                                action=RELAYED)]]
    q.qm.remote = remote
    q.qm.add(_success_wanted("QD", "joe@example.com", "x@dsn.test", "y@dsn.test", "z@old.test"))
    q.clock.advance(0)
    assert [rs for _, rs, _ in remote.calls] == [["x@dsn.test", "y@dsn.test", "z@old.test"]]
    assert "QD" not in q.qm.messages
    [(_, envelope, report)] = q.spool.committed         # one report: joe and z, not x and y
    text = report.decode()
    assert text.count("Action: ") == 2
    assert "Final-Recipient: rfc822; joe@example.com\r\nAction: delivered\r\n" in text
    assert "Final-Recipient: rfc822; z@old.test\r\nAction: relayed\r\n" in text
    assert "x@dsn.test" not in text and "y@dsn.test" not in text
    sent = {r["r"]: r.get("a", "absent") for r in q.journal.records if r.get("id") == "QD" and "r" in r}
    assert sent == {0: "absent", 1: None, 2: None, 3: "relayed"}


def test_success_notice_says_expanded_for_an_alias_of_several(q):
    q.lmtp.script = [[Delivered(Reply(250, "2.0.0", "Ok: expanded to 2 recipients"), action=EXPANDED),
                      Delivered()]]
    q.qm.add(_success_wanted("QX", "team@example.com", "joe@example.com"))
    q.clock.advance(0)
    [(_, envelope, report)] = q.spool.committed
    text = report.decode()
    assert "Final-Recipient: rfc822; team@example.com\r\nAction: expanded\r\n" in text
    assert "Final-Recipient: rfc822; joe@example.com\r\nAction: delivered\r\n" in text
    sent = {r["r"]: r.get("a", "absent") for r in q.journal.records if r.get("id") == "QX" and "r" in r}
    assert sent == {0: "expanded", 1: "absent"}


def test_success_notice_after_a_restart_keeps_its_action(q):
    """The journal keeps how each recipient was sent: a queue restarted before
    the report went out neither reports a passed-on recipient nor calls a
    relayed one delivered."""
    entry = _success_wanted("QE", "x@dsn.test", "z@old.test", "joe@example.com")
    qm2 = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock,
                       lmtp=q.lmtp, local_domains=["example.com"], hostname="mx.example.com",
                       rng=lambda: 0.5)
    qm2.load([entry], [{"id": "QE", "r": 0, "s": "sent", "e": "250 ok", "t": 0, "a": None},
                       {"id": "QE", "r": 1, "s": "sent", "e": "250 ok", "t": 0, "a": "relayed"}])
    qm2.startService()
    q.clock.advance(0)
    assert q.lmtp.calls == [("a@b.org", ["joe@example.com"], entry.read_message())]
    assert "QE" not in qm2.messages
    [(_, _, report)] = q.spool.committed
    text = report.decode()
    assert text.count("Action: ") == 2
    assert "Final-Recipient: rfc822; z@old.test\r\nAction: relayed\r\n" in text
    assert "Final-Recipient: rfc822; joe@example.com\r\nAction: delivered\r\n" in text
    assert "x@dsn.test" not in text


def test_a_finished_segment_goes_while_running(q, tmp_path):
    """The queue tells the spool's reaper what it learns of and what is done, and
    passes on the writers' close notices: a closed segment goes once its last
    message is done, whether delivered or deleted."""
    segs = tmp_path / "segments"
    segs.mkdir()
    old, other, held = (segs / f"01-0000000{i}.seg" for i in (1, 2, 3))
    for p in (old, other, held):
        p.write_bytes(b"x")
    q.lmtp.script = [[Delivered()], [TempFail(Reply(451, "4.2.0", "busy"))], [Delivered()]]
    a = Entry("QA1", "a@b.org", ["joe@example.com"])
    b = Entry("QA2", "a@b.org", ["ann@example.com"])
    c = Entry("QA3", "a@b.org", ["bob@example.com"])
    a.segment = b.segment = str(old)
    c.segment = str(other)
    for e in (a, b, c):
        q.qm.add(e)
    q.qm.segment_closed(str(old), 2)
    q.clock.advance(0)
    assert [m for m in q.qm.messages] == ["QA2"]        # a and c delivered, b deferred
    assert old.exists()                                  # b keeps it
    assert other.exists()                                # its writer has not closed it
    q.qm.segment_closed(str(other), 1)
    assert not other.exists()
    q.clock.advance(q.qm.messages["QA2"].next_attempt - q.clock.seconds())
    assert "QA2" not in q.qm.messages and not old.exists()
    d = Entry("QA4", "a@b.org", ["joe@example.com"])
    d.segment = str(held)
    q.qm.add(d)
    q.qm.hold("QA4")
    q.qm.segment_closed(str(held), 1)
    assert held.exists()
    q.qm.delete("QA4")
    assert not held.exists()
    assert q.qm.reaper.removed == 3
    assert os.listdir(segs) == []


def test_segments_found_at_start_up_are_closed(q, tmp_path):
    seg = tmp_path / "00-00000007.seg"
    seg.write_bytes(b"x")
    entry = Entry("QL", "a@b.org", ["joe@example.com"])
    entry.segment = str(seg)
    qm2 = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock,
                       lmtp=q.lmtp, local_domains=["example.com"], rng=lambda: 0.5)
    qm2.load([entry], [])
    qm2.startService()
    assert seg.exists()
    q.clock.advance(0)
    assert "QL" not in qm2.messages and not seg.exists()


def _diagnostics(report):
    """The Diagnostic-Code fields of a report and the whole report, unfolded."""
    text = report.decode().replace("\r\n ", " ")
    return re.findall(r"^Diagnostic-Code: (.*?)\r$", text, re.M), text


def test_reports_tell_a_servers_reply_from_one_mailsys_made_up(q):
    """RFC 3464 2.3.6: "smtp;" only for what a remote server said; a refused
    connection, DNS trouble or a destination taken as down is "X-Mailsys;"."""
    from mailsys.smtp.reply import PeerReply

    remote = q.qm.remote = Courier("remote")
    remote.script = [[
        PermFail(Reply(550, "5.1.2", "Host or domain name not found. Name service error for "
                                     "name=nowhere.test type=MX: Host not found")),
        PermFail(PeerReply(550, "5.1.1", "<bob@mx.test>: User unknown"), "mx.test[127.0.0.9]:25"),
        TempFail(Reply(451, "4.4.1", "delivery temporarily suspended: connect to "
                                     "down.test[127.0.0.8]:25: Connection refused")),
    ]]
    q.qm.add(Entry("QX", "a@b.org", ["x@nowhere.test", "bob@mx.test", "c@down.test"]))
    q.clock.advance(0)
    [(_, _, report)] = q.spool.committed
    codes, text = _diagnostics(report)
    assert codes == ["X-Mailsys; Host or domain name not found. Name service error for "
                     "name=nowhere.test type=MX: Host not found",
                     "smtp; 550 5.1.1 <bob@mx.test>: User unknown"]
    assert "<bob@mx.test>: host mx.test said: 550 5.1.1 <bob@mx.test>: User unknown" in text
    assert "<x@nowhere.test>: Host or domain name not found." in text
    # The made-up deferral is journaled as such, so that a report after a
    # restart (here: the expiry) says X-Mailsys too.
    [rec] = [r for r in q.journal.records if r.get("id") == "QX" and r.get("r") == 2]
    assert rec["local"] is True and rec["e"].startswith("451 4.4.1 delivery temporarily suspended")
    assert [r.get("local") for r in q.journal.records if r.get("id") == "QX" and "r" in r] == [
        True, None, True]
    qm2 = QueueManager(config=q.qm.config, spool=q.spool, journal=q.journal, clock=q.clock,
                       remote=None, local_domains=["example.com"], rng=lambda: 0.5)
    qm2.load([Entry("QX", "a@b.org", ["x@nowhere.test", "bob@mx.test", "c@down.test"])],
             [r for r in q.journal.records if r.get("id") == "QX"])
    assert qm2.messages["QX"].rcpts[2].local
    assert [r.get("local") for r in qm2.snapshot() if r.get("r") is not None] == [True, None, True]
    qm2.startService()
    q.clock.advance(LIFETIME)
    # Past the lifetime the message gets its last attempt (no remote courier
    # here: another reply mailsys makes up), then the report, which says so.
    codes, _ = _diagnostics(q.spool.committed[-1][2])
    assert codes == ["X-Mailsys; Remote delivery is not available in this version; the message "
                     "stays queued"]
