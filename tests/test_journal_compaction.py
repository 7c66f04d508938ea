"""Compacting the queue journal while the server runs.

The journal grows by a record per event; at start-up it is rewritten with only
the live state.  While running, once it has grown by COMPACT_AFTER bytes, the
next write replaces it by the queue's snapshot followed by the pending records.
These tests hold the three parts to that: the queue's snapshot replays to the
same queue, the reaper keeps the done marks of segments still on disk, and the
journal swaps files without losing or reordering a record.
"""
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from mailsys import journal as journal_module
from mailsys.delivery import PASSED_ON, Delivered, PermFail, TempFail
from mailsys.journal import replay
from mailsys.queue import QueueManager, open_queue
from mailsys.smtp.reply import Reply
from mailsys.spool import SegmentReaper, Spool

from tests import test_queue
from tests.test_journal import manual
from tests.test_queue import Courier, Entry
from tests.test_queue import Journal as ListJournal

q = test_queue.q     # the queue fixture on task.Clock


def fields(qm):
    """Everything load() restores, per queued message."""
    return {qid: (m.attempts, m.next_attempt, m.warned, m.held,
                  [(r.state, r.error, r.when, r.status, r.mta, r.reported, r.action) for r in m.rcpts])
            for qid, m in qm.messages.items()}


def fresh(q, entries, records):
    qm = QueueManager(config=q.qm.config, spool=q.spool, journal=ListJournal(), clock=task.Clock(),
                      lmtp=Courier("lmtp"), remote=None, local_domains=["example.com"],
                      hostname="mx.example.com", rng=lambda: 0.5)
    qm.load(entries, records)
    return qm


def test_snapshot_replays_to_the_same_queue(q):
    busy = TempFail(Reply(451, "4.2.0", "mailbox busy"))
    gone = PermFail(Reply(550, "5.1.1", "no such user"))
    entries = [
        Entry("S1", "a@b.org", ["joe@example.com"]),                       # sent: done
        Entry("D1", "a@b.org", ["joe@example.com", "ann@example.com"]),    # one sent, one deferred
        Entry("F1", "a@b.org", ["bob@example.com", "joe@example.com"]),    # one failed (reported), one deferred
        Entry("H1", "a@b.org", ["joe@example.com"]),                       # deferred, then held
        Entry("P1", "a@b.org", [{"rcpt": "joe@example.com", "state": "queued", "notify": ["SUCCESS"]},
                                "ann@example.com"]),                       # passed on + deferred
        Entry("N1", "a@b.org", ["joe@example.com"]),                       # never attempted (held at once)
    ]
    q.lmtp.script = [
        None,
        lambda rcpts: [Delivered(), busy],
        lambda rcpts: [gone, busy],
        [busy],
        lambda rcpts: [Delivered(action=PASSED_ON), busy],
    ]
    for e in entries[:5]:
        q.qm.add(e)
        q.clock.advance(0)
    q.qm.add(entries[5])
    q.qm.hold("N1")
    q.qm.hold("H1")
    q.clock.advance(1)
    # After the warning time every deferred message gets its delay notice.
    q.lmtp.script = [lambda rcpts: [busy for _ in rcpts]] * 10
    q.clock.advance(4 * 3600 + 10)
    q.clock.advance(3600 * 2)
    assert set(q.qm.messages) == {"D1", "F1", "H1", "P1", "N1"}
    live = fields(q.qm)
    assert live["F1"][4][0][0] == "failed" and live["F1"][4][0][5] is True
    assert live["P1"][4][0][6] == PASSED_ON
    assert live["D1"][2] is True and live["H1"][3] is True and live["N1"][3] is True
    assert live["D1"][0] >= 2 and live["D1"][1] > 0

    snap = q.qm.snapshot()
    assert {"id": "S1", "done": True} in snap
    assert fields(fresh(q, entries, snap)) == live
    # and the same as replaying the whole journal
    assert fields(fresh(q, entries, q.journal.records)) == live
    # The snapshot is smaller than what it replaces.
    assert len(snap) < len(q.journal.records)


def test_snapshot_keeps_the_done_mark_of_a_message_deleted_mid_delivery(q):
    pending = defer.Deferred()
    q.lmtp.deliver = lambda *a, **k: pending       # the delivery stays under way
    e = Entry("M1", "a@b.org", ["joe@example.com"])
    q.qm.add(e)
    q.clock.advance(0)
    q.qm.delete("M1")
    assert "M1" not in q.qm.messages
    assert {"id": "M1", "done": True} in q.qm.snapshot()


# --- the reaper's done marks ------------------------------------------------------------

def test_reaper_keeps_done_marks_while_the_segment_exists():
    removed = []
    reaper = SegmentReaper(unlink=removed.append)
    reaper.track("/s1", "A")
    reaper.track("/s1", "B")
    reaper.done("/s1", "A")
    assert list(reaper.done_marks()) == ["A"]
    reaper.finished("/s1", "B")                  # deleted while being delivered
    assert sorted(reaper.done_marks()) == ["A", "B"] and removed == []
    reaper.close("/s1", 2)
    assert removed == []                         # B still counts as live until done()
    reaper.done("/s1", "B")
    assert removed == ["/s1"] and list(reaper.done_marks()) == []
    reaper.remember_done("/s2", ["C", "D"])
    reaper.remember_done("/s3", [])
    assert sorted(reaper.done_marks()) == ["C", "D"]


def test_reaper_keeps_done_marks_when_the_segment_cannot_go():
    def unlink(path):
        raise PermissionError(13, "Permission denied")

    reaper = SegmentReaper(unlink=unlink)
    reaper.track("/s1", "A")
    reaper.close("/s1", 1)
    reaper.done("/s1", "A")
    assert list(reaper.done_marks()) == ["A"]    # still on disk: a restart must not resend


# --- the journal's file swap -------------------------------------------------------------

@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(journal_module, "COMPACT_AFTER", 200)


def test_journal_compacts_to_snapshot_then_pending(tmp_path, small, monkeypatch):
    synced = []
    monkeypatch.setattr(journal_module, "fsync_dir", lambda d: synced.append(d))
    clock = task.Clock()
    j, pending, finish = manual(tmp_path, clock)
    state = [{"id": "L", "r": 0, "s": "deferred"}]
    j.snapshot = lambda: list(state)
    j.sync_first = (str(tmp_path / "segments"),)
    fired = []
    record = {"id": "A0", "r": 0, "s": "sent", "pad": "x" * 20}
    n = len(journal_module.encode(record))
    assert 3 * n < 200 <= 4 * n
    for i in range(4):                              # the 4th write takes it past 200
        j.append(dict(record, id=f"A{i}")).addCallback(fired.append)
        finish()
    assert j.size == 4 * n and j.compactions == 0 and len(replay(j.path)) == 4
    j.append({"id": "B", "r": 0, "s": "sent"}).addCallback(fired.append)
    assert len(pending) == 1                   # the compaction, with B on top
    j.append({"id": "C", "next": 9}, durable=False)  # during it
    j.append({"id": "E", "r": 0, "s": "sent"}).addCallback(fired.append)   # during it
    assert len(fired) == 4
    finish()
    assert synced == [str(tmp_path / "segments")]     # before the swap (write_atomically syncs its own)
    assert len(fired) == 5 and j.compactions == 1
    assert replay(j.path) == [{"id": "L", "r": 0, "s": "deferred"}, {"id": "B", "r": 0, "s": "sent"}]
    finish()                                   # C and E go to the new file
    assert len(fired) == 6
    assert [r["id"] for r in replay(j.path)] == ["L", "B", "C", "E"]
    assert sorted(os.listdir(tmp_path)) == ["queue.jnl"]
    # The next compaction waits for another COMPACT_AFTER bytes of growth.
    assert j.size == os.path.getsize(j.path)
    j.append({"id": "F", "r": 0, "s": "sent"})
    finish()
    assert j.compactions == 1
    j.close()


def test_compaction_failure_keeps_the_old_journal(tmp_path, small):
    clock = task.Clock()
    j, pending, finish = manual(tmp_path, clock)
    for i in range(5):
        j.append({"id": f"A{i}", "r": 0, "s": "sent", "pad": "x" * 20})
        finish()
    before = open(j.path, "rb").read()
    j.snapshot = lambda: [{"id": "Z", "big": "y" * 10}]
    j.sync_first = (str(tmp_path / "missing"),)     # fsync of a missing directory fails
    failed = []
    j.append({"id": "B", "r": 0, "s": "sent"}).addErrback(failed.append)
    finish()
    assert len(failed) == 1 and j.failed is not None
    assert open(j.path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["queue.jnl"]
    j.close()


def test_open_queue_wires_compaction(tmp_path):
    state = tmp_path / "state"
    config = SimpleNamespace(server=SimpleNamespace(state_dir=str(state), hostname="mx.example.com"),
                             domains=SimpleNamespace(local=("example.com",)))
    spool = Spool(str(state / "spool"), task.Clock(), fsync=False)
    spool.open()
    queue, journal = open_queue(config, spool, task.Clock())
    try:
        assert journal.snapshot == queue.snapshot
        assert journal.sync_first == (spool.segments,)
    finally:
        journal.close()
        spool.close()
