"""The read side of the stores for POP3: numbered, sized, uniquely named messages.

Everything here is blocking file work; the POP3 service runs ``load`` and
``commit`` in the reactor's thread pool.  Nothing here knows the wire.

* :class:`MaildirBox` lists ``new/`` and ``cur/`` by name only (sizes from the
  ``W=`` part of the name that mailsys and Dovecot write; other files are read
  once to count their lines).  Its unique ids are the maildir base names.  At
  QUIT, deleted messages are unlinked and retrieved ones move to
  ``cur/BASE:2,<flags>S`` as Dovecot does, so an IMAP server sees them \\Seen.
* :class:`MboxBox` scans the mbox once, under the MDA's dotlock and an fcntl
  read lock, for each message's offsets, size and a hash of its bytes (the
  unique id).  Messages are then read from the descriptor opened at that scan.
  Deletions rewrite the file under the dotlock and an fcntl write lock: a
  temporary file gets every kept message and anything appended since the scan,
  is fsynced and renamed over the mbox.
* :class:`MailboxLock` is the one-POP3-session-per-mailbox lock: an ``flock``
  on ``HOME/mailsys-pop3.lock``, which works across the worker processes.
"""
import fcntl
import hashlib
import os
import re
import tempfile
import time

from twisted.logger import Logger

from mailsys.files import fsync_dir, write_all
from mailsys.mda.mbox import cut_noted_append, lock_fcntl, read_append_note, take_dotlock
from mailsys.pop3.wire import SizeCounter, wire_size

log = Logger(namespace="mailsys.pop3")

LOCK_NAME = "mailsys-pop3.lock"
MAX_UID = 70        # RFC 1939 section 7: 1 to 70 characters in 0x21..0x7E
_UID_OK = re.compile(r"[\x21-\x7e]{1,70}\Z")
_USEC = re.compile(r"\.M([0-9]+)")


class MailboxError(Exception):
    """The mailbox cannot be read or changed now (a temporary condition)."""


class Entry:
    """One message as the session sees it."""

    __slots__ = ("uid", "size", "ref")

    def __init__(self, uid, size, ref):
        self.uid = uid      # UIDL, stable across sessions
        self.size = size    # octets on the wire (CRLF), RFC 1939
        self.ref = ref      # store-specific: Maildir (sub, name); mbox (start, body, end)

    def __repr__(self):
        return f"Entry({self.uid!r}, {self.size})"


class MailboxLock:
    """One POP3 session per mailbox (RFC 1939 section 8: an exclusive-access lock)."""

    def __init__(self, home):
        self.path = os.path.join(home, LOCK_NAME)
        self.fd = None

    def acquire(self):
        """True when taken; False when another session (any process) holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)   # drops the flock


# --------------------------------------------------------------------------- Maildir

def _maildir_uid(base):
    """The base name (unique by maildir(5), kept when flags change); a digest when it
    is not a valid UIDL (over 70 characters or not printable ASCII)."""
    if _UID_OK.match(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def _name_sizes(base):
    """(S=, W=) from the name, each None when absent."""
    s = w = None
    for part in base.split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            s = int(part[2:])
        elif part.startswith("W=") and part[2:].isdigit():
            w = int(part[2:])
    return s, w


def _order(base):
    sec, _, rest = base.partition(".")
    m = _USEC.match("." + rest)
    return (int(sec) if sec.isdigit() else 0, int(m.group(1)) if m else 0, base)


class MaildirBox:
    kind = "maildir"
    unquote = False

    def __init__(self, path):
        self.path = path

    def load(self):
        """Every message of ``new/`` and ``cur/``, oldest first."""
        found = {}
        for sub in ("new", "cur"):
            directory = os.path.join(self.path, sub)
            try:
                it = os.scandir(directory)
            except FileNotFoundError:
                continue
            with it:
                for d in it:
                    name = d.name
                    if name.startswith(".") or not d.is_file():
                        continue
                    base = name.split(":", 1)[0]
                    if base in found:
                        continue   # the same message under two names: count it once
                    found[base] = (sub, name)
        entries = []
        for base in sorted(found, key=_order):
            sub, name = found[base]
            _, w = _name_sizes(base)
            if w is None:
                try:
                    w = wire_size(os.path.join(self.path, sub, name))
                except FileNotFoundError:
                    continue
            entries.append(Entry(_maildir_uid(base), w, (sub, name)))
        return entries

    def _locate(self, entry):
        """The message's current (sub, name): another reader may have renamed it."""
        sub, name = entry.ref
        if os.path.exists(os.path.join(self.path, sub, name)):
            return sub, name
        base = name.split(":", 1)[0]
        for sub in ("cur", "new"):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except FileNotFoundError:
                continue
            for n in names:
                if n == base or n.startswith(base + ":"):
                    entry.ref = (sub, n)
                    return sub, n
        return None

    def open(self, entry):
        """A binary file of the message as stored; MailboxError if it is gone."""
        for _ in range(2):
            sub, name = entry.ref
            try:
                return open(os.path.join(self.path, sub, name), "rb")
            except FileNotFoundError:
                if self._locate(entry) is None:
                    break
        raise MailboxError("message no longer exists")

    def commit(self, deleted, seen):
        """UPDATE state: unlink ``deleted``, flag ``seen`` (entries) \\Seen.  Returns
        the number of deletions that could not be done (a message already gone
        counts as deleted)."""
        failed = 0
        touched = set()
        for entry in deleted:
            where = self._locate(entry)
            if where is None:
                continue
            try:
                os.unlink(os.path.join(self.path, *where))
                touched.add(where[0])
            except FileNotFoundError:
                pass
            except OSError:
                failed += 1
        for entry in seen:
            if entry in deleted:
                continue
            where = self._locate(entry)
            if where is None:
                continue
            sub, name = where
            base, _, info = name.partition(":")
            if info and not info.startswith("2,"):
                continue   # an info format we do not know: leave it alone
            flags = set(info[2:]) if info else set()
            if sub == "cur" and "S" in flags:
                continue
            target = f"{base}:2,{''.join(sorted(flags | {'S'}))}"
            try:
                os.rename(os.path.join(self.path, sub, name), os.path.join(self.path, "cur", target))
                touched.update((sub, "cur"))
            except OSError:
                pass   # the flag is a courtesy; the message itself is intact
        for sub in sorted(touched):
            try:
                fsync_dir(os.path.join(self.path, sub))
            except OSError:
                pass
        return failed

    def close(self):
        pass


# --------------------------------------------------------------------------- mbox

class _RangeReader:
    """``read(n)`` over bytes ``[start, end)`` of a shared descriptor (pread)."""

    def __init__(self, fd, start, end):
        self.fd, self.at, self.end = fd, start, end

    def read(self, n=-1):
        left = self.end - self.at
        if n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.at)
        if not data:
            raise MailboxError("mbox shrank while a message was read")
        self.at += len(data)
        return data

    def close(self):
        pass


class MboxBox:
    kind = "mbox"
    unquote = True

    def __init__(self, path, lock_timeout=10.0, clock=time.time, sleep=time.sleep):
        self.path = path
        self.lock_timeout = lock_timeout
        self._clock, self._sleep = clock, sleep
        self.fd = None
        self.ino = None
        self.scanned = 0     # bytes of the file the scan covered
        self._starts = []    # record offsets, in file order

    # -- the MDA's locks (mailsys.mda.mbox): dotlock, then fcntl on the mbox

    def _take_dotlock(self, stale=None):
        dotlock = self.path + ".lock"
        if not take_dotlock(dotlock, self.lock_timeout, self._clock, self._sleep, stale):
            raise MailboxError("mbox is locked by another program")
        return dotlock

    def _cut_noted_append(self, note):
        """This login removed the stale dotlock of an MDA killed in the middle of
        an append: cut what that append left, as the MDA's next append would
        have (mailsys.mda.mbox), before the scan would show it as a message
        and before the note is gone with the lock.  Flushed here: no append
        follows to do it.  When the file cannot be opened or cut, a warning is
        logged and the login goes on (the next append's check of the file's
        shape may still cut it); waiting too long for the ``fcntl`` lock fails
        the login like any other lock held too long."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            log.warn("mbox {path}: cannot open it to cut an interrupted append: {error}",
                     path=self.path, error=e.strerror)
            return
        try:
            self._fcntl_lock(fd, fcntl.LOCK_EX)
            if cut_noted_append(fd, self.path, note) is not None:
                os.fsync(fd)
        except OSError as e:
            log.warn("mbox {path}: cannot cut an interrupted append: {error}",
                     path=self.path, error=e.strerror)
        finally:
            os.close(fd)        # also drops the fcntl lock (and any other of this process on the file)

    def _fcntl_lock(self, fd, kind):
        if not lock_fcntl(fd, kind, self.lock_timeout, self._clock, self._sleep):
            raise MailboxError("mbox is locked by another program")

    def load(self):
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        dotlock = None
        try:
            stale = []
            dotlock = self._take_dotlock(stale)
            note = read_append_note(stale[0]) if stale else None
            if note is not None:
                self._cut_noted_append(note)
            self._remove_torn_rewrites()
            self._fcntl_lock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            entries = self._scan(fd, st.st_size)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if dotlock is not None:
                _unlink(dotlock)
        self.fd, self.ino, self.scanned = fd, st.st_ino, st.st_size
        self._starts = [e.ref[0] for e in entries]
        return entries

    def _scan(self, fd, size):
        """One pass: a record is a ``From `` line, the mboxrd-quoted message and a
        blank line (mailsys.mda.mbox); its message is the part between."""
        f = os.fdopen(os.dup(fd), "rb", buffering=1 << 20)
        entries = []
        seen_uids = {}
        record = None    # [start, body, hash, counter, quoted, last_line_blank]
        pos = 0
        at_line_start = True

        def close_record(end):
            start, body, digest, counter, quoted, last_blank = record
            if last_blank and end > body:   # the blank line ends the record, not the message
                end -= 1
                counter.size -= 2
            uid = digest.hexdigest()
            n = seen_uids.get(uid, 0) + 1
            seen_uids[uid] = n
            if n > 1:
                uid = f"{uid}-{n}"
            entries.append(Entry(uid, counter.size - quoted, (start, body, end)))

        with f:
            while pos < size:
                line = f.readline(min(65536, size - pos))
                if not line:
                    break
                if at_line_start and line.startswith(b"From "):
                    if record is not None:
                        close_record(pos)
                    record = [pos, pos + len(line), hashlib.sha1(line), SizeCounter(), 0, False]
                elif record is not None:
                    record[2].update(line)
                    record[3].feed(line)
                    if at_line_start:
                        if line[:1] == b">" and line.lstrip(b">").startswith(b"From "):
                            record[4] += 1
                        record[5] = line == b"\n"
                    else:
                        record[5] = False
                pos += len(line)
                at_line_start = line.endswith(b"\n")
            if record is not None:
                close_record(pos)
        return entries

    def open(self, entry):
        if self.fd is None:
            raise MailboxError("mbox is not open")
        _, body, end = entry.ref
        return _RangeReader(self.fd, body, end)

    def commit(self, deleted, seen):
        """Rewrite the mbox without ``deleted``; ``seen`` is not recorded in mbox
        (no Status: header rewriting).  Raises MailboxError when the file is not
        the one scanned (another program replaced or shortened it)."""
        if not deleted:
            return 0
        dropped = sorted(e.ref[0] for e in deleted)
        dotlock = self._take_dotlock()
        fd = None
        tmp = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self._fcntl_lock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_ino != self.ino or st.st_size < self.scanned:
                raise MailboxError("mbox was changed by another program since the login")
            for start in dropped:
                if os.pread(fd, 5, start) != b"From ":
                    raise MailboxError("mbox was changed by another program since the login")
            # Kept byte ranges: everything but the dropped records.
            ranges = []
            at = 0
            bounds = self._record_bounds()
            for start in dropped:
                ranges.append((at, start))
                at = bounds[start]
            ranges.append((at, st.st_size))   # includes anything appended since the scan
            directory = os.path.dirname(self.path)
            tfd, tmp = tempfile.mkstemp(dir=directory, prefix=self._rewrite_prefix(),
                                        suffix=".tmp")
            try:
                os.fchmod(tfd, st.st_mode & 0o7777)
                if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                    os.fchown(tfd, st.st_uid, st.st_gid)
                for a, b in ranges:
                    while a < b:
                        data = os.pread(fd, min(1 << 20, b - a), a)
                        if not data:
                            raise MailboxError("mbox shrank during the rewrite")
                        write_all(tfd, data)
                        a += len(data)
                os.fsync(tfd)
            finally:
                os.close(tfd)
            os.rename(tmp, self.path)
            tmp = None
            fsync_dir(directory)
            return 0
        finally:
            if tmp is not None:
                _unlink(tmp)
            if fd is not None:
                os.close(fd)
            _unlink(dotlock)

    def _rewrite_prefix(self):
        return "." + os.path.basename(self.path) + ".pop3."

    def _remove_torn_rewrites(self):
        """Remove the copies that rewrites killed before their rename left
        beside the mbox (a crash, ``kill -9``): each can be as big as the
        mailbox, and nothing else would ever remove them.  Only called with
        this mailbox's POP3 lock and dotlock held, so no rewrite of this mbox
        is running; the mbox itself was never touched by them."""
        directory = os.path.dirname(self.path) or "."
        prefix = self._rewrite_prefix()
        try:
            names = [n for n in os.listdir(directory)
                     if n.startswith(prefix) and n.endswith(".tmp")]
        except OSError:
            return
        for name in names:
            _unlink(os.path.join(directory, name))
            log.info("mbox {path}: removed {name}, left by a rewrite that a crash interrupted",
                     path=self.path, name=name)

    def _record_bounds(self):
        """record start -> the start of the next record (or the scanned end)."""
        starts = self._starts
        return {s: (starts[i + 1] if i + 1 < len(starts) else self.scanned)
                for i, s in enumerate(starts)}

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass
