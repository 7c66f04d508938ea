"""Exactly once after a crash: the MDA's delivery log.

The queue journals a recipient as sent only after the MDA's 250, so a crash
between the MDA's flush and the journal's would make the queue deliver that
recipient again after the restart.  To close that window our LMTP courier
names the message (``MAIL FROM:<...> XQID=<queue id>``, plus ``XREDELIVERY``
for a message the queue recovered at start-up), and the MDA keeps a small
record of every copy it stores for a named message: the queue id, the
recipient, the mailbox and where in it the copy went (a Maildir file name; an
mbox offset, length and CRC).  The record is written *before* the copy becomes
visible and is made durable by the flush that makes the copy durable.  When a
redelivery comes, a copy that is recorded and really present is answered 250
without a second copy.

Each worker process appends to its own file, ``STATE/mda/delivered-W.log``;
a redelivery may land on any worker, so lookups read every worker's file (on
the first lookup, then only what was appended since).  Worker 0 compacts the
files at start-up, before any worker runs, keeping only the records of
messages still in the queue (:func:`compact`, called by mailsys.queue).

A record matters only until the queue has journaled the delivery, which it does
right after the MDA's reply, so a server that runs for months does not keep
them all: once its file passes ROTATE_BYTES, and at most once per ROTATE_AGE,
a worker renames it ``delivered-W.old.log`` (dropping the previous old file,
whose records are all older than ROTATE_AGE) and starts a new one.

A record is one JSON line: ``{"q": qid, "r": rcpt, "l": mailbox, "w": where}``.
A line that does not parse (a torn tail after a power loss) is skipped: the
worst a lost record can do is let one duplicate through, never lose mail,
since a copy is only skipped when the store confirms it is there.
"""
import json
import os
import re
import threading
import time

from mailsys.files import write_all, write_atomically

LOG_NAME = re.compile(r"delivered-[0-9]+(?:\.old)?\.log\Z")
ROTATE_BYTES = 4 << 20     # a worker's log is rotated past this size ...
ROTATE_AGE = 600.0         # ... at most this often (seconds)
# Records of messages minted more than this after the process started cannot be
# the subject of a redelivery (only messages recovered at start-up are): they
# are not kept in memory.  Generous, so a clock stepped back does not matter.
FUTURE_MARGIN = 3600.0


def qid_time(qid):
    """Arrival time (seconds) a queue id of mailsys.spool.QueueIds encodes."""
    try:
        return (int(qid, 16) >> 14) / 1_000_000
    except (TypeError, ValueError):
        return 0.0


def encode(qid, rcpt, location, where):
    return json.dumps({"q": qid, "r": rcpt, "l": location, "w": where},
                      separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def _records(data):
    """(record, raw line) for every complete line of ``data`` that parses."""
    for line in data.split(b"\n")[:-1]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("q"), str) and isinstance(rec.get("l"), str):
            yield rec, line


class DeliveryLog:
    """One worker's delivery log, and lookups over every worker's.

    Used from the MDA's delivery thread; a lock keeps it safe anyway.  The file
    is opened on the first write, never before: worker 0's start-up compaction
    replaces the files after the MDA objects exist.
    """

    def __init__(self, directory, worker=0, clock=time.time):
        self.directory = directory
        self.path = os.path.join(directory, f"delivered-{worker}.log")
        self.old_path = os.path.join(directory, f"delivered-{worker}.old.log")
        self.started = clock()
        self._clock = clock
        self._rotated = self.started
        self._fd = None
        self._size = 0
        self._lock = threading.Lock()
        self._index = None      # {(qid, mailbox): where}, built on the first lookup
        self._consumed = {}     # file path -> (inode, bytes of it already read into the index)

    # -- writing ----------------------------------------------------------------------

    def _open(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            window = min(size, 65536)
            tail = os.pread(fd, window, size - window) if size else b"\n"
            if not tail.endswith(b"\n"):
                # A torn last line (power loss) would glue itself to our next record:
                # cut it off (or, for a line longer than we look at, end it).
                nl = tail.rfind(b"\n")
                if nl >= 0 or window == size:
                    os.ftruncate(fd, size - window + nl + 1)
                else:
                    os.write(fd, b"\n")
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._size = os.fstat(fd).st_size   # kept up to date by write(): no stat per batch

    def write(self, records):
        """Append ``[(qid, rcpt, mailbox, where)]`` with one write and no flush:
        the caller's flush (the Maildir batch's, which includes :attr:`path`,
        or :meth:`sync`) makes them durable.  Call it before the copies become visible."""
        data = b"".join(encode(*r) for r in records)
        if not data:
            return
        with self._lock:
            if self._fd is None:
                self._open()
            elif self._size > ROTATE_BYTES:
                self._rotate()
            write_all(self._fd, data)
            self._size += len(data)

    def _rotate(self):
        """Start a new file; the previous one is kept one more round."""
        now = self._clock()
        if now - self._rotated < ROTATE_AGE:
            return
        self._rotated = now
        os.replace(self.path, self.old_path)
        os.close(self._fd)
        self._fd = None
        self._open()

    def sync(self):
        with self._lock:
            if self._fd is not None:
                os.fdatasync(self._fd)

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- lookups ----------------------------------------------------------------------

    def find(self, qid, location):
        """Where the copy of message ``qid`` in ``location`` went, or None."""
        with self._lock:
            if self._index is None:
                self._index = {}
                self._scan(everything=True)
            where = self._index.get((qid, location))
            if where is None:
                self._scan(everything=False)   # appended since, by any worker
                where = self._index.get((qid, location))
            return where

    def _scan(self, everything):
        try:
            names = sorted(n for n in os.listdir(self.directory) if LOG_NAME.match(n))
        except FileNotFoundError:
            return
        horizon = self.started + FUTURE_MARGIN
        for name in names:
            path = os.path.join(self.directory, name)
            ino, start = self._consumed.get(path, (None, 0))
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    size = st.st_size
                    if st.st_ino != ino or size < start:   # replaced (rotated, compacted)
                        start = 0
                    f.seek(start)
                    data = f.read(size - start)
            except FileNotFoundError:
                self._consumed.pop(path, None)
                continue
            end = data.rfind(b"\n") + 1
            for rec, _ in _records(data[:end]):
                if everything or qid_time(rec["q"]) <= horizon:
                    self._index[(rec["q"], rec["l"])] = rec.get("w")
            self._consumed[path] = (st.st_ino, start + end)


def compact(directory, live):
    """Keep only the records of queue ids in ``live`` (start-up of worker 0, before
    any MDA runs); a file left with nothing is removed.  Returns the number of
    records kept."""
    live = set(live)
    try:
        names = [n for n in os.listdir(directory) if LOG_NAME.match(n)]
    except FileNotFoundError:
        return 0
    kept_total = 0
    for name in names:
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
        kept = [line + b"\n" for rec, line in _records(data) if rec["q"] in live]
        kept_total += len(kept)
        if not kept:
            os.unlink(path)
        elif sum(map(len, kept)) != len(data):
            write_atomically(path, b"".join(kept))
    return kept_total
