"""Copying deferred messages forward out of mostly finished spool segments.

A segment is deleted only when every message in it is done; the queue copies a
deferred message into its own current segment when the message is one of the
few (at most COPY_FORWARD_SHARE) still queued from a closed segment, so the
rest of the file can go.  Real spool files, the writer thread replaced by a
synchronous or manually stepped stand-in, the queue on task.Clock.
"""
import os
from types import SimpleNamespace

from twisted.internet import task

from mailsys import spool as spool_mod
from mailsys.delivery import TempFail
from mailsys.queue import QueueManager
from mailsys.smtp.reply import Reply
from mailsys.spool import SegmentReaper, Spool, read_spool
from tests import test_spool
from tests.test_queue import Courier, Entry
from tests.test_queue import Journal as ListJournal
from tests.test_spool import ManualThreads

sync = test_spool.sync     # the spool's writer thread run synchronously

BUSY = TempFail(Reply(451, "4.2.0", "mailbox busy"))
CONFIG = SimpleNamespace(queue=SimpleNamespace(retry_min=300, retry_max=3600, lifetime=86400,
                                               warn_after=0),
                         domains=SimpleNamespace(local=("example.com",)))


def body(n):
    return f"Subject: message {n}\r\n\r\n".encode() + b"line\r\n" * (50 + n)


class Setup:
    def __init__(self, tmp_path):
        self.clock = task.Clock()
        self.spool = Spool(str(tmp_path / "spool"), reactor=None, fsync=False)
        self.spool.open()
        self.lmtp = Courier("lmtp")
        self.journal = ListJournal()
        self.qm = QueueManager(config=CONFIG, spool=self.spool, journal=self.journal, clock=self.clock,
                               lmtp=self.lmtp, local_domains=["example.com"], hostname="mx.example.com",
                               rng=lambda: 0.5)
        self.spool.on_commit.append(self.qm.add)
        self.spool.on_close.append(self.qm.segment_closed)
        self.qm.startService()
        self.ids = []

    def spool_message(self, n):
        qid = self.spool.ids.next()
        w = self.spool.new_message(qid)
        w.write(body(n))
        self.spool.commit(w, {"sender": "a@b.org", "arrival": self.clock.seconds(), "params": {},
                              "recipients": [{"rcpt": "joe@example.com", "state": "queued"}]})
        self.ids.append(qid)
        return qid

    def rotate(self):
        """The writer's next commit goes to a new segment (as at 128 MiB)."""
        self.spool.segment_limit = 0
        qid = self.spool_message(99)
        self.spool.segment_limit = spool_mod.SEGMENT_LIMIT
        return qid

    def segments(self):
        return sorted(os.listdir(self.spool.segments))


def test_a_straggler_is_copied_forward_and_its_segment_goes(tmp_path, sync):
    s = Setup(tmp_path)
    first = s.segments()
    for n in range(8):
        s.spool_message(n)
    straggler = s.ids[0]
    s.lmtp.script = [[BUSY]]                 # the first delivery fails for now, the rest go
    s.clock.advance(0)
    assert list(s.qm.messages) == [straggler]
    assert s.segments() == first             # still being written to: nothing to copy
    assert s.qm.messages[straggler].entry.segment.endswith(first[0])
    s.rotate()
    s.clock.advance(0)                       # the rotating message is delivered
    assert len(s.segments()) == 2            # the old one is held by the straggler
    s.lmtp.script = [[BUSY]]
    s.clock.advance(300)                     # its retry fails again: copied forward now
    msg = s.qm.messages[straggler]
    assert s.segments() == sorted(set(s.segments()) - set(first))
    assert len(s.segments()) == 1 and msg.entry.segment.endswith(s.segments()[0])
    copies = [e for e in read_spool(s.spool.directory) if e.queue_id == straggler]
    assert len(copies) == 1 and copies[0].read_message() == body(0)
    assert copies[0].envelope["recipients"] == [{"rcpt": "joe@example.com", "state": "queued"}]
    assert s.qm.reaper.removed == 1
    s.clock.advance(600)                     # delivered from the copy
    assert s.lmtp.calls[-1] == ("a@b.org", ["joe@example.com"], body(0))
    assert s.qm.messages == {}
    delivered = [c[2] for c in s.lmtp.calls]
    assert sorted(delivered) == sorted([body(0)] * 3 + [body(n) for n in range(1, 8)] + [body(99)])


def test_a_mostly_queued_segment_is_left_alone(tmp_path, sync):
    s = Setup(tmp_path)
    for n in range(8):
        s.spool_message(n)
    s.lmtp.script = [[BUSY]] * 3             # an outage: three of eight still queued
    s.clock.advance(0)
    s.rotate()
    s.clock.advance(0)
    s.lmtp.script = [[BUSY]] * 3
    s.clock.advance(300)
    assert len(s.qm.messages) == 3
    assert len(s.segments()) == 2            # 3 of 8 is more than a quarter: no copies
    assert all(m.entry.segment == s.qm.messages[s.ids[0]].entry.segment
               for m in s.qm.messages.values())
    assert len(read_spool(s.spool.directory)) == 9


def test_a_message_finished_during_its_copy_leaves_no_trace(tmp_path, monkeypatch):
    manual = ManualThreads()
    monkeypatch.setattr(spool_mod, "Offload", manual)
    s = Setup(tmp_path)
    for n in range(5):
        s.spool_message(n)
        manual.run_next()
    s.lmtp.script = [[BUSY]]
    s.clock.advance(0)
    s.rotate()
    manual.run_next()
    s.clock.advance(0)
    straggler = s.ids[0]
    s.lmtp.script = [[BUSY]]
    s.clock.advance(300)                     # the copy is being written ...
    assert len(manual.queue) == 1
    s.qm.delete(straggler)                   # ... when the administrator deletes it
    manual.run_next()
    assert s.qm.messages == {}
    # Both segments are accounted for: the old one is gone, and the copy counts
    # as done in the new one, which goes once it is closed.
    assert s.qm.reaper.removed == 1
    s.rotate()
    manual.run_next()
    s.clock.advance(0)
    assert s.qm.reaper.removed == 2


def test_reaper_stranded_share():
    reaper = SegmentReaper(unlink=lambda p: None)
    for q in "ABCD":
        reaper.track("/s", q)
    assert not reaper.stranded("/s", 0.25)   # not closed yet
    reaper.close("/s", 8)                    # eight committed, four seen so far
    assert not reaper.stranded("/s", 0.25)
    reaper.done("/s", "A")
    reaper.done("/s", "B")
    assert reaper.stranded("/s", 0.25)       # 2 of 8
    reaper.close("/t", 3, total=12)          # found at start-up: 12 in it, 3 not done
    for q in "XYZ":
        reaper.track("/t", q)
    assert reaper.stranded("/t", 0.25) and not reaper.stranded("/t", 0.2)
    assert not reaper.stranded("/nowhere", 1.0)


def test_load_takes_one_of_two_copies_left_by_a_crash():
    qm = QueueManager(config=CONFIG, spool=None, journal=ListJournal(), clock=task.Clock(),
                      lmtp=Courier("lmtp"), local_domains=["example.com"], hostname="mx.example.com")
    old, new = Entry("Q1", "a@b.org", ["joe@example.com"]), Entry("Q1", "a@b.org", ["joe@example.com"])
    old.segment, new.segment = "/old", "/new"
    qm.load([old, Entry("Q2", "a@b.org", ["joe@example.com"]), new],
            [{"id": "Q2", "done": True}])
    assert list(qm.messages) == ["Q1"]
    qm.startService()
    qm.clock.advance(0)
    assert len(qm.lmtp.calls) == 1
