"""The read side of the stores for POP3: numbered, sized, uniquely named messages.

Everything here is blocking file work; the POP3 service runs ``load`` and
``commit`` in the reactor's thread pool.  Nothing here knows the wire.

* :class:`MaildirBox` lists ``new/`` and ``cur/`` by name only (sizes from the
  ``W=`` part of the name that mailsys and Dovecot write; other files are read
  once to count their lines).  Its unique ids are the maildir base names.  At
  QUIT, deleted messages are unlinked and retrieved ones move to
  ``cur/BASE:2,<flags>S`` as Dovecot does, so an IMAP server sees them \\Seen.
* :class:`MboxBox` scans the mbox once, under the MDA's dotlock and an fcntl
  read lock, for each message's offsets, size, a digest of its exact bytes and
  its unique id (a digest that leaves out the status headers other readers
  rewrite).  Messages are then read from the descriptor opened at that scan,
  each checked against its digest first: another program (Dovecot, mutt) may
  rewrite the mbox in place, keeping the inode.  Deletions rewrite the file
  under the dotlock and an fcntl write lock: a temporary file gets every kept
  message and anything appended since the scan, while every scanned record is
  checked against its digest, is fsynced and renamed over the mbox.
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

from mailsys.files import fsync_dir
from mailsys.mda.mbox import cut_noted_append, lock_fcntl, read_append_note, take_dotlock
from mailsys.pop3.wire import SizeCounter, wire_size

log = Logger(namespace="mailsys.pop3")

LOCK_NAME = "mailsys-pop3.lock"
MAX_UID = 70        # RFC 1939 section 7: 1 to 70 characters in 0x21..0x7E
_UID_OK = re.compile(r"[\x21-\x7e]{1,70}\Z")
_USEC = re.compile(r"\.M([0-9]+)")


class MailboxError(Exception):
    """The mailbox cannot be read or changed now (a temporary condition the
    operator is told about in one line; no traceback: nothing is broken)."""


class MailboxBusy(MailboxError):
    """Another program held the mailbox's lock longer than the lock timeout: a
    login answers ``[IN-USE]`` (RFC 2449 section 8.1.1, "for some other reason")."""


CHANGED = "mbox was changed by another program since the login"


class Entry:
    """One message as the session sees it."""

    __slots__ = ("uid", "size", "ref")

    def __init__(self, uid, size, ref):
        self.uid = uid      # UIDL, stable across sessions
        self.size = size    # octets on the wire (CRLF), RFC 1939
        self.ref = ref      # store-specific: Maildir (sub, name); mbox (start, body, end, number)

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

# Header fields that other readers of an mbox add or rewrite in place as they
# keep their state in the file: Dovecot's (the fields its mbox code hides from
# IMAP clients: Status, X-Status, X-Keywords, X-UID, X-IMAPbase, X-IMAP,
# Content-Length) and mutt's (Status, X-Status, Content-Length, Lines).  The
# UIDL leaves them out, so that reading the mailbox with one of them does not
# make every message new to a keep-on-server POP3 client.
MUTABLE_FIELDS = frozenset((b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imapbase",
                            b"x-imap", b"content-length", b"lines"))
_READ = 1 << 20


def _mutable_field(line):
    """True when ``line`` starts a header field named in MUTABLE_FIELDS."""
    name, colon, _ = line.partition(b":")
    return bool(colon) and name.rstrip(b" \t").lower() in MUTABLE_FIELDS


class _Record:
    """One record as the scan reads it: a ``From `` line, the mboxrd-quoted
    message, a blank line."""

    __slots__ = ("start", "body", "exact", "uid", "counter", "quoted", "last_blank",
                 "in_header", "skipping")

    def __init__(self, start, from_line):
        self.start = start
        self.body = start + len(from_line)
        self.exact = hashlib.sha1(from_line)   # every byte: what the session may send
        self.uid = None        # a copy of ``exact`` once a mutable field was left out of it
        self.counter = SizeCounter()
        self.quoted = 0        # >From lines, one ">" each less on the wire
        self.last_blank = False
        self.in_header = True
        self.skipping = False  # inside a field of MUTABLE_FIELDS (or its continuation)

    def feed(self, line, at_line_start):
        if self.in_header:
            if at_line_start:
                if line == b"\n" or line == b"\r\n":
                    self.in_header = self.skipping = False
                elif line[:1] not in (b" ", b"\t"):
                    self.skipping = _mutable_field(line)
            if self.skipping and self.uid is None:
                self.uid = self.exact.copy()   # the same bytes so far: nothing was left out yet
        self.exact.update(line)
        if self.uid is not None and not self.skipping:
            self.uid.update(line)
        self.counter.feed(line)
        if at_line_start:
            if line[:1] == b">" and line.lstrip(b">").startswith(b"From "):
                self.quoted += 1
            self.last_blank = line == b"\n"
        else:
            self.last_blank = False


def _digest_range(fd, start, end, digest=None):
    """SHA-1 object over bytes ``[start, end)`` of ``fd`` (continuing ``digest``);
    MailboxError when the file ends before ``end``."""
    if digest is None:
        digest = hashlib.sha1()
    while start < end:
        data = os.pread(fd, min(_READ, end - start), start)
        if not data:
            raise MailboxError(CHANGED + " (it is shorter)")
        digest.update(data)
        start += len(data)
    return digest


class _RangeReader:
    """``read(n)`` over bytes ``[start, end)`` of a shared descriptor (pread).

    With ``check`` = (digest so far, record end, expected digest): the bytes
    read are hashed too, and before the last of them is handed out the rest of
    the record is hashed and compared, so that a record another program
    rewrote after :meth:`MboxBox.open` checked it ends the transfer with an
    error (the reply never gets its final dot) instead of completing with
    other bytes."""

    def __init__(self, fd, start, end, check=None):
        self.fd, self.at, self.end = fd, start, end
        self.check = check

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
        if self.check is not None:
            digest, bound, expected = self.check
            digest.update(data)
            if self.at >= self.end:
                self.check = None
                if _digest_range(self.fd, self.end, bound, digest).digest() != expected:
                    raise MailboxError(CHANGED)
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
        # [start, bound) pieces covering the scanned bytes, in file order, each
        # with the SHA-1 of its bytes at the scan and its message number (0 for
        # anything before the first record)
        self._segments = []
        self._digests = {}   # record start -> (bound, digest)

    # -- the MDA's locks (mailsys.mda.mbox): dotlock, then fcntl on the mbox

    def _take_dotlock(self, stale=None):
        dotlock = self.path + ".lock"
        if not take_dotlock(dotlock, self.lock_timeout, self._clock, self._sleep, stale):
            raise MailboxBusy(f"mbox is locked by another program: {dotlock} was held for "
                              f"more than {self.lock_timeout:g} s")
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
            raise MailboxBusy(f"mbox is locked by another program: an fcntl lock on "
                              f"{self.path} was held for more than {self.lock_timeout:g} s")

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
        self.fd, self.ino = fd, st.st_ino
        # what the segments cover: all of st_size unless the file ended early
        self.scanned = self._segments[-1][1] if self._segments else 0
        return entries

    def _scan(self, fd, size):
        """One pass: a record is a ``From `` line, the mboxrd-quoted message and a
        blank line (mailsys.mda.mbox); its message is the part between.  Each
        record gets the SHA-1 of its bytes (kept to check it before it is sent
        or dropped) and its UIDL: the same SHA-1, except that the header
        fields of MUTABLE_FIELDS are left out of it, so that for a record
        without them the two are equal."""
        f = os.fdopen(os.dup(fd), "rb", buffering=_READ)
        entries = []
        segments = []
        seen_uids = {}
        lead = hashlib.sha1()   # bytes before the first record (none in a mailsys mbox)
        record = None
        pos = 0
        at_line_start = True

        def close_record(end):
            r = record
            segments.append((r.start, end, r.exact.digest(), len(entries) + 1))
            body_end = end
            size = r.counter.size
            if r.last_blank and end > r.body:   # the blank line ends the record, not the message
                body_end -= 1
                size -= 2
            uid = (r.uid or r.exact).hexdigest()
            n = seen_uids.get(uid, 0) + 1
            seen_uids[uid] = n
            if n > 1:
                uid = f"{uid}-{n}"
            entries.append(Entry(uid, size - r.quoted, (r.start, r.body, body_end, len(entries) + 1)))

        with f:
            while pos < size:
                line = f.readline(min(65536, size - pos))
                if not line:
                    break
                if at_line_start and line.startswith(b"From "):
                    if record is not None:
                        close_record(pos)
                    elif pos:
                        segments.append((0, pos, lead.digest(), 0))
                    record = _Record(pos, line)
                elif record is not None:
                    record.feed(line, at_line_start)
                else:
                    lead.update(line)
                pos += len(line)
                at_line_start = line.endswith(b"\n")
            if record is not None:
                close_record(pos)
            elif pos:
                segments.append((0, pos, lead.digest(), 0))
        self._segments = segments
        self._digests = {start: (bound, digest) for start, bound, digest, n in segments if n}
        return entries

    def open(self, entry):
        """A reader of the message's bytes, once they are checked to be the
        ones the scan listed: another program may have rewritten the mbox in
        place (same inode), and the offsets would then point into another
        message.  Blocking (a hashing pass, cheap from the page cache): the
        service runs it in the thread pool.  MailboxError on a mismatch."""
        if self.fd is None:
            raise MailboxError("mbox is not open")
        start, body, end, _ = entry.ref
        bound, expected = self._digests[start]
        digest = _digest_range(self.fd, start, body)
        so_far = digest.copy()
        if _digest_range(self.fd, body, bound, digest).digest() != expected:
            raise MailboxError(CHANGED)
        return _RangeReader(self.fd, body, end, (so_far, bound, expected))

    def commit(self, deleted, seen):
        """Rewrite the mbox without ``deleted``; ``seen`` is not recorded in mbox
        (no Status: header rewriting).  Raises MailboxError when the file is not
        the one scanned: another program replaced it, shortened it, or changed
        any byte of it that the scan covered (every record is hashed as it is
        copied or dropped and compared with its digest from the scan; the
        temporary copy is then removed and nothing is deleted)."""
        if not deleted:
            return 0
        dropped = {e.ref[0] for e in deleted}
        dotlock = self._take_dotlock()
        fd = None
        tmp = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self._fcntl_lock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_ino != self.ino:
                raise MailboxError(CHANGED + " (it was replaced)")
            if st.st_size < self.scanned:
                raise MailboxError(CHANGED + " (it is shorter)")
            directory = os.path.dirname(self.path)
            tfd, tmp = tempfile.mkstemp(dir=directory, prefix=self._rewrite_prefix(),
                                        suffix=".tmp")
            try:
                os.fchmod(tfd, st.st_mode & 0o7777)
                if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                    os.fchown(tfd, st.st_uid, st.st_gid)
                with open(tfd, "wb", buffering=_READ, closefd=False) as out:
                    self._copy_checked(fd, out, dropped)
                    if st.st_size > self.scanned and os.pread(fd, 5, self.scanned) != b"From ":
                        raise MailboxError(CHANGED + " (no message starts where the listing ended)")
                    at = self.scanned   # anything appended since the scan
                    while at < st.st_size:
                        data = os.pread(fd, min(_READ, st.st_size - at), at)
                        if not data:
                            raise MailboxError("mbox shrank during the rewrite")
                        out.write(data)
                        at += len(data)
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

    def _copy_checked(self, fd, out, dropped):
        """Write every scanned segment but the ``dropped`` records to ``out``,
        reading each one whole (kept or not) to compare it with its digest."""
        for start, bound, expected, number in self._segments:
            keep = start not in dropped
            digest = hashlib.sha1()
            at = start
            while at < bound:
                data = os.pread(fd, min(_READ, bound - at), at)
                if not data:
                    raise MailboxError(CHANGED + " (it is shorter)")
                digest.update(data)
                if keep:
                    out.write(data)
                at += len(data)
            if digest.digest() != expected:
                what = f"message {number}" if number else "the text before the first message"
                raise MailboxError(f"{CHANGED} ({what} is not what was listed)")

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

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass
