"""mbox (RFC 4155) with mboxrd quoting, locked the way mail readers expect.

An append takes, in order: an in-process lock (POSIX record locks do not
exclude threads of one process), the dotlock ``mbox.lock`` (created with
O_EXCL; one older than five minutes is stale and removed, and so is one a
mailsys process of this host left when it died) and an fcntl write
lock on the mbox itself.  Waiting for them is bounded: past ``lock_timeout`` the
delivery is a temporary failure and the sender's MTA retries.  The append is
fsynced; on any error the file is truncated back to its size before the append,
so a reader never sees half a message.

A ``kill -9`` (or a crash of the machine) in the middle of an append leaves part
of a record at the end of the file, and the next append must cut it off.  Where
each record begins is written into the dotlock before the append
(:data:`APPEND_NOTE`), so the one who later removes the dead holder's stale lock
knows exactly where the interrupted append began; without such a note, an mbox
that does not end in a blank line is cut back to its last record's start.

With a delivery log (mailsys.mda.dedupe) each record's offset, length and
CRC-32 are logged and the log made durable (fdatasync) before the append is
written, so no copy is ever in the mbox unrecorded.
"""
import errno
import fcntl
import os
import re
import socket
import threading
import time
import zlib

from twisted.logger import Logger
from zope.interface import implementer

from mailsys.delivery import Delivered, PermFail, TempFail, from_os_error
from mailsys.files import write_all
from mailsys.mda import durable
from mailsys.mda.store import IMailStore, make_private_dirs
from mailsys.smtp.reply import Reply

log = Logger(namespace="mailsys.mda")

OVER_QUOTA = Reply(552, "5.2.2", "Mailbox full: over quota")
LOCKED = Reply(451, "4.2.0", "Mailbox busy: could not lock it in time")
STALE_DOTLOCK = 300
TORN_TAIL_WINDOW = 1 << 20      # bytes read at a time looking for the torn append's start
APPEND_NOTE = b"mailsys-append"   # dotlock line: the offset of each record appended, then the end
LOCK_OWNER = b"mailsys"           # dotlock line: LOCK_OWNER and the host name (_lock_head)
_HOST = re.sub(rb"\s", b"_", (socket.gethostname() or "localhost").encode("utf-8", "replace"))
MAX_LOCK_READ = 65536
_RECORD_START = b"\n\nFrom "
_QUOTE = re.compile(rb"^(>*From )", re.M)
_SPLIT = re.compile(rb"^From [^\n]*\n", re.M)


def quote(body):
    """mboxrd: every line of zero or more '>' then 'From ' gets one more '>'."""
    return _QUOTE.sub(rb">\1", body)


def unquote(body):
    return re.sub(rb"^>(>*From )", rb"\1", body, flags=re.M)


@implementer(IMailStore)
class MboxStore:
    kind = "mbox"

    def __init__(self, lock_timeout=10.0, sleep=time.sleep, clock=time.time):
        self.lock_timeout = lock_timeout
        self._sleep = sleep
        self._clock = clock
        self._locks = {}
        self._locks_guard = threading.Lock()

    def _thread_lock(self, path):
        with self._locks_guard:
            lock = self._locks.get(path)
            if lock is None:
                lock = self._locks[path] = threading.Lock()
            return lock

    def size(self, path):
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0

    def deliver(self, path, prefix, message, quota, sender="MAILER-DAEMON", when=None):
        return self.deliver_many([(path, prefix, message, quota, sender, when)])[0]

    def deliver_many(self, items, log=None, keys=None):
        """Deliver several messages; each mbox is locked, appended and fsynced once.

        ``keys[i]``, when given, is ``(queue id, recipient)``: where item i goes
        is written to the delivery ``log`` before the append."""
        outcomes = [None] * len(items)
        by_box = {}
        for i, (path, prefix, message, quota, sender, when) in enumerate(items):
            key = keys[i] if keys and log is not None else None
            by_box.setdefault(path, []).append((i, self._record(prefix, message, sender, when), quota,
                                                key))
        for path, records in by_box.items():
            lock = self._thread_lock(path)
            if not lock.acquire(timeout=self.lock_timeout):
                for i, _, _ in records:
                    outcomes[i] = TempFail(LOCKED)
                continue
            try:
                for i, outcome in self._append(path, records, log):
                    outcomes[i] = outcome
            finally:
                lock.release()
        return outcomes

    def _record(self, prefix, message, sender, when):
        body = prefix + bytes(message)
        if not body.endswith(b"\n"):
            body += b"\n"
        stamp = time.asctime(time.gmtime(when if when is not None else self._clock()))
        envelope = "".join("_" if c.isspace() else c for c in (sender or "MAILER-DAEMON"))
        return (b"From " + envelope.encode("utf-8", "replace") + b" " + stamp.encode("ascii")
                + b"\n" + quote(body) + b"\n")

    def _append(self, path, records, log=None):
        """[(index, Outcome)] for the records of one mbox, appended under its locks."""
        def every(outcome):
            return [(i, outcome) for i, _, _, _ in records]

        directory = os.path.dirname(path)
        try:
            # ROOT/<domain>/<local>/mbox: the root is two levels above the home.
            changed = make_private_dirs(directory, os.path.dirname(os.path.dirname(directory)))
        except OSError as e:
            return every(from_os_error(e))
        dotlock = path + ".lock"
        stale = []
        if not self._take_dotlock(dotlock, stale):
            return every(TempFail(LOCKED))
        fd = None
        start = None
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                changed = sorted(set(changed) | {directory})
            if changed:
                # A new mbox, or new directories on the way to it, are entries of
                # their parents: durable before a message in them is acknowledged.
                durable.flush(changed)
            try:
                held = lock_fcntl(fd, fcntl.LOCK_EX, self.lock_timeout, self._clock, self._sleep)
            except OSError as e:
                return every(from_os_error(e))
            if not held:
                return every(TempFail(LOCKED))
            start = end = self._cut_torn_tail(fd, path, read_append_note(stale[0]) if stale else None)
            results, data, logged, offsets = [], [], [], []
            for i, record, quota, key in records:
                if quota and end + len(record) > quota:
                    results.append((i, PermFail(OVER_QUOTA)))
                    continue
                if key is not None:
                    logged.append(key + (path, [end, len(record), zlib.crc32(record)]))
                data.append(record)
                offsets.append(end)
                end += len(record)
                results.append((i, Delivered()))
            if data:
                write_append_note(dotlock, offsets, end)
            if logged:
                log.write(logged)
                log.sync()
            blob = b"".join(data)
            view = memoryview(blob)
            at = start
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if blob:
                os.fsync(fd)
            start = None
            return results
        except OSError as e:
            return every(from_os_error(e))
        finally:
            if fd is not None:
                if start is not None:
                    # Never leave half a message: back to the size before the append.
                    try:
                        os.ftruncate(fd, start)
                        os.fsync(fd)
                    except OSError:
                        pass
                os.close(fd)   # also drops the fcntl lock
            try:
                os.unlink(dotlock)
            except OSError:
                pass

    def holds(self, path, where):
        """Whether the mbox at ``path`` holds the record a delivery log names:
        ``[offset, length, crc32]``, the bytes there starting with ``From ``."""
        offset, length, crc = where
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length > 5):
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size < offset + length:
                return False
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data.startswith(b"From ") and zlib.crc32(data) == crc

    def _cut_torn_tail(self, fd, path, note=None):
        """The size to append at, after cutting off what an interrupted append
        of ours left (never acknowledged: each append is fsynced before its 250).

        ``note`` is what the dead holder's dotlock said, ``(offsets, end)``
        (:func:`read_append_note`): when the file stops inside that append, it
        is cut back to the start of the record it stops in.  This is the only
        way to tell a record cut right after one of its blank lines from a
        complete one.

        Without a note: every append of ours ends with a blank line, so an mbox
        that does not end in ``\n\n`` holds the start of an append a crash cut
        short: cut it off at the beginning of that last record, or the next
        message would be glued to it.  The search goes back a MiB at a time as
        far as it must: an interrupted append can be longer than any fixed
        window (a 1.5 MB message cut after 1.3 MB once kept its torn start in
        the mbox as a message of its own)."""
        if note is not None:
            keep = cut_noted_append(fd, path, note)
            if keep is not None:
                return keep
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            return 0
        tail = os.pread(fd, 2, size - 2) if size >= 2 else os.pread(fd, size, 0)
        if tail == b"\n\n":
            return size
        keep = _last_record_start(fd, size, TORN_TAIL_WINDOW)
        if keep is None:
            # Not our record shape: keep everything, start ours on a fresh line.
            gap = b"\n" if tail.endswith(b"\n") else b"\n\n"
            view = memoryview(gap)
            at = size
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            return at
        log.warn("mbox {path}: cut {n} bytes of an append a crash interrupted", path=path, n=size - keep)
        os.ftruncate(fd, keep)
        return keep

    def _take_dotlock(self, dotlock, stale=None):
        try:
            return take_dotlock(dotlock, self.lock_timeout, self._clock, self._sleep, stale)
        except OSError:
            return False

    def messages(self, path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        starts = [m.start() for m in _SPLIT.finditer(data)]
        out = []
        for i, s in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(data)
            chunk = data[s:end]
            chunk = chunk[chunk.index(b"\n") + 1:]
            if chunk.endswith(b"\n\n"):
                chunk = chunk[:-1]
            out.append(unquote(chunk))
        return out


def _last_record_start(fd, size, window):
    """The offset of the last ``From `` line that starts a record (after a
    blank line, or at offset 0) in the first ``size`` bytes of ``fd``, or None.
    Reads backwards ``window`` bytes at a time, the windows overlapping by one
    byte less than the marker so that one across a boundary is found."""
    window = max(window, 2 * len(_RECORD_START))     # each step must move back
    end = size
    while True:
        begin = max(0, end - window)
        data = os.pread(fd, end - begin, begin)
        i = data.rfind(_RECORD_START)
        if i >= 0:
            return begin + i + 2
        if begin == 0:
            return 0 if data.startswith(b"From ") else None
        end = begin + len(_RECORD_START) - 1


def _torn_record_start(fd, size, offsets, end):
    """Where to cut an mbox of ``size`` bytes that an append of records at
    ``offsets``, ending at ``end``, may have left torn; None to cut nothing.

    Records the append finished stay (the queue's delivery log knows them, see
    mailsys.mda.dedupe).  Nothing is cut unless what lies from the torn
    record's offset to the end of the file can only be that record's start:
    ``From `` first and no other line starting ``From `` (mboxrd quoting
    leaves none inside a record of ours).  So mail another program appended
    after the crash is never cut off."""
    if not offsets[0] < size < end or size in offsets:
        return None
    start = max(o for o in offsets if o < size)
    head = os.pread(fd, min(5, size - start), start)
    if not b"From ".startswith(head) or not head:
        return None
    carry, at = b"", start
    while at < size:
        chunk = os.pread(fd, min(TORN_TAIL_WINDOW, size - at), at)
        if not chunk:
            return None
        if b"\nFrom " in carry + chunk:
            return None
        carry, at = (carry + chunk)[-5:], at + len(chunk)
    return start


def cut_noted_append(fd, path, note):
    """Cut what an append killed in the middle left in the mbox open (read and
    write, locked) as ``fd``, going by the ``note`` from its stale dotlock
    (:func:`read_append_note`).  The new size, or None when nothing was cut.
    The cut is not flushed: the caller's next flush covers it."""
    size = os.lseek(fd, 0, os.SEEK_END)
    keep = _torn_record_start(fd, size, *note)
    if keep is None:
        return None
    log.warn("mbox {path}: cut {n} bytes of an append a crash interrupted", path=path, n=size - keep)
    os.ftruncate(fd, keep)
    return keep


def write_append_note(dotlock, offsets, end):
    """Add to our ``dotlock``, after its pid and host, the note of the append
    about to be written: the offset of each record, then where it ends.
    Appended, never rewritten, so a kill at any point leaves the pid and host
    in place (and a note cut short is no note: :func:`read_append_note` reads
    complete lines only).  No flush: the note is for a process killed
    mid-append, and the page cache outlives a process."""
    note = b" ".join([APPEND_NOTE, *(b"%d" % n for n in (*offsets, end))])
    fd = os.open(dotlock, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        write_all(fd, note + b"\n")
    finally:
        os.close(fd)


def read_append_note(content):
    """``(offsets, end)`` from a stale dotlock's ``content`` when it holds a
    complete, well-formed note (:func:`write_append_note`) and the pid on its
    first line is not a live process; else None.  A live holder that merely
    kept its lock past STALE_DOTLOCK may still be writing: its append is not
    to be cut."""
    lines = content.split(b"\n")[:-1]      # complete lines only
    if len(lines) < 2 or not lines[0].isdigit() or _alive(int(lines[0])):
        return None
    for line in lines[1:]:
        words = line.split(b" ")
        if words[0] != APPEND_NOTE:
            continue
        if len(words) < 3 or not all(w.isdigit() for w in words[1:]):
            return None
        numbers = [int(w) for w in words[1:]]
        if any(a >= b for a, b in zip(numbers, numbers[1:])):
            return None
        return numbers[:-1], numbers[-1]
    return None


def _alive(pid):
    """Whether ``pid`` may still be writing: it exists and is not a zombie (a
    killed worker waits as one until its parent, or init, reaps it)."""
    if pid <= 0:
        return True         # not a pid of a process of ours: do not act on it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True         # exists, someone else's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True


# -- the locks, shared with every reader of an mbox (mailsys.pop3) ---------------------

def take_dotlock(dotlock, timeout, clock=time.time, sleep=time.sleep, stale=None):
    """Create ``dotlock`` exclusively, removing a stale one first: older than
    STALE_DOTLOCK (left by a crashed holder, any program's), or made by a
    mailsys process of this host that is no longer alive (:func:`_dead_holder`:
    after a ``kill -9`` deliveries go on at once instead of five minutes later).
    True once held; False when another holder kept it past ``timeout`` seconds.
    Any other OSError is the caller's.

    With a list as ``stale``: when the lock was taken right after removing a
    stale one, with nobody else's lock in between, that lock's content (at most
    MAX_LOCK_READ bytes) is appended to it, for :func:`read_append_note`."""
    deadline = clock() + timeout
    removed = None
    while True:
        try:
            _create_lock(dotlock)
            if removed is not None and stale is not None:
                stale.append(removed)
            return True
        except FileExistsError:
            removed = None
            try:
                content, ino, mtime = _read_lock(dotlock)
                if clock() - mtime > STALE_DOTLOCK or _dead_holder(content):
                    if os.stat(dotlock).st_ino == ino:     # still the lock just read
                        os.unlink(dotlock)
                        removed = content
                    continue
            except FileNotFoundError:
                continue
        if clock() >= deadline:
            return False
        sleep(0.05)


def _create_lock(dotlock):
    """Create ``dotlock`` holding :func:`_lock_head`, whole or not at all; raise
    FileExistsError when it exists.

    Why whole: a ``kill -9`` between creating an empty lock and writing it
    (the GIL makes that window milliseconds long, not microseconds) leaves a
    lock that names nobody, which every taker must wait five minutes for; CI
    saw it happen.  So the content goes into an unnamed file first
    (``O_TMPFILE``), which is then linked in under the lock's name, failing
    if that exists.  Where the file system has no ``O_TMPFILE`` (NFS, say),
    ``/proc`` is not mounted or the link fails otherwise, the lock is created
    with ``O_EXCL`` and then written, as before."""
    head = _lock_head()
    tmpfile = getattr(os, "O_TMPFILE", None)
    if tmpfile is not None:
        try:
            fd = os.open(os.path.dirname(dotlock) or ".", os.O_WRONLY | tmpfile | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        else:
            try:
                write_all(fd, head)
                try:
                    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    fds = None      # no /proc: below
                if fds is not None:
                    try:
                        # linkat(fds, "N", AT_FDCWD, dotlock, AT_SYMLINK_FOLLOW): the
                        # way open(2) gives to name an O_TMPFILE file; EEXIST if held.
                        os.link(str(fd), dotlock, src_dir_fd=fds)
                        return
                    except FileExistsError:
                        raise
                    except OSError:
                        pass        # below, the old way
                    finally:
                        os.close(fds)
            finally:
                os.close(fd)
    fd = os.open(dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, head)
    finally:
        os.close(fd)


def _lock_head():
    """What our dotlocks start with: the pid, then ``mailsys HOST``, so that
    another mailsys process of this host can tell that the holder is gone."""
    return b"%d\n%s %s\n" % (os.getpid(), LOCK_OWNER, _HOST)


def _dead_holder(content):
    """Whether ``content`` is the lock of a mailsys process of this host that
    is no longer alive (this process is: a thread of ours may hold the lock).
    Another host's lock, on a shared file system, is left to STALE_DOTLOCK;
    so is a lock whose pid a new process has taken since."""
    lines = content.split(b"\n")
    if len(lines) < 3 or not lines[0].isdigit() or lines[1] != b"%s %s" % (LOCK_OWNER, _HOST):
        return False
    return not _alive(int(lines[0]))


def _read_lock(dotlock):
    """``(content, inode, mtime)`` of a dotlock; the content is b"" when it
    cannot be read (another program's, say): nothing is then known about the
    holder.  FileNotFoundError when it is gone."""
    try:
        fd = os.open(dotlock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError:
        st = os.stat(dotlock, follow_symlinks=False)
        return b"", st.st_ino, st.st_mtime
    try:
        st = os.fstat(fd)
        try:
            content = os.read(fd, MAX_LOCK_READ)
        except OSError:
            content = b""
        return content, st.st_ino, st.st_mtime
    finally:
        os.close(fd)


def lock_fcntl(fd, kind, timeout, clock=time.time, sleep=time.sleep):
    """``lockf(fd, kind)`` waiting at most ``timeout`` seconds: True once held,
    False on timeout; an error other than "held by another" is raised."""
    deadline = clock() + timeout
    while True:
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if clock() >= deadline:
            return False
        sleep(0.05)
