"""The read side of the stores for POP3 (mailsys.pop3.mailbox), on mailboxes
written by the MDA's own stores: sizes, unique ids, reading, the QUIT commit,
locking, and 10,000-message mailboxes."""
import hashlib
import os
import subprocess
import sys
import time

import pytest

from mailsys.mda.maildir import MaildirStore
from mailsys.mda.mbox import MboxStore
from mailsys.mda.store import mailbox_location
from mailsys.pop3 import mailbox as mb
from mailsys.pop3.mailbox import MailboxError, MailboxLock, MaildirBox, MboxBox
from mailsys.pop3.wire import encode
from tests.helpers import append_note, dead_pid, leave_stale_lock

PREFIX = b"Return-Path: <a@b.org>\r\nDelivered-To: joe@example.com\r\n"


def message(i):
    return (b"Subject: m%d\r\n\r\nbody %d\r\nFrom the start\r\n>From quoted\r\n.dot\r\n" % (i, i))


def as_stored(i):
    """(prefix, message) as the MDA hands them to a store: LF line ends."""
    return PREFIX.replace(b"\r\n", b"\n"), message(i).replace(b"\r\n", b"\n")


def stored(i):
    return b"".join(as_stored(i))


def rfc1939_size(data, unquote=False):
    """CRLF octets of a stored message, from the encoder's own output."""
    wire = encode(data, unquote)[:-3]
    return len(wire) - sum(1 for line in wire.split(b"\r\n") if line.startswith(b".."))


def read_all(box, entry):
    r = box.open(entry)
    try:
        return r.read()
    finally:
        r.close()


@pytest.fixture
def maildir(tmp_path):
    path = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    store = MaildirStore()
    for i in range(3):
        assert store.deliver(path, *as_stored(i), 0).delivered
        time.sleep(0.002)   # distinct microsecond stamps: delivery order is listing order
    return path


@pytest.fixture
def mbox(tmp_path):
    path = mailbox_location(str(tmp_path), "box@example.com", "mbox")
    store = MboxStore(lock_timeout=0.2)
    for i in range(3):
        assert store.deliver(path, *as_stored(i), 0, sender="a@b.org", when=1_700_000_000 + i).delivered
    return path


# -- Maildir --------------------------------------------------------------------------

def test_maildir_lists_in_delivery_order_with_wire_sizes_and_base_names(maildir):
    entries = MaildirBox(maildir).load()
    # Delivery order is numeric (seconds, then microseconds: "M99" before "M100"),
    # which a plain string sort gets wrong when the microseconds change length.
    def numeric(name):
        sec, usec = name.split(".")[:2]
        return int(sec), int(usec[1:].split("P")[0])

    names = sorted(os.listdir(os.path.join(maildir, "new")), key=numeric)
    assert [e.uid for e in entries] == names          # base names, no flags yet
    for i, e in enumerate(entries):
        assert e.size == rfc1939_size(stored(i))
        assert e.size == int(e.uid.rsplit("W=", 1)[1])
        assert read_all(MaildirBox(maildir), e) == stored(i)


def test_maildir_size_without_w_is_counted_from_the_file(tmp_path):
    path = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True)
    (path / "new" / "1.a.host").write_bytes(b"A: 1\n\nx\n")
    (path / "cur" / "2.b.host,S=9:2,F").write_bytes(b"B: 2\r\n\r\ny\n")
    (path / "new" / ".hidden").write_bytes(b"ignored")
    entries = MaildirBox(str(path)).load()
    assert [(e.uid, e.size) for e in entries] == [("1.a.host", 11), ("2.b.host,S=9", 11)]


def test_maildir_uid_is_a_digest_when_the_name_is_no_valid_uidl(tmp_path):
    path = tmp_path / "Maildir"
    (path / "new").mkdir(parents=True)
    long = "1." + "x" * 80
    (path / "new" / long).write_bytes(b"a\n")
    (entry,) = MaildirBox(str(path)).load()
    assert entry.uid == hashlib.sha1(long.encode()).hexdigest() and len(entry.uid) == 40


def test_maildir_commit_deletes_and_flags_seen_like_dovecot(maildir):
    box = MaildirBox(maildir)
    e0, e1, e2 = box.load()
    # Another reader flagged message 2 meanwhile (new -> cur with F).
    os.rename(os.path.join(maildir, "new", e2.ref[1]), os.path.join(maildir, "cur", e2.uid + ":2,F"))
    assert box.commit([e0], [e0, e1, e2]) == 0
    assert sorted(os.listdir(os.path.join(maildir, "new"))) == []
    assert sorted(os.listdir(os.path.join(maildir, "cur"))) == sorted([e1.uid + ":2,S", e2.uid + ":2,FS"])
    # Ids and sizes of what remains are unchanged in the next session.
    again = MaildirBox(maildir).load()
    assert [(e.uid, e.size) for e in again] == [(e1.uid, e1.size), (e2.uid, e2.size)]


def test_maildir_commit_finds_a_message_renamed_after_the_listing(maildir):
    box = MaildirBox(maildir)
    e0, _, _ = box.load()
    os.rename(os.path.join(maildir, "new", e0.ref[1]), os.path.join(maildir, "cur", e0.uid + ":2,"))
    assert read_all(box, e0) == stored(0)
    assert box.commit([e0], []) == 0
    assert os.listdir(os.path.join(maildir, "cur")) == []


def test_maildir_message_gone_is_a_mailbox_error_and_deleting_it_is_fine(maildir):
    box = MaildirBox(maildir)
    e0, _, _ = box.load()
    os.unlink(os.path.join(maildir, "new", e0.ref[1]))
    with pytest.raises(MailboxError):
        box.open(e0)
    assert box.commit([e0], [e0]) == 0


def test_maildir_missing_is_empty(tmp_path):
    assert MaildirBox(str(tmp_path / "nothing")).load() == []


def test_maildir_10000_messages_list_from_names_only(tmp_path, monkeypatch):
    path = tmp_path / "Maildir"
    (path / "new").mkdir(parents=True)
    (path / "cur").mkdir()
    for i in range(10_000):
        sub = "new" if i % 2 else "cur"
        suffix = "" if sub == "new" else ":2,S"
        (path / sub / f"{1_700_000_000 + i}.M{i}P1Q{i}.host,S=100,W=104{suffix}").write_bytes(b"")

    def no_reading(*a, **k):
        raise AssertionError("a message file was read to list the mailbox")

    monkeypatch.setattr(mb, "wire_size", no_reading)
    start = time.monotonic()
    entries = MaildirBox(str(path)).load()
    assert time.monotonic() - start < 5
    assert len(entries) == 10_000 and sum(e.size for e in entries) == 1_040_000
    assert [e.uid.split(".")[0] for e in entries[:3]] == ["1700000000", "1700000001", "1700000002"]
    assert len({e.uid for e in entries}) == 10_000


# -- mbox --------------------------------------------------------------------------------

def test_mbox_lists_unquoted_messages_with_wire_sizes(mbox):
    box = MboxBox(mbox)
    entries = box.load()
    try:
        assert len(entries) == 3
        for i, e in enumerate(entries):
            raw = read_all(box, e)
            # as stored: mboxrd-quoted; the encoder unquotes on the way out
            assert raw == stored(i).replace(b"\nFrom the", b"\n>From the").replace(b"\n>From q", b"\n>>From q")
            assert encode(raw, unquote=True) == encode(stored(i))
            assert e.size == rfc1939_size(stored(i))
        assert len({e.uid for e in entries}) == 3
        assert [e.uid for e in MboxBox(mbox).load()] == [e.uid for e in entries]
    finally:
        box.close()


def test_mbox_identical_records_get_distinct_ids(tmp_path):
    path = tmp_path / "mbox"
    record = b"From a@b.org Thu Jan  1 00:00:00 2026\nSubject: same\n\nbody\n\n"
    path.write_bytes(record * 3)
    box = MboxBox(str(path))
    uids = [e.uid for e in box.load()]
    box.close()
    digest = hashlib.sha1(record).hexdigest()
    assert uids == [digest, digest + "-2", digest + "-3"]


def test_mbox_commit_rewrites_without_deleted_and_keeps_later_appends(mbox):
    box = MboxBox(mbox)
    e0, e1, e2 = box.load()
    # A delivery after the login: it must survive the rewrite.
    assert MboxStore().deliver(mbox, *as_stored(3), 0, sender="a@b.org").delivered
    ino = os.stat(mbox).st_ino
    assert box.commit([e1], [e0]) == 0
    box.close()
    assert os.stat(mbox).st_ino != ino                       # replaced by rename
    assert oct(os.stat(mbox).st_mode & 0o777) == "0o600"
    assert not os.path.exists(mbox + ".lock")
    assert MboxStore().messages(mbox) == [stored(0), stored(2), stored(3)]
    again = MboxBox(mbox)
    uids = [e.uid for e in again.load()]
    again.close()
    assert uids[:2] == [e0.uid, e2.uid]


def test_mbox_login_removes_copies_that_killed_rewrites_left(mbox):
    """A rewrite killed before its rename leaves its copy beside the mbox; the
    next login removes it (and only it: another file's copies stay)."""
    home = os.path.dirname(mbox)
    with open(os.path.join(home, ".mbox.pop3.k1ll3d.tmp"), "wb") as f:
        f.write(open(mbox, "rb").read()[:100])
    open(os.path.join(home, ".mbox.pop3.empty.tmp"), "wb").close()
    for other in (".mbox2.pop3.x.tmp", ".mbox.pop3.x.kept", "mbox.pop3.x.tmp"):
        open(os.path.join(home, other), "wb").close()
    box = MboxBox(mbox)
    assert len(box.load()) == 3
    box.close()
    assert sorted(os.listdir(home)) == [".mbox.pop3.x.kept", ".mbox2.pop3.x.tmp", "mbox",
                                        "mbox.pop3.x.tmp"]
    assert MboxStore().messages(mbox) == [stored(0), stored(1), stored(2)]


def test_mbox_commit_refuses_when_another_program_replaced_the_file(mbox):
    box = MboxBox(mbox)
    e0, _, _ = box.load()
    data = open(mbox, "rb").read()
    os.unlink(mbox)
    with open(mbox, "wb") as f:
        f.write(data)
    with pytest.raises(MailboxError):
        box.commit([e0], [])
    box.close()
    assert MboxStore().messages(mbox)[0] == stored(0)
    assert not os.path.exists(mbox + ".lock")


def records(path):
    """The records of an mbox file as bytes, in file order (each from its
    ``From `` line up to the next one)."""
    data = open(path, "rb").read()
    starts = [0] + [m + 1 for m in range(len(data)) if data.startswith(b"\nFrom ", m)]
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def rewrite_in_place(path, data):
    """What Dovecot, mutt or s-nail do: the same file (inode) with other bytes."""
    ino = os.stat(path).st_ino
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    assert os.stat(path).st_ino == ino


def add_fields(record, fields):
    """``record`` with header ``fields`` added at the end of its header."""
    head, _, rest = record.partition(b"\n\n")
    return head + b"\n" + fields + b"\n" + rest


def test_mbox_uidl_of_a_record_without_status_fields_is_the_sha1_of_its_bytes(mbox):
    """Existing mailboxes keep their UIDLs: for a record without any field that
    other readers rewrite, the UIDL is the SHA-1 of the whole record, as it
    always was."""
    box = MboxBox(mbox)
    entries = box.load()
    box.close()
    assert [e.uid for e in entries] == [hashlib.sha1(r).hexdigest() for r in records(mbox)]
    record = (b"From a@b.org Sat Nov 14 22:13:20 2023\nReturn-Path: <a@b.org>\n"
              b"Subject: unchanged\n\nStatus: RO in the body is the message's own\n\n")
    with open(mbox, "wb") as f:
        f.write(record)
    box = MboxBox(mbox)
    assert [e.uid for e in box.load()] == ["afd87b29acf4b6e905dc9f739502507e1e368a17"]
    box.close()
    assert hashlib.sha1(record).hexdigest() == "afd87b29acf4b6e905dc9f739502507e1e368a17"


def test_mbox_uidl_leaves_out_the_fields_other_readers_write(mbox):
    """Dovecot (X-IMAPbase, X-UID, Status, X-Status, X-Keywords with its padding,
    Content-Length, X-IMAP) and mutt (Status, X-Status, Lines) edit headers in
    place; the UIDLs stay.  Any other change to a record changes its UIDL."""
    box = MboxBox(mbox)
    before = [e.uid for e in box.load()]
    box.close()
    r0, r1, r2 = records(mbox)
    edited = [
        add_fields(r0, b"X-IMAPbase: 1700000000 0000000003\nX-UID: 1\nStatus: RO\n"
                       b"X-Keywords:                                   \n"
                       b"\t$Label1 $Forwarded\nContent-Length: 93\n"),
        add_fields(r1, b"status: O\nX-STATUS: A\nLines: 6\nx-uid : 2\n"),
        add_fields(r2, b"X-IMAP: 1700000000 0000000003\nX-Status: \n  F\n"),
    ]
    rewrite_in_place(mbox, b"".join(edited))
    box = MboxBox(mbox)
    assert [e.uid for e in box.load()] == before
    box.close()
    others = [
        add_fields(r0, b"X-Spam-Status: No\n"),          # another field, ending like one
        add_fields(r1, b"Statusx: O\n"),
        r2.replace(b"\n\nbody 2", b"\n\nStatus: RO\nbody 2"),   # in the body: the message's own
    ]
    rewrite_in_place(mbox, b"".join(others))
    box = MboxBox(mbox)
    after = [e.uid for e in box.load()]
    box.close()
    assert [a != b for a, b in zip(after, before)] == [True, True, True]


def test_mbox_rewritten_in_place_is_never_sent_nor_deleted_in_place_of_another(mbox):
    """Another program expunged message 2 in place (same inode) and a delivery
    made the file as long as before: the offsets of message 2 now hold message
    3.  Neither reading nor deleting message 2 may touch message 3."""
    box = MboxBox(mbox)
    e0, e1, e2 = box.load()
    r0, r1, r2 = records(mbox)
    r3 = r2.replace(b"m2", b"m3").replace(b"body 2", b"body 3")
    assert len(r3) == len(r1)
    rewrite_in_place(mbox, r0 + r2 + r3)
    assert read_all(box, e0) == r0[r0.index(b"\n") + 1:-1]          # unchanged: still readable
    for entry in (e1, e2):
        with pytest.raises(MailboxError) as e:
            box.open(entry)
        assert str(e.value) == "mbox was changed by another program since the login"
    with pytest.raises(MailboxError) as e:
        box.commit([e1], [])
    assert str(e.value) == ("mbox was changed by another program since the login "
                            "(message 2 is not what was listed)")
    box.close()
    assert open(mbox, "rb").read() == r0 + r2 + r3
    assert sorted(os.listdir(os.path.dirname(mbox))) == ["mbox"]   # no lock, no copy left


def test_mbox_commit_checks_the_kept_records_and_where_the_listing_ended(mbox):
    box = MboxBox(mbox)
    e0, e1, e2 = box.load()
    r0, r1, r2 = records(mbox)
    # A header added to a kept message: everything after it moved.
    rewrite_in_place(mbox, r0 + r1 + add_fields(r2, b"Status: RO\n"))
    with pytest.raises(MailboxError) as e:
        box.commit([e0], [])
    assert str(e.value) == ("mbox was changed by another program since the login "
                            "(message 3 is not what was listed)")
    # The scanned bytes are back, but the last record was extended without a
    # "From " line: the end of the listing is no record boundary any more.
    rewrite_in_place(mbox, r0 + r1 + r2 + b"more of message 3\n")
    with pytest.raises(MailboxError) as e:
        box.commit([e2], [])
    assert str(e.value) == ("mbox was changed by another program since the login "
                            "(no message starts where the listing ended)")
    assert open(mbox, "rb").read() == r0 + r1 + r2 + b"more of message 3\n"
    # Bytes before the first record count too.
    rewrite_in_place(mbox, r0 + r1 + r2)
    box.close()
    with open(mbox, "wb") as f:
        f.write(b"junk\n" + r0 + r1 + r2)
    box = MboxBox(mbox)
    e0, _, _ = box.load()
    rewrite_in_place(mbox, b"JUNK\n" + r0 + r1 + r2)
    with pytest.raises(MailboxError) as e:
        box.commit([e0], [])
    assert str(e.value) == ("mbox was changed by another program since the login "
                            "(the text before the first message is not what was listed)")
    rewrite_in_place(mbox, b"junk\n" + r0 + r1 + r2)
    assert box.commit([e0], []) == 0
    box.close()
    assert open(mbox, "rb").read() == b"junk\n" + r1 + r2


def test_mbox_change_during_a_transfer_ends_it_before_its_last_bytes(mbox):
    """The check at open and the transfer are apart in time: bytes rewritten in
    between make the reader fail before it hands out the record's last bytes,
    so the reply never gets its final dot."""
    box = MboxBox(mbox)
    _, e1, _ = box.load()
    r0, r1, r2 = records(mbox)
    reader = box.open(e1)
    first = reader.read(10)
    assert first == r1[r1.index(b"\n") + 1:][:10]
    rewrite_in_place(mbox, r0 + r1.replace(b"body 1", b"body X") + r2)
    with pytest.raises(MailboxError) as e:
        reader.read()
    assert str(e.value) == "mbox was changed by another program since the login"
    box.close()


def test_mbox_lock_held_too_long_is_mailbox_busy(mbox):
    now = [1000.0]

    def sleep(s):
        now[0] += s

    with open(mbox + ".lock", "w") as f:
        f.write("99999\n")
    box = MboxBox(mbox, clock=lambda: now[0], sleep=sleep)
    with pytest.raises(mb.MailboxBusy) as e:
        box.load()
    assert str(e.value) == (f"mbox is locked by another program: {mbox}.lock was held for "
                            f"more than 10 s")
    assert now[0] >= 1010.0 and open(mbox + ".lock").read() == "99999\n"


def test_mbox_waits_for_the_mda_dotlock_then_gives_up(mbox):
    open(mbox + ".lock", "w").close()
    box = MboxBox(mbox, lock_timeout=0.2)
    start = time.monotonic()
    with pytest.raises(MailboxError):
        box.load()
    assert 0.15 < time.monotonic() - start < 2
    assert os.path.exists(mbox + ".lock")    # someone else's lock is left alone


TORN = b"Subject: torn\n\nfirst paragraph\n\nsecond paragraph\n"


def leave_torn_append(mbox, pid):
    """An append of TORN killed right after its first paragraph, as the MDA's
    stale dotlock describes it; the bytes the mbox held before."""
    complete = open(mbox, "rb").read()
    record = MboxStore()._record(b"", TORN, "a@b.org", 0)
    with open(mbox, "ab") as f:
        f.write(record[:record.index(b"first paragraph\n\n") + len(b"first paragraph\n\n")])
    leave_stale_lock(mbox, append_note(pid, len(complete), len(complete) + len(record)))
    return complete


def test_mbox_login_that_removes_a_killed_appends_lock_cuts_what_it_left(mbox, monkeypatch):
    """The MDA was killed in the middle of an append, and a login is the first
    to take the mbox once the lock is stale: the torn record (cut after a
    blank line, so it looks complete) is cut before the scan, and durably, not
    listed as a fourth message."""
    complete = leave_torn_append(mbox, dead_pid())
    flushed = []
    real = os.fsync

    def fsync(fd):
        flushed.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        return real(fd)

    monkeypatch.setattr(mb.os, "fsync", fsync)
    box = MboxBox(mbox)
    entries = box.load()
    box.close()
    assert flushed == [(mbox, len(complete))]
    assert len(entries) == 3
    assert open(mbox, "rb").read() == complete
    assert not os.path.exists(mbox + ".lock")
    assert MboxStore().messages(mbox) == [stored(i) for i in range(3)]


def test_mbox_login_leaves_the_append_of_a_live_lock_holder(mbox):
    complete = leave_torn_append(mbox, os.getpid())
    size = os.path.getsize(mbox)
    box = MboxBox(mbox)
    entries = box.load()
    box.close()
    assert len(entries) == 4 and os.path.getsize(mbox) == size
    assert open(mbox, "rb").read().startswith(complete)


def test_mbox_login_goes_on_when_the_cut_fails(mbox, monkeypatch):
    leave_torn_append(mbox, dead_pid())
    size = os.path.getsize(mbox)

    def refuse(fd, length):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mb.os, "ftruncate", refuse)
    box = MboxBox(mbox)
    assert len(box.load()) == 4
    box.close()
    assert os.path.getsize(mbox) == size and not os.path.exists(mbox + ".lock")


def test_mbox_missing_is_empty(tmp_path):
    box = MboxBox(str(tmp_path / "mbox"))
    assert box.load() == []
    assert box.commit([], []) == 0


def test_mbox_10000_messages_scan_once(tmp_path):
    path = mailbox_location(str(tmp_path), "big@example.com", "mbox")
    store = MboxStore()
    items = [(path, *as_stored(i), 0, "a@b.org", 1_700_000_000) for i in range(10_000)]
    assert all(o.delivered for o in store.deliver_many(items))
    box = MboxBox(path)
    start = time.monotonic()
    entries = box.load()
    elapsed = time.monotonic() - start
    try:
        assert len(entries) == 10_000 and len({e.uid for e in entries}) == 10_000
        assert elapsed < 10, elapsed
        assert read_all(box, entries[9_999]).startswith(b"Return-Path: <a@b.org>\nDelivered-To")
        assert sum(e.size for e in entries) == sum(rfc1939_size(stored(i)) for i in range(10_000))
    finally:
        box.close()


# -- the one-session lock -----------------------------------------------------------------

def test_mailbox_lock_is_exclusive_and_released(tmp_path):
    a, b = MailboxLock(str(tmp_path)), MailboxLock(str(tmp_path))
    assert a.acquire() is True
    assert b.acquire() is False
    a.release()
    assert b.acquire() is True
    b.release()


def test_mailbox_lock_excludes_another_process(tmp_path):
    lock = MailboxLock(str(tmp_path))
    assert lock.acquire()
    code = ("import sys; from mailsys.pop3.mailbox import MailboxLock; "
            "print(MailboxLock(sys.argv[1]).acquire())")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.stdout == "False\n", out.stderr
    lock.release()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.stdout == "True\n", out.stderr
