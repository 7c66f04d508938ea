"""mailsys.spool: the durable spool on a real directory, its writer thread replaced
by a synchronous (or manually stepped) stand-in."""
import errno
import os

import pytest
from twisted.internet import defer

from mailsys import spool as spool_mod
from mailsys.spool import HEADER, QueueIds, Spool, SpoolError, read_spool, scan_segment
from tests.helpers import SyncOffload


class ManualThreads(SyncOffload):
    """An Offload that runs the work only when the test says so."""

    def __init__(self):
        super().__init__()
        self.queue = []
        self.batches = []

    def __call__(self, reactor, name):
        return self

    def run(self, f, *args):
        d = defer.Deferred()
        self.queue.append((d, f, args))
        if f.__name__ == "_write_batch":
            self.batches.append(len(args[0]))
        return d

    def run_next(self):
        d, f, args = self.queue.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback()
        else:
            d.callback(result)


@pytest.fixture
def sync(monkeypatch):
    monkeypatch.setattr(spool_mod, "Offload", SyncOffload)


@pytest.fixture
def manual(monkeypatch):
    m = ManualThreads()
    monkeypatch.setattr(spool_mod, "Offload", m)
    return m


def open_spool(path):
    s = Spool(str(path), reactor=None)
    s.open()
    return s


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def commit(s, qid, body, envelope=None, chunks=1):
    w = s.new_message(qid)
    step = max(1, len(body) // chunks)
    for i in range(0, len(body), step):
        w.write(body[i:i + step])
    return s.commit(w, envelope if envelope is not None else {"sender": f"{qid}@example.org"})


def segment_files(path):
    seg = os.path.join(str(path), "segments")
    return sorted(os.path.join(seg, n) for n in os.listdir(seg) if n.endswith(".seg"))


ENVELOPE = {"arrival": 1772445600.5, "sender": "s@remote.example", "params": {"size": 42},
            "recipients": [{"rcpt": "alice@example.com", "state": "queued", "notify": ["NEVER"]},
                           {"rcpt": "bob@example.com", "state": "queued"}],
            "client": {"ip": "203.0.113.9", "name": "c.example", "helo": "c", "proto": "ESMTP",
                       "role": "mta", "auth": None}}


# -- commit and read back ----------------------------------------------------------------

def test_commit_then_read_spool(sync, tmp_path):
    s = open_spool(tmp_path / "spool")
    body = b"Received: x\r\nSubject: t\r\n\r\n" + bytes(range(256)) + b"\r\n"
    entry = result_of(commit(s, "Q1", body, ENVELOPE, chunks=7))
    assert entry.queue_id == "Q1"
    assert entry.message_size == len(body)
    assert entry.read_message() == body
    found = read_spool(str(tmp_path / "spool"))
    assert len(found) == 1
    assert found[0].read_message() == body
    assert found[0].envelope == dict(ENVELOPE, id="Q1", size=len(body))
    assert found[0].queue_id == "Q1"
    assert (found[0].offset, found[0].message_offset, found[0].message_size) == \
        (entry.offset, entry.message_offset, entry.message_size)
    # committed entries are announced, not accumulated: memory stays flat
    assert s.entries == []
    s.close()


def test_read_spool_skips_a_segment_removed_while_it_reads(sync, tmp_path, monkeypatch):
    """A running server removes a segment once every message in it is done:
    one listed but gone by the time it is opened held nothing queued."""
    s = open_spool(tmp_path / "spool")
    result_of(commit(s, "Q1", b"Subject: t\r\n\r\nkept\r\n", ENVELOPE))
    real = os.listdir
    monkeypatch.setattr(spool_mod.os, "listdir",
                        lambda path: ["00-00000000.seg", *real(path), "99-FFFFFFFF.seg"])
    assert [(e.queue_id, e.read_message()) for e in read_spool(str(tmp_path / "spool"))] == [
        ("Q1", b"Subject: t\r\n\r\nkept\r\n")]
    s.close()


def test_commit_hooks_hear_of_each_durable_message(sync, tmp_path):
    s = open_spool(tmp_path / "spool")
    heard = []
    s.on_commit.append(heard.append)
    entry = result_of(commit(s, "Q7", b"Subject: x\r\n\r\nbody\r\n", ENVELOPE))
    assert heard == [entry]
    s.close()


def test_empty_message_and_utf8_envelope(sync, tmp_path):
    s = open_spool(tmp_path)
    result_of(commit(s, "Q0", b"", {"sender": "sé@例子.广告"}))
    found = read_spool(str(tmp_path))
    assert [(e.queue_id, e.read_message(), e.envelope["sender"]) for e in found] == [("Q0", b"", "sé@例子.广告")]


def test_on_commit_listeners(sync, tmp_path):
    s = open_spool(tmp_path)
    seen = []
    s.on_commit.append(seen.append)
    entry = result_of(commit(s, "Q1", b"x\r\n"))
    assert seen == [entry]


def test_entries_survive_reopen(sync, tmp_path):
    s = open_spool(tmp_path)
    for i in range(3):
        result_of(commit(s, f"Q{i}", b"message %d\r\n" % i))
    s.close()
    s2 = open_spool(tmp_path)
    assert [e.queue_id for e in s2.entries] == ["Q0", "Q1", "Q2"]
    result_of(commit(s2, "Q3", b"after reopen\r\n"))
    assert [(e.queue_id, e.read_message()) for e in read_spool(str(tmp_path))] == [
        ("Q0", b"message 0\r\n"), ("Q1", b"message 1\r\n"), ("Q2", b"message 2\r\n"), ("Q3", b"after reopen\r\n")]
    assert len(segment_files(tmp_path)) == 2


def test_several_commits_in_one_batch(manual, tmp_path, monkeypatch):
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    s = open_spool(tmp_path)
    d1 = commit(s, "A", b"first\r\n")
    d2 = commit(s, "B", b"second\r\n")
    d3 = commit(s, "C", b"third\r\n")
    fired = []
    for d in (d1, d2, d3):
        d.addCallback(lambda e: (fired.append(e.queue_id), e)[1])
    assert manual.batches == [1] and fired == []
    manual.run_next()                       # A's batch; B and C wait for it
    assert fired == ["A"] and len(syncs) == 1
    assert manual.batches == [1, 2]
    manual.run_next()
    assert fired == ["A", "B", "C"] and len(syncs) == 2
    assert [(e.queue_id, e.read_message()) for e in read_spool(str(tmp_path))] == [
        ("A", b"first\r\n"), ("B", b"second\r\n"), ("C", b"third\r\n")]
    assert manual.queue == []


def test_nothing_acknowledged_before_the_sync(manual, tmp_path):
    s = open_spool(tmp_path)
    d = commit(s, "A", b"x\r\n")
    assert not d.called
    manual.run_next()
    assert d.called


# -- torn tails and corruption -------------------------------------------------------------

def _three_records(tmp_path):
    src = tmp_path / "src"
    s = open_spool(src)
    for qid in ("A", "B", "C"):
        result_of(commit(s, qid, b"Subject: %s\r\n\r\nbody of %s\r\n" % (qid.encode(), qid.encode())))
    s.close()
    (seg,) = [f for f in segment_files(src) if os.path.getsize(f)]
    entries, end = scan_segment(seg)
    assert [e.queue_id for e in entries] == ["A", "B", "C"] and end == os.path.getsize(seg)
    return seg, entries


def _reopen_with(tmp_path, name, seg_bytes):
    d = tmp_path / name
    (d / "segments").mkdir(parents=True)
    seg = d / "segments" / "00-00000001.seg"
    seg.write_bytes(seg_bytes)
    s = open_spool(d)
    return s, seg


def test_torn_tail_cut_at_every_offset(sync, tmp_path):
    seg, entries = _three_records(tmp_path)
    data = open(seg, "rb").read()
    last = entries[-1].offset
    for cut in range(last, len(data)):
        s, path = _reopen_with(tmp_path, f"cut{cut}", data[:cut])
        assert [e.queue_id for e in s.entries] == ["A", "B"], cut
        assert path.read_bytes() == data[:last], cut
        assert [e.read_message() for e in s.entries] == [e.read_message() for e in entries[:2]]
        s.close()


def test_torn_tail_then_new_commits_readable(sync, tmp_path):
    seg, entries = _three_records(tmp_path)
    data = open(seg, "rb").read()
    s, path = _reopen_with(tmp_path, "torn", data[:-3])
    result_of(commit(s, "D", b"new\r\n"))
    s.close()
    assert [(e.queue_id) for e in read_spool(str(tmp_path / "torn"))] == ["A", "B", "D"]


@pytest.mark.parametrize("where", ["header", "envelope", "message", "last_byte"])
def test_corrupted_last_record_detected_and_cut(sync, tmp_path, where):
    seg, entries = _three_records(tmp_path)
    data = bytearray(open(seg, "rb").read())
    last = entries[-1]
    pos = {"header": last.offset + 5, "envelope": last.offset + HEADER.size + 3,
           "message": last.message_offset + 2, "last_byte": len(data) - 1}[where]
    data[pos] ^= 0x01
    s, path = _reopen_with(tmp_path, where, bytes(data))
    assert [e.queue_id for e in s.entries] == ["A", "B"]
    assert path.stat().st_size == last.offset
    s.close()


def test_read_spool_does_not_repair(sync, tmp_path):
    seg, entries = _three_records(tmp_path)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.truncate(size - 1)
    assert [e.queue_id for e in read_spool(str(tmp_path / "src"))] == ["A", "B"]
    assert os.path.getsize(seg) == size - 1


def test_incoming_leftovers_removed_at_open(sync, tmp_path):
    s = open_spool(tmp_path)
    s.close()
    for name in ("ABC", "DEF"):
        (tmp_path / "incoming" / name).write_bytes(b"scratch")
    s = open_spool(tmp_path)
    assert os.listdir(tmp_path / "incoming") == []
    s.close()


# -- spilling, failures, memory --------------------------------------------------------------

def test_large_message_spills_and_is_copied_intact(sync, tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "MEMORY_PER_MESSAGE", 1000)
    s = open_spool(tmp_path)
    body = b"".join(b"line %06d %s\r\n" % (i, b"x" * 50) for i in range(2000))   # ~134 KB
    w = s.new_message("BIG")
    w.write(body[:800])
    assert w.spill_fd is None and s._memory == 800
    w.write(body[800:1600])
    assert w.spill_fd is not None
    scratch = tmp_path / "incoming" / "BIG.00"
    assert scratch.read_bytes() == body[:1600]
    assert s._memory == 0
    for i in range(1600, len(body), 4096):
        w.write(body[i:i + 4096])
    assert scratch.stat().st_size == len(body)
    assert w.head == body[:65536]
    result = result_of(s.commit(w, {"sender": ""}))
    assert not isinstance(result, Exception) and not hasattr(result, "value"), result
    assert result.read_message() == body
    assert [(e.queue_id, e.read_message() == body) for e in read_spool(str(tmp_path))] == [("BIG", True)]
    assert not scratch.exists()
    # a small message after the big one lands after it, intact
    result_of(commit(s, "SMALL", b"small\r\n"))
    assert [e.read_message() for e in read_spool(str(tmp_path))][1] == b"small\r\n"


def test_spilled_message_discarded_removes_its_scratch_file(sync, tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "MEMORY_PER_MESSAGE", 10)
    s = open_spool(tmp_path)
    w = s.new_message("X")
    w.write(b"a" * 100)
    assert (tmp_path / "incoming" / "X.00").exists()
    w.discard()
    assert not (tmp_path / "incoming" / "X.00").exists()
    w.discard()   # twice is harmless


def _failing_fdatasync(errno_):
    def fdatasync(fd):
        raise OSError(errno_, os.strerror(errno_))
    return fdatasync


@pytest.mark.parametrize("code, nospace", [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)])
def test_write_failure_truncates_and_next_commit_is_readable(sync, tmp_path, monkeypatch, code, nospace):
    s = open_spool(tmp_path)
    result_of(commit(s, "A", b"first\r\n"))
    seg = [f for f in segment_files(tmp_path) if os.path.getsize(f)][0]
    size = os.path.getsize(seg)
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", _failing_fdatasync(code))
    failure = result_of(commit(s, "B", b"second\r\n" * 100))
    assert failure.check(SpoolError)
    assert failure.value.nospace is nospace
    assert os.path.getsize(seg) == size
    assert s._memory == 0
    monkeypatch.setattr(os, "fdatasync", real)
    result_of(commit(s, "C", b"third\r\n"))
    assert [(e.queue_id, e.read_message()) for e in read_spool(str(tmp_path))] == [
        ("A", b"first\r\n"), ("C", b"third\r\n")]
    s.close()
    s2 = open_spool(tmp_path)
    assert [e.queue_id for e in s2.entries] == ["A", "C"]


def test_failure_refuses_the_whole_batch(manual, tmp_path, monkeypatch):
    s = open_spool(tmp_path)
    d1 = commit(s, "A", b"a\r\n")
    d2 = commit(s, "B", b"b\r\n")
    d3 = commit(s, "C", b"c\r\n")
    manual.run_next()
    assert result_of(d1).queue_id == "A"
    monkeypatch.setattr(os, "fdatasync", _failing_fdatasync(errno.ENOSPC))
    manual.run_next()
    for d in (d2, d3):
        f = result_of(d)
        assert f.check(SpoolError) and f.value.nospace
    assert [e.queue_id for e in read_spool(str(tmp_path))] == ["A"]


def test_discard_and_commit_release_the_memory_budget(sync, tmp_path):
    s = open_spool(tmp_path)
    w = s.new_message("A")
    w.write(b"x" * 1000)
    w.write(b"y" * 500)
    assert s._memory == 1500
    w2 = s.new_message("B")
    w2.write(b"z" * 300)
    assert s._memory == 1800
    w.discard()
    assert s._memory == 300
    w.discard()
    assert s._memory == 300
    result_of(s.commit(w2, {}))
    assert s._memory == 0


def test_memory_budget_exhausted_spills(sync, tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "MEMORY_BUDGET", 1000)
    s = open_spool(tmp_path)
    w1 = s.new_message("A")
    w1.write(b"a" * 900)
    w2 = s.new_message("B")
    w2.write(b"b" * 200)             # would exceed the budget: goes to a scratch file
    assert w2.spill_fd is not None and s._memory == 900
    w1.discard()
    w2.discard()
    assert s._memory == 0


# -- queue ids ---------------------------------------------------------------------------------

def test_queue_ids_unique_when_the_clock_stalls_or_goes_back():
    now = [1772445600.0]
    ids = QueueIds(clock=lambda: now[0])
    seen = [ids.next() for _ in range(3000)]
    now[0] -= 10
    seen += [ids.next() for _ in range(3000)]
    assert len(set(seen)) == len(seen)
    assert all(i.isalnum() for i in seen)


def test_queue_ids_sort_by_arrival():
    now = [1772445600.0]
    ids = QueueIds(clock=lambda: now[0])
    seq = []
    for _ in range(50):
        seq.append(ids.next())
        now[0] += 0.000001
    assert sorted(seq, key=lambda x: (len(x), x)) == seq


def test_damage_in_the_middle_keeps_the_acknowledged_records_after_it(tmp_path, monkeypatch):
    """Bit rot inside one record must not cost the intact records that follow it."""
    spool_dir = str(tmp_path / "spool")
    import mailsys.spool as spool_mod

    monkeypatch.setattr(spool_mod, "Offload", SyncOffload)
    sp = spool_mod.Spool(spool_dir, reactor=None)
    sp.open()
    ids = []
    for i in range(3):
        w = sp.new_message()
        w.write(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
        ids.append(w.queue_id)
        sp.commit(w, {"sender": "", "recipients": []})
    sp.close()
    (seg,) = [e.segment for e in spool_mod.read_spool(spool_dir)][:1]
    entries = spool_mod.read_spool(spool_dir)
    middle = entries[1]
    with open(seg, "r+b") as f:
        f.seek(middle.message_offset + 2)
        f.write(b"X")
    size = os.path.getsize(seg)
    sp2 = spool_mod.Spool(spool_dir, reactor=None)
    found = sp2.open()
    sp2.close()
    assert [e.queue_id for e in found] == [ids[0], ids[2]]
    assert os.path.getsize(seg) == size          # nothing cut
    assert found[1].read_message() == b"Subject: 2\r\n\r\nbody 2\r\n"


# -- deleting finished segments while running (SegmentReaper) -------------------------------

def test_the_writer_reports_each_segment_it_leaves_with_its_count(sync, tmp_path):
    s = Spool(str(tmp_path / "spool"), reactor=None, segment_limit=1)   # a new segment per flush
    s.open()
    events = []
    s.on_commit.append(lambda e: events.append(("commit", os.path.basename(e.segment))))
    s.on_close.append(lambda path, n: events.append(("close", os.path.basename(path), n)))
    for i in range(3):
        result_of(commit(s, f"Q{i}", b"Subject: x\r\n\r\nbody\r\n", ENVELOPE))
    assert events == [("commit", "00-00000001.seg"),
                      ("close", "00-00000001.seg", 1), ("commit", "00-00000002.seg"),
                      ("close", "00-00000002.seg", 1), ("commit", "00-00000003.seg")]
    s.close()


def _segment(tmp_path, name="01-00000001.seg"):
    path = tmp_path / name
    path.write_bytes(b"x")
    return path


def _reaper_knowing(tmp_path, *qids):
    """A reaper that has been told of ``qids`` in one segment file."""
    path = _segment(tmp_path)
    reaper = spool_mod.SegmentReaper()
    for qid in qids:
        reaper.track(str(path), qid)
    return path, str(path), reaper


def test_reaper_removes_a_segment_closed_with_every_message_seen_and_done(tmp_path):
    path, seg, reaper = _reaper_knowing(tmp_path, "A", "B")
    reaper.done(seg, "A")
    reaper.close(seg, 2)
    assert path.exists()                     # B is still queued
    reaper.done(seg, "B")
    assert not path.exists() and reaper.removed == 1
    reaper.done(seg, "B")                    # told twice: nothing more happens
    assert reaper.removed == 1


def test_reaper_keeps_a_segment_until_it_has_seen_every_message_committed(tmp_path):
    """The writer committed three; a notice still in the pipe (or lost with a
    worker that died) means the queue knows of only two: the segment stays."""
    path, seg, reaper = _reaper_knowing(tmp_path, "A", "B")
    reaper.done(seg, "A")
    reaper.done(seg, "B")
    reaper.close(seg, 3)
    assert path.exists()
    reaper.track(seg, "C")                   # the late notice
    assert path.exists()
    reaper.done(seg, "C")
    assert not path.exists()


def test_reaper_never_removes_a_segment_its_writer_has_not_closed(tmp_path):
    path = _segment(tmp_path)
    reaper = spool_mod.SegmentReaper()
    reaper.track(str(path), "A")
    reaper.done(str(path), "A")
    assert path.exists() and reaper.removed == 0


def test_reaper_survives_a_failing_unlink(tmp_path):
    path = _segment(tmp_path)
    calls = []

    def unlink(p):
        calls.append(p)
        raise PermissionError(errno.EACCES, "denied", p)

    reaper = spool_mod.SegmentReaper(unlink=unlink)
    reaper.close(str(path), 0)               # logged, not raised
    assert calls == [str(path)] and reaper.removed == 0


# -- read_entry: worker 0 reading another worker's fresh record --------------------------------

def _fields(entry):
    return (entry.queue_id, entry.segment, entry.offset, entry.envelope, entry.message_offset,
            entry.message_size, entry.read_message())


@pytest.mark.parametrize("size", [0, 100, spool_mod.ENTRY_READ - 300, spool_mod.ENTRY_READ,
                                  3 * spool_mod.ENTRY_READ + 7])
def test_read_entry_gives_what_the_scan_gives(sync, tmp_path, size):
    s = open_spool(tmp_path / "spool")
    first = result_of(commit(s, "Q1", b"x" * 10, ENVELOPE))
    body = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    entry = result_of(commit(s, "Q2", body, ENVELOPE, chunks=3))
    (seg,) = segment_files(tmp_path / "spool")
    scanned = {e.queue_id: e for e in scan_segment(seg)[0]}
    for e in (first, entry):
        got = spool_mod.read_entry(seg, e.offset)
        assert _fields(got) == _fields(scanned[e.queue_id])
    assert got.read_message() == body


@pytest.mark.parametrize("where", ["magic", "envelope", "message", "truncated", "offset"])
def test_read_entry_refuses_a_record_that_fails_any_check(sync, tmp_path, where):
    s = open_spool(tmp_path / "spool")
    body = b"z" * 5000
    entry = result_of(commit(s, "Q1", body, ENVELOPE))
    (seg,) = segment_files(tmp_path / "spool")
    with open(seg, "r+b") as f:
        if where == "magic":
            f.seek(entry.offset)
            f.write(b"XXXX")
        elif where == "envelope":
            f.seek(entry.offset + HEADER.size + 2)
            f.write(b"#")
        elif where == "message":
            f.seek(entry.message_offset + 4000)
            f.write(b"#")
        elif where == "truncated":
            f.truncate(entry.message_offset + 10)
    offset = entry.offset + 1 if where == "offset" else entry.offset
    assert spool_mod.read_entry(seg, offset) is None
    assert spool_mod.read_entry(seg + ".gone", entry.offset) is None
    assert spool_mod.read_entry(seg, 10 ** 9) is None
