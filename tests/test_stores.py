"""The store contract: the same tests on Maildir, mbox and the in-memory fake."""
import errno
import mailbox
import os
import subprocess

import pytest

from mailsys.delivery import Delivered, PermFail, TempFail
from mailsys.mda.maildir import MaildirStore
from mailsys.mda import mbox as mbox_module
from mailsys.mda.mbox import MboxStore, quote, read_append_note, take_dotlock, unquote
from mailsys.mda.memory import MemoryStore
from mailsys.mda.store import IMailStore, UnsafeMailbox, mailbox_location
from mailsys.smtp.reply import Reply
from tests.helpers import append_note as note
from tests.helpers import dead_pid, leave_stale_lock

# The contract: prefix and message arrive with LF line ends (the MDA's DATA reader
# converted them) and are stored as they are.
PREFIX = b"Return-Path: <a@b.org>\nDelivered-To: joe@example.com\n"
MESSAGE = b"Subject: hi\n\nline one\nFrom here\n>From there\n.dot\n"
STORED = PREFIX + MESSAGE


@pytest.fixture(params=["maildir", "mbox", "memory"])
def store(request, tmp_path):
    kind = request.param
    s = {"maildir": MaildirStore, "mbox": lambda: MboxStore(lock_timeout=0.2),
         "memory": MemoryStore}[kind]()
    location = mailbox_location(str(tmp_path), "joe@example.com", "maildir" if kind != "mbox" else "mbox")
    return s, location


def test_provides_interface(store):
    s, _ = store
    assert IMailStore.providedBy(s)


def test_deliver_then_read_back_exactly(store):
    s, loc = store
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender="a@b.org") == Delivered()
    assert s.messages(loc) == [STORED]


def test_many_messages_keep_order_and_bytes(store):
    s, loc = store
    bodies = [b"Subject: %d\n\nFrom %d\n" % (i, i) for i in range(30)]
    for b in bodies:
        assert s.deliver(loc, b"", b, 0).delivered
    got = s.messages(loc)
    assert len(got) == 30
    assert sorted(got) == sorted(bodies)


def test_size_grows_with_deliveries(store):
    s, loc = store
    assert s.size(loc) == 0
    s.deliver(loc, PREFIX, MESSAGE, 0)
    first = s.size(loc)
    assert first >= len(STORED)
    s.deliver(loc, PREFIX, MESSAGE, 0)
    assert s.size(loc) >= 2 * len(STORED)


def test_quota_refuses_only_the_message_that_would_exceed_it(store):
    s, loc = store
    assert s.deliver(loc, PREFIX, MESSAGE, 0).delivered
    cost = s.size(loc)                 # one message as this store keeps it
    quota = cost * 2 + cost // 2       # room for two, not three
    assert s.deliver(loc, PREFIX, MESSAGE, quota).delivered
    outcome = s.deliver(loc, PREFIX, MESSAGE, quota)
    assert outcome == PermFail(Reply(552, "5.2.2", "Mailbox full: over quota"))
    assert len(s.messages(loc)) == 2


def test_maildir_layout_and_names(tmp_path):
    s = MaildirStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    assert loc == str(tmp_path / "example.com" / "joe" / "Maildir")
    assert s.deliver(loc, PREFIX, MESSAGE, 0).delivered
    for sub in ("tmp", "new", "cur"):
        assert oct(os.stat(os.path.join(loc, sub)).st_mode & 0o777) == "0o700"
    assert os.listdir(os.path.join(loc, "tmp")) == []
    (name,) = os.listdir(os.path.join(loc, "new"))
    sec, rest = name.split(".", 1)
    assert sec.isdigit() and rest.startswith("M") and "P%d" % os.getpid() in rest
    vsize = len(STORED) + STORED.count(b"\n")
    assert name.endswith(f",S={len(STORED)},W={vsize}")
    # Python's own Maildir reader sees exactly our bytes.
    (msg,) = list(mailbox.Maildir(loc, factory=None))
    assert msg.as_bytes().replace(b"\r\n", b"\n") == STORED or bytes(msg) == STORED


def test_maildir_names_carry_a_forked_childs_own_pid():
    """The pid in a name is kept, not asked for each time: a forked child must
    still name its files with its own pid, or two processes could clash."""
    s = MaildirStore()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:        # the child: write one name, leave at once
        try:
            os.write(w, s._unique(1, 1).encode())
        finally:
            os._exit(0)
    os.close(w)
    name = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert f"P{pid}Q" in name and f"P{os.getpid()}Q" in s._unique(1, 1)


def test_maildir_sizes_of_one_message_shared_by_mailboxes(tmp_path):
    """The line ends of a message are counted once for all its mailboxes; each
    name still carries its own prefix's sizes."""
    s = MaildirStore()
    joe, ann = (mailbox_location(str(tmp_path), a, "maildir") for a in ("joe@example.com", "ann@x.org"))
    other = b"Return-Path: <>\nDelivered-To: ann@x.org\nX-Extra: 1\n"
    assert all(o.delivered for o in s.deliver_many([(joe, PREFIX, MESSAGE, 0, "a@b.org", None),
                                                    (ann, other, MESSAGE, 0, "a@b.org", None)]))
    for loc, stored in ((joe, STORED), (ann, other + MESSAGE)):
        (name,) = os.listdir(os.path.join(loc, "new"))
        crlf_size = len(stored) + stored.count(b"\n")
        assert name.endswith(f",S={len(stored)},W={crlf_size}")
        assert s.messages(loc) == [stored]


def test_maildir_never_overwrites(tmp_path, monkeypatch):
    s = MaildirStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    names = iter(["1.M1P1Q1.h,S=1,W=1", "1.M1P1Q1.h,S=1,W=1", "1.M1P1Q2.h,S=1,W=1"])
    monkeypatch.setattr(s, "_unique", lambda size, vsize: next(names))
    assert s.deliver(loc, b"", b"a\n", 0).delivered
    assert s.deliver(loc, b"", b"b\n", 0).delivered   # first pick collides, second is new
    assert sorted(os.listdir(os.path.join(loc, "new"))) == ["1.M1P1Q1.h,S=1,W=1", "1.M1P1Q2.h,S=1,W=1"]
    with open(os.path.join(loc, "new", "1.M1P1Q1.h,S=1,W=1"), "rb") as f:
        assert f.read() == b"a\n"


def test_mbox_format_and_mboxrd_quoting(tmp_path):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    s.deliver(loc, PREFIX, MESSAGE, 0, sender="a@b.org", when=0)
    s.deliver(loc, b"", b"Subject: 2\n\nFrom x\n", 0, sender="", when=0)
    with open(loc, "rb") as f:
        data = f.read()
    assert data.startswith(b"From a@b.org Thu Jan  1 00:00:00 1970\n")
    assert b"\n>From here\n>>From there\n" in data
    assert b"\n\nFrom MAILER-DAEMON Thu Jan  1 00:00:00 1970\n" in data
    assert data.endswith(b"\n>From x\n\n")
    got = list(mailbox.mbox(loc))
    assert len(got) == 2
    assert got[0]["Subject"] == "hi"
    assert s.messages(loc)[0] == STORED


@pytest.mark.parametrize("line", [b"From x", b">From x", b">>>From x", b"Fromx", b" From x"])
def test_mboxrd_quote_round_trip(line):
    assert unquote(quote(line + b"\n")) == line + b"\n"


def test_mbox_truncates_back_on_write_error(tmp_path, monkeypatch):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0).delivered
    before = os.path.getsize(loc)

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    outcome = s.deliver(loc, PREFIX, MESSAGE, 0)
    monkeypatch.undo()
    assert outcome == TempFail(Reply(452, "4.3.1", "Insufficient system storage for mailbox"))
    assert os.path.getsize(loc) == before
    assert not os.path.exists(loc + ".lock")
    assert len(s.messages(loc)) == 1


def test_mbox_lock_wait_is_bounded(tmp_path):
    s = MboxStore(lock_timeout=0.1)
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    os.makedirs(os.path.dirname(loc))
    open(loc + ".lock", "w").close()   # someone else holds the dotlock
    outcome = s.deliver(loc, PREFIX, MESSAGE, 0)
    assert outcome == TempFail(Reply(451, "4.2.0", "Mailbox busy: could not lock it in time"))
    assert not os.path.exists(loc)


def test_mbox_stale_dotlock_is_removed(tmp_path):
    s = MboxStore(lock_timeout=0.1)
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    os.makedirs(os.path.dirname(loc))
    open(loc + ".lock", "w").close()
    old = os.path.getmtime(loc + ".lock") - 301
    os.utime(loc + ".lock", (old, old))
    assert s.deliver(loc, PREFIX, MESSAGE, 0).delivered
    assert not os.path.exists(loc + ".lock")


@pytest.mark.parametrize("fail_on", [1, 2])
def test_maildir_disk_error_leaves_nothing_visible(tmp_path, fail_on):
    """The fault is injected at the store's flush seam: the first flush (message
    data in tmp/) or the second (the new/ entry)."""
    calls = []

    def flush(paths):
        calls.append(paths)
        if len(calls) == fail_on:
            raise OSError(errno.EIO, "Input/output error")

    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    assert MaildirStore().deliver(loc, b"", b"ok\n", 0).delivered
    outcome = MaildirStore(flush=flush).deliver(loc, PREFIX, MESSAGE, 0)
    assert outcome == TempFail(Reply(451, "4.3.0", "Local I/O error writing mailbox"))
    assert os.listdir(os.path.join(loc, "tmp")) == []
    assert len(os.listdir(os.path.join(loc, "new"))) == (1 if fail_on == 1 else 2)


def test_maildir_batch_flushes_twice_for_many_messages(tmp_path):
    calls = []

    def flush(paths):
        calls.append(list(paths))

    s = MaildirStore(flush=flush)
    locs = [mailbox_location(str(tmp_path), f"u{i}@example.com", "maildir") for i in range(3)]
    for loc in locs:
        assert MaildirStore().deliver(loc, b"", b"first\n", 0).delivered
    items = [(loc, PREFIX, MESSAGE, 0, "a@b.org", None) for loc in locs for _ in range(4)]
    assert all(o.delivered for o in s.deliver_many(items))
    assert len(calls) == 2
    assert len(calls[0]) == 12 and all("/tmp/" in p for p in calls[0])
    assert calls[1] == sorted(os.path.join(loc, "new") for loc in locs)
    assert [len(os.listdir(os.path.join(loc, "new"))) for loc in locs] == [5, 5, 5]


def test_maildir_first_delivery_makes_its_new_directories_durable_first(tmp_path):
    """A new mailbox's directories are entries of their parents: without a flush
    of each parent, a power failure could take the whole Maildir, and the
    acknowledged message with it.  They are flushed before the message's own
    flushes; an existing mailbox costs nothing more."""
    calls = []
    s = MaildirStore(flush=lambda paths: calls.append(list(paths)))
    root = str(tmp_path / "mail")
    loc = mailbox_location(root, "joe@example.com", "maildir")
    assert s.deliver(loc, PREFIX, MESSAGE, 0).delivered
    (name,) = os.listdir(os.path.join(loc, "new"))
    assert calls == [
        [str(tmp_path), root, os.path.join(root, "example.com"),
         os.path.join(root, "example.com", "joe"), loc],
        [os.path.join(loc, "tmp", name)],
        [os.path.join(loc, "new")],
    ]
    calls.clear()
    assert s.deliver(loc, PREFIX, MESSAGE, 0).delivered
    assert [len(c) for c in calls] == [1, 1]


def test_maildir_failing_directory_flush_refuses_the_message(tmp_path):
    def flush(paths):
        if any(p.endswith("Maildir") for p in paths):
            raise OSError(errno.EIO, "Input/output error")

    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    outcome = MaildirStore(flush=flush).deliver(loc, PREFIX, MESSAGE, 0)
    assert outcome == TempFail(Reply(451, "4.3.0", "Local I/O error writing mailbox"))
    assert os.listdir(os.path.join(loc, "tmp")) == [] and os.listdir(os.path.join(loc, "new")) == []


def test_maildir_recreated_after_removal(tmp_path):
    import shutil

    s = MaildirStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    assert s.deliver(loc, b"", b"a\n", 0).delivered
    shutil.rmtree(os.path.dirname(loc))
    assert s.deliver(loc, b"", b"b\n", 0).delivered
    assert s.messages(loc) == [b"b\n"]


@pytest.mark.parametrize("address", ["../x@example.com", "a/b@example.com", ".hidden@example.com",
                                     "a\x00b@example.com", "x@../etc", "x@a/b", "x@.", "@example.com",
                                     "a" * 300 + "@example.com"])
def test_mailbox_location_refuses_escapes(tmp_path, address):
    with pytest.raises(UnsafeMailbox):
        mailbox_location(str(tmp_path), address, "maildir")


def test_mailbox_location_is_lowercase_and_under_root(tmp_path):
    assert mailbox_location(str(tmp_path), "Joe@Example.COM", "mbox") == \
        str(tmp_path / "example.com" / "joe" / "mbox")


def test_mbox_cuts_the_torn_tail_of_a_killed_append(tmp_path):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender="a@b.org").delivered
    complete = open(loc, "rb").read()
    with open(loc, "ab") as f:        # what kill -9 in the middle of an append leaves
        f.write(b"From a@b.org Thu Jan  1 00:00:00 1970\nSubject: half\n\nhalf a mess")
    assert s.deliver(loc, b"", b"Subject: after\n\nafter\n", 0, sender="a@b.org").delivered
    data = open(loc, "rb").read()
    assert data.startswith(complete) and b"half a mess" not in data
    assert s.messages(loc) == [STORED, b"Subject: after\n\nafter\n"]


def test_mbox_cuts_a_torn_append_longer_than_a_mib(tmp_path):
    """The kill -9 test once left 1.3 MB of a 1.5 MB append: the search for the
    record's start must go back as far as the append went."""
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender="a@b.org").delivered
    complete = open(loc, "rb").read()
    with open(loc, "ab") as f:
        f.write(b"From a@b.org Thu Jan  1 00:00:00 1970\nSubject: big\n\n"
                + b"0123456789abcdefghijklmnopqrstuvwxyz body line of a big message\n" * 20_000)
    assert os.path.getsize(loc) - len(complete) > 1 << 20
    assert s.deliver(loc, b"", b"Subject: after\n\nafter\n", 0, sender="a@b.org").delivered
    assert open(loc, "rb").read().startswith(complete)
    assert s.messages(loc) == [STORED, b"Subject: after\n\nafter\n"]


@pytest.mark.parametrize("window", range(14, 48))
def test_mbox_torn_tail_found_whatever_the_window(tmp_path, monkeypatch, window):
    """Small windows make the search take several steps, the record's start
    falling across a window boundary in many of them."""
    from mailsys.mda import mbox as mbox_module

    monkeypatch.setattr(mbox_module, "TORN_TAIL_WINDOW", window)
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender="a@b.org").delivered
    complete = open(loc, "rb").read()
    with open(loc, "ab") as f:
        f.write(b"From a@b.org Thu Jan  1 00:00:00 1970\nSubject: half\n\nhalf a message, torn")
    assert s.deliver(loc, b"", b"Subject: after\n\nafter\n", 0, sender="a@b.org").delivered
    assert open(loc, "rb").read().startswith(complete)
    assert s.messages(loc) == [STORED, b"Subject: after\n\nafter\n"]


def test_last_record_start_across_every_boundary(tmp_path):
    """Every position of the marker against every window size: the overlap of
    the windows finds it wherever a boundary cuts it; a window too small to
    move back is widened rather than looping."""
    from mailsys.mda.mbox import _last_record_start

    path = tmp_path / "box"
    for before in range(0, 40):
        data = b"From x\n" + b"a" * before + b"\n\nFrom y\n" + b"b" * 13
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            for window in range(1, 30):
                assert _last_record_start(fd, len(data), window) == 7 + before + 2, (before, window)
        finally:
            os.close(fd)
    path.write_bytes(b"no record here\n" * 5)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _last_record_start(fd, 75, 16) is None
    finally:
        os.close(fd)


def test_mbox_foreign_file_longer_than_the_window_is_kept(tmp_path, monkeypatch):
    from mailsys.mda import mbox as mbox_module

    monkeypatch.setattr(mbox_module, "TORN_TAIL_WINDOW", 16)
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    os.makedirs(os.path.dirname(loc))
    foreign = b"Some text that is not an mbox record\n\nnor is this, From anyone\n" * 3
    with open(loc, "wb") as f:
        f.write(foreign)
    assert s.deliver(loc, b"", b"Subject: x\n\nx\n", 0).delivered
    assert open(loc, "rb").read().startswith(foreign + b"\nFrom ")


def test_mbox_torn_first_record_is_cut_entirely(tmp_path):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    os.makedirs(os.path.dirname(loc))
    with open(loc, "wb") as f:
        f.write(b"From a@b.org Thu Jan  1 00:00:00 1970\nSubject: half\n\nhal")
    assert s.deliver(loc, b"", b"Subject: x\n\nx\n", 0).delivered
    assert s.messages(loc) == [b"Subject: x\n\nx\n"]


def test_mbox_foreign_file_without_final_blank_line_is_kept(tmp_path):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    os.makedirs(os.path.dirname(loc))
    foreign = b"Some text that is not an mbox record\n"
    with open(loc, "wb") as f:
        f.write(foreign)
    assert s.deliver(loc, b"", b"Subject: x\n\nx\n", 0).delivered
    data = open(loc, "rb").read()
    assert data.startswith(foreign + b"\nFrom ")


# -- a killed append, told by the note in its dotlock ------------------------------------

SENDER = "a@b.org"
WHEN = 0
TWO = b"Subject: two\n\nfirst paragraph\n\nsecond paragraph\nFrom the end\n\n"
AFTER = b"Subject: after\n\nafter\n"


def test_mbox_append_writes_where_each_record_begins_into_its_dotlock(tmp_path, monkeypatch):

    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender=SENDER).delivered
    size = os.path.getsize(loc)
    seen = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        with open(loc + ".lock", "rb") as f:
            seen.append(f.read())
        return real(fd, data, offset)

    monkeypatch.setattr(mbox_module.os, "pwrite", pwrite)
    one, two = s._record(b"", AFTER, SENDER, WHEN), s._record(b"", TWO, SENDER, WHEN)
    assert [o.delivered for o in s.deliver_many([(loc, b"", AFTER, 0, SENDER, WHEN),
                                                 (loc, b"", TWO, 0, SENDER, WHEN)])] == [True, True]
    head = b"%d\nmailsys %s\n" % (os.getpid(), mbox_module._HOST)
    assert seen == [head + b"mailsys-append %d %d %d\n" % (size, size + len(one), size + len(one) + len(two))]
    assert not os.path.exists(loc + ".lock")


def test_mbox_append_killed_at_any_byte_is_cut_back_by_the_note(tmp_path):
    """Every length the killed append may have reached, including those right
    after one of its blank lines, which look like a complete record without
    the note."""
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender=SENDER).delivered
    complete = open(loc, "rb").read()
    record = s._record(b"", TWO, SENDER, WHEN)
    pid = dead_pid()
    for k in range(1, len(record)):
        with open(loc, "wb") as f:
            f.write(complete + record[:k])
        leave_stale_lock(loc, note(pid, len(complete), len(complete) + len(record)))
        assert s.deliver(loc, b"", AFTER, 0, sender=SENDER).delivered, k
        assert s.messages(loc) == [STORED, AFTER], k
        assert open(loc, "rb").read().startswith(complete)


def test_mbox_note_of_a_batch_keeps_the_records_it_finished(tmp_path):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender=SENDER).delivered
    complete = open(loc, "rb").read()
    records = [s._record(b"", m, SENDER, WHEN) for m in (AFTER, TWO, TWO)]
    offsets = [len(complete), len(complete) + len(records[0]), len(complete) + len(records[0]) + len(records[1])]
    end = offsets[-1] + len(records[2])
    pid = dead_pid()
    for cut, kept in ((offsets[2] + 40, [AFTER, TWO]), (offsets[2], [AFTER, TWO]), (offsets[1] + 1, [AFTER])):
        with open(loc, "wb") as f:
            f.write((complete + b"".join(records))[:cut])
        leave_stale_lock(loc, note(pid, *offsets, end))
        assert s.deliver(loc, b"", b"Subject: x\n\nx\n", 0, sender=SENDER).delivered
        assert s.messages(loc) == [STORED, *kept, b"Subject: x\n\nx\n"], cut


def test_mbox_note_never_cuts_mail_another_program_appended_after_the_crash(tmp_path):
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender=SENDER).delivered
    complete = open(loc, "rb").read()
    record = s._record(b"", TWO * 20, SENDER, WHEN)
    torn = record[:record.index(b"\n\n") + 2]          # the header, then a blank line
    theirs = b"From other@example.org Thu Jan  1 00:00:00 1970\nSubject: theirs\n\ntheirs\n\n"
    with open(loc, "wb") as f:
        f.write(complete + torn + theirs)
    assert len(complete + torn + theirs) < len(complete) + len(record)
    leave_stale_lock(loc, note(dead_pid(), len(complete), len(complete) + len(record)))
    assert s.deliver(loc, b"", AFTER, 0, sender=SENDER).delivered
    assert open(loc, "rb").read().startswith(complete + torn + theirs)
    assert s.messages(loc)[-2:] == [b"Subject: theirs\n\ntheirs\n", AFTER]


def test_mbox_note_of_a_live_holder_is_not_acted_on(tmp_path):
    """A holder past STALE_DOTLOCK that still runs may still be writing."""
    s = MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender=SENDER).delivered
    complete = open(loc, "rb").read()
    record = s._record(b"", TWO, SENDER, WHEN)
    torn = record[:record.index(b"\n\n") + 2]
    with open(loc, "wb") as f:
        f.write(complete + torn)
    leave_stale_lock(loc, note(os.getpid(), len(complete), len(complete) + len(record)))
    assert s.deliver(loc, b"", AFTER, 0, sender=SENDER).delivered
    assert open(loc, "rb").read().startswith(complete + torn)


def test_a_zombie_holder_is_dead():
    from mailsys.mda.mbox import _alive

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert _alive(child.pid)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)    # dead, not reaped: a zombie
        assert not _alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not _alive(child.pid)
    assert _alive(os.getpid()) and _alive(1) and _alive(0) and _alive(-5)


@pytest.mark.parametrize("content", [
    b"%d\nmailsys-append 10 20\n",
    b"%d\nmailsys-append 10 20 30\nmore\n",
    b"%d\nsomething else\nmailsys-append 0 5\n",
])
def test_read_append_note_of_a_dead_holder(content):
    pid = dead_pid()
    numbers = [int(w) for w in (content % pid).split(b"mailsys-append ")[1].split(b"\n")[0].split()]
    assert read_append_note(content % pid) == (numbers[:-1], numbers[-1])


@pytest.mark.parametrize("content", [
    b"",
    b"%d\n",
    b"%d\nmailsys-append 10 20",             # cut short: the last number may be too
    b"%d\nmailsys-append 10\n",
    b"%d\nmailsys-append 20 10\n",
    b"%d\nmailsys-append 10 10\n",
    b"%d\nmailsys-append -1 10\n",
    b"%d\nmailsys-append 1 +10\n",
    b"%d\nmailsys-append 1 1e3\n",
    b"%d\nmailsys-append  10 20\n",
    b"%d\nmailsys-append 10 20 \n",
    b"mailsys-append 10 20\n",
    b"x%d\nmailsys-append 10 20\n",
    b"0\nmailsys-append 10 20\n",
    b"%d\nMAILSYS-APPEND 10 20\n",
])
def test_read_append_note_refuses_anything_else(content):
    if b"%d" in content:
        content = content % dead_pid()
    assert read_append_note(content) is None


def test_take_dotlock_reports_only_the_stale_lock_it_replaced(tmp_path):
    lock = str(tmp_path / "mbox.lock")
    stale = []
    assert take_dotlock(lock, 0.1, stale=stale) and stale == []
    assert not take_dotlock(lock, 0.1, stale=stale) and stale == []     # held, not stale
    leave_stale_lock(str(tmp_path / "mbox"), b"123\nmailsys-append 1 2\n")
    assert take_dotlock(lock, 0.1, stale=stale)
    assert stale == [b"123\nmailsys-append 1 2\n"]
    assert open(lock, "rb").read() == b"%d\nmailsys %s\n" % (os.getpid(), mbox_module._HOST)


class Killed(BaseException):
    """What kill -9 does to a process, as far as the files it leaves go."""


def test_dotlock_is_whole_when_it_appears_and_absent_after_a_kill_before(tmp_path, monkeypatch):
    """The lock's content is written before the lock has its name: a kill
    before the link leaves no lock, not an empty one that names nobody."""
    lock = str(tmp_path / "mbox.lock")
    real = os.link
    at_link = []

    def link(src, dst, **kw):
        with open(f"/proc/self/fd/{src}", "rb") as f:     # the unnamed file, as it is now
            at_link.append(f.read())
        return real(src, dst, **kw)

    monkeypatch.setattr(mbox_module.os, "link", link)
    assert take_dotlock(lock, 0)
    assert at_link == [b"%d\nmailsys %s\n" % (os.getpid(), mbox_module._HOST)]
    assert open(lock, "rb").read() == at_link[0]
    os.unlink(lock)

    def killed(src, dst, **kw):
        raise Killed()

    monkeypatch.setattr(mbox_module.os, "link", killed)
    with pytest.raises(Killed):
        take_dotlock(lock, 0)
    assert os.listdir(tmp_path) == []


def test_dotlock_whose_link_fails_is_made_the_old_way(tmp_path, monkeypatch):
    lock = str(tmp_path / "mbox.lock")

    def refused(src, dst, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(mbox_module.os, "link", refused)
    assert take_dotlock(lock, 0)
    assert open(lock, "rb").read() == b"%d\nmailsys %s\n" % (os.getpid(), mbox_module._HOST)
    assert not take_dotlock(lock, 0)
    assert os.listdir(tmp_path) == ["mbox.lock"]


def test_dotlock_without_o_tmpfile_is_made_the_old_way(tmp_path, monkeypatch):
    lock = str(tmp_path / "mbox.lock")
    real = os.open

    def no_tmpfile(path, flags, *args, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(mbox_module.os, "open", no_tmpfile)
    assert take_dotlock(lock, 0)
    assert open(lock, "rb").read() == b"%d\nmailsys %s\n" % (os.getpid(), mbox_module._HOST)
    assert not take_dotlock(lock, 0)


def test_append_note_is_added_after_the_holder_and_a_kill_before_it_keeps_the_holder(tmp_path, monkeypatch):
    lock = str(tmp_path / "mbox.lock")
    assert take_dotlock(lock, 0)
    head = open(lock, "rb").read()

    def killed(fd, data):
        raise Killed()

    monkeypatch.setattr(mbox_module.os, "write", killed)
    with pytest.raises(Killed):
        mbox_module.write_append_note(lock, [10, 20], 30)
    assert open(lock, "rb").read() == head
    monkeypatch.undo()
    mbox_module.write_append_note(lock, [10, 20], 30)
    assert open(lock, "rb").read() == head + b"mailsys-append 10 20 30\n"


def holder_lock(pid, host=None, rest=b""):
    return b"%d\nmailsys %s\n" % (pid, mbox_module._HOST if host is None else host) + rest


def test_take_dotlock_removes_at_once_the_lock_of_a_dead_mailsys_process_of_this_host(tmp_path):
    """After kill -9 the restarted MDA need not wait five minutes: the lock's
    holder is gone.  Its content still reaches the taker (the note)."""
    lock = str(tmp_path / "mbox.lock")
    content = holder_lock(dead_pid(), rest=b"mailsys-append 1 2\n")
    with open(lock, "wb") as f:
        f.write(content)
    stale = []
    assert take_dotlock(lock, 0, stale=stale)
    assert stale == [content]


@pytest.mark.parametrize("content", [
    "live", "mine", "other host", "no host line", "cut short", "foreign", "empty"])
def test_take_dotlock_waits_for_any_other_fresh_lock(tmp_path, content):
    child = subprocess.Popen(["sleep", "30"])
    try:
        pid = dead_pid()
        data = {"live": holder_lock(child.pid), "mine": holder_lock(os.getpid()),
                "other host": holder_lock(pid, host=b"elsewhere"),
                "no host line": b"%d\n" % pid, "cut short": holder_lock(pid)[:-1],
                "foreign": b"%d\nprocmail\n" % pid, "empty": b""}[content]
        lock = str(tmp_path / "mbox.lock")
        with open(lock, "wb") as f:
            f.write(data)
        ticks = iter(range(100))
        assert not take_dotlock(lock, 3, clock=lambda: next(ticks), sleep=lambda s: None)
        assert open(lock, "rb").read() == data
    finally:
        child.kill()
        child.wait()


def test_mbox_delivery_after_kill9_goes_on_at_once_and_cuts_by_the_note(tmp_path):
    """The dead holder's lock is fresh (no five-minute wait): the next delivery
    removes it, reads its note and cuts the torn record."""
    s = MboxStore(lock_timeout=0)
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    assert s.deliver(loc, PREFIX, MESSAGE, 0, sender=SENDER).delivered
    complete = open(loc, "rb").read()
    record = s._record(b"", TWO, SENDER, WHEN)
    with open(loc, "ab") as f:
        f.write(record[:record.index(b"first paragraph\n\n") + len(b"first paragraph\n\n")])
    with open(loc + ".lock", "wb") as f:
        f.write(holder_lock(dead_pid(), rest=b"mailsys-append %d %d\n" % (len(complete), len(complete) + len(record))))
    assert s.deliver(loc, b"", AFTER, 0, sender=SENDER).delivered
    assert s.messages(loc) == [STORED, AFTER]
    assert not os.path.exists(loc + ".lock")


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_every_directory_created_is_private(tmp_path, kind):
    store = MaildirStore() if kind == "maildir" else MboxStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", kind)
    assert store.deliver(loc, b"", b"a\n", 0).delivered
    for d in (tmp_path / "example.com", tmp_path / "example.com" / "joe"):
        assert oct(d.stat().st_mode & 0o777) == "0o700", d


# -- Body: the MDA's chunks, never joined by the MDA ------------------------------------

def chunks_of(data, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(data[i:i + n])
        i += n
    out.append(data[i:])
    return [c for c in out if c]


@pytest.mark.parametrize("sizes", [[], [1], [5, 1, 7], [1] * 40])
def test_a_body_in_chunks_is_stored_as_the_same_bytes(store, sizes):
    from mailsys.mda.store import Body

    s, loc = store
    crlf_size = len(MESSAGE) + MESSAGE.count(b"\n")
    body = Body(chunks_of(MESSAGE, sizes), crlf_size)
    assert len(body) == len(MESSAGE) and body.line_ends == MESSAGE.count(b"\n")
    assert s.deliver(loc, PREFIX, body, 0, sender="a@b.org") == Delivered()
    assert s.messages(loc) == [STORED]


def test_body_head_and_bytes():
    from mailsys.mda.store import Body

    body = Body(chunks_of(MESSAGE, [3, 4, 10]), 0)
    for n in (0, 1, 3, 4, 7, 8, 20, len(MESSAGE), len(MESSAGE) + 5):
        assert body.head(n) == MESSAGE[:n]
    assert bytes(body) == MESSAGE
    assert bytes(body) is bytes(body) and body.chunks == [MESSAGE]     # joined once, kept


def test_maildir_w_comes_from_the_body_crlf_size(tmp_path):
    """W= is the reader's CRLF size plus the prefix's; the body is not counted again."""
    from mailsys.mda.store import Body

    s = MaildirStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    crlf_size = len(MESSAGE) + MESSAGE.count(b"\n")
    assert s.deliver(loc, PREFIX, Body(chunks_of(MESSAGE, [9]), crlf_size), 0).delivered
    (name,) = os.listdir(os.path.join(loc, "new"))
    prefix_crlf = len(PREFIX) + PREFIX.count(b"\n")
    assert name.endswith(f",S={len(STORED)},W={crlf_size + prefix_crlf}")
    assert crlf_size + prefix_crlf == len(STORED) + STORED.count(b"\n")


@pytest.mark.parametrize("short", [False, True])
def test_maildir_writes_more_chunks_than_iov_max_and_finishes_short_writes(tmp_path, monkeypatch, short):
    """A body of many small chunks goes out in writev groups the kernel accepts
    (IOV_MAX, usually 1024); a short writev is finished, not lost."""
    from mailsys.mda import maildir as md
    from mailsys.mda.store import Body

    data = b"".join(b"line %05d\n" % i for i in range(3000))
    body = Body([data[i:i + 11] for i in range(0, len(data), 11)], len(data) + 3000)
    assert len(body.chunks) == 3000 > md._IOV_MAX
    calls = []
    real = os.writev

    def writev(fd, parts):
        calls.append(len(parts))
        assert len(parts) <= md._IOV_MAX
        if short:
            first = bytes(parts[0])
            return real(fd, [first[:len(first) // 2]])
        return real(fd, parts)

    monkeypatch.setattr(md.os, "writev", writev)
    s = MaildirStore()
    loc = mailbox_location(str(tmp_path), "joe@example.com", "maildir")
    assert s.deliver(loc, PREFIX, body, 0).delivered
    assert s.messages(loc) == [PREFIX + data]
    assert len(calls) == -(-3001 // md._IOV_MAX)


def test_mbox_first_delivery_makes_the_new_file_and_directories_durable(tmp_path, monkeypatch):
    """The new mbox file is an entry of its directory and the new directories of
    theirs: flushed before the append, so a power failure cannot take an
    acknowledged message's mailbox away.  An existing mbox costs no flush."""
    from mailsys.mda import mbox as mbox_module

    calls = []
    real_flush = mbox_module.durable.flush
    monkeypatch.setattr(mbox_module.durable, "flush", lambda paths: calls.append(list(paths)) or real_flush(paths))
    root = str(tmp_path / "mail")
    os.mkdir(root)
    loc = mailbox_location(root, "joe@example.com", "mbox")
    s = MboxStore()
    assert s.deliver(loc, PREFIX, MESSAGE, 0, "a@b.org").delivered
    home = os.path.dirname(loc)
    assert calls == [[root, os.path.join(root, "example.com"), home]]
    calls.clear()
    assert s.deliver(loc, PREFIX, MESSAGE, 0, "a@b.org").delivered
    assert calls == []
    assert len(s.messages(loc)) == 2


def test_mbox_failing_directory_flush_refuses_the_message(tmp_path, monkeypatch):
    from mailsys.mda import mbox as mbox_module

    def flush(paths):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(mbox_module.durable, "flush", flush)
    loc = mailbox_location(str(tmp_path), "joe@example.com", "mbox")
    outcome = MboxStore().deliver(loc, PREFIX, MESSAGE, 0, "a@b.org")
    assert outcome == TempFail(Reply(451, "4.3.0", "Local I/O error writing mailbox"))
    assert os.path.getsize(loc) == 0
