"""The queue's per-recipient state: an append-only journal next to the spool.

The spool keeps each message as it arrived and is never rewritten; what
happened to each recipient since is recorded here, one small record per
event, made durable before the queue acts on it (group commit, like the
spool: one ``fdatasync`` for every record written meanwhile).  So a crash at
any moment loses no recipient and re-sends nothing the journal knows as sent.

Records are ``length (4) | CRC-32 (4) | JSON``; replay stops at the first torn
or corrupt record, which a crash can leave only at the end.  At start-up the
queue rewrites the journal with just the live state (compaction): write a new
file, fsync, rename over the old, fsync the directory.

A server that runs for months compacts it while running too: every record
sets a value (a recipient's state, the next attempt, a hold, done), so the
queue's state now, written as records, followed by the records not yet
written, replays to the same queue.  Once the file has grown by
:data:`COMPACT_AFTER` bytes (and to twice its size after the last
compaction), the next write is that: a new file holding ``snapshot()`` and
the pending records, fsynced and renamed over the old one.  Without it the
journal grew by some 160 bytes per message until the next restart, which then
read every record into memory.
"""
import json
import os
import struct
import zlib

from twisted.internet import defer
from twisted.logger import Logger

from mailsys.compactjson import dumpb
from mailsys.files import fsync_dir, write_all, write_atomically
from mailsys.offload import Offload

log = Logger(namespace="mailsys.queue")

HEADER = struct.Struct(">II")
LAZY_DELAY = 1.0     # seconds a non-durable record may wait for company
MAX_RECORD = 1 << 20
# Bytes of growth before the journal is compacted while running.  The
# environment variable is for tests that want compactions by the dozen (the
# kill -9 test runs with 4 KiB); operators have no reason to set it.
COMPACT_AFTER = int(os.environ.get("MAILSYS_JOURNAL_COMPACT_AFTER") or 64 << 20)


def encode(record):
    data = dumpb(record)
    return HEADER.pack(len(data), zlib.crc32(data)) + data


def replay(path):
    """Every intact record of the journal at ``path`` (empty if there is none)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out, pos = [], 0
    while pos + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size:pos + HEADER.size + length]
        if length > MAX_RECORD or len(body) < length or zlib.crc32(body) != crc:
            log.warn("journal: ignoring {n} bytes of torn tail in {path}", n=len(data) - pos, path=path)
            break
        try:
            out.append(json.loads(body))
        except ValueError:
            break
        pos += HEADER.size + length
    return out


def rewrite(path, records):
    """Replace the journal by ``records`` atomically (compaction)."""
    write_atomically(path, b"".join(encode(r) for r in records))


class Journal:
    """Appends records; ``append`` fires once the record is durable."""

    def __init__(self, path, reactor, run=None, fsync=True):
        self.path = path
        self.reactor = reactor
        self.fsync = fsync
        self._fd = None
        self._pending = []
        self._writing = False
        self._pool = None
        self._run = run or self._in_thread
        self._lazy = None
        self.failed = None
        # Compaction while running (see the module docstring): the queue's
        # state as records, and directories to make durable first (the spool's
        # segment directory: a segment whose done marks are dropped must stay
        # deleted after a crash).
        self.snapshot = None
        self.sync_first = ()
        self.size = 0
        self._compact_at = COMPACT_AFTER
        self.compactions = 0

    def open(self):
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._compacted_to(os.fstat(self._fd).st_size)

    def _compacted_to(self, size):
        """The file now holds ``size`` bytes of live state: the next compaction
        comes after COMPACT_AFTER more, and not before the file doubles."""
        self.size = size
        self._compact_at = max(size + COMPACT_AFTER, 2 * size)

    def close(self):
        if self._lazy is not None and self._lazy.active():
            self._lazy.cancel()
        if self._pool is not None:
            self._pool.stop()       # finishes a write (or compaction) under way
            self._pool = None
        if self._pending and self._fd is not None:
            try:    # what is still buffered (non-durable records) goes out now
                self._write(b"".join(b for b, _ in self._pending))
            except OSError:
                pass
            self._pending = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _in_thread(self, f, *args):
        if self._pool is None:
            self._pool = Offload(self.reactor, "mailsys-journal")
        return self._pool.run(f, *args)

    def append(self, *records, durable=True):
        """Append ``records``.  Durable ones fire once on disk; the others (a
        deferral and its next attempt time: losing them only means an earlier
        retry) ride along with the next write, or go within a second, and fire
        at once: the hot path pays no fdatasync for them."""
        blob = b"".join(encode(r) for r in records)
        if not durable:
            self._pending.append((blob, None))
            if not self._writing and self._lazy is None:
                self._lazy = self.reactor.callLater(LAZY_DELAY, self._lazy_flush)
            return defer.succeed(None)
        d = defer.Deferred()
        self._pending.append((blob, d))
        if not self._writing:
            self._flush()
        return d

    def _lazy_flush(self):
        self._lazy = None
        if self._pending and not self._writing:
            self._flush()

    def _flush(self):
        if self._lazy is not None and self._lazy.active():
            self._lazy.cancel()
        self._lazy = None
        if self._fd is None:        # closed: close() wrote what was pending
            return
        batch, self._pending = self._pending, []
        self._writing = True
        blob = b"".join(b for b, _ in batch)
        if self.snapshot is not None and self.size >= self._compact_at:
            d = self._run(self._compact, [encode(r) for r in self.snapshot()], blob)
        else:
            self.size += len(blob)
            d = self._run(self._write, blob)
        d.addBoth(self._written, batch)

    def _write(self, blob):
        write_all(self._fd, blob)
        if self.fsync:
            os.fdatasync(self._fd)

    def _compact(self, state, blob):
        """Writer thread: replace the journal by ``state`` (encoded records)
        followed by ``blob`` (``write_atomically``: the old file stays whole
        until the rename), then append to the new one."""
        for directory in self.sync_first:
            fsync_dir(directory)
        data = b"".join(state) + blob
        write_atomically(self.path, data)
        old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.close(old)
        return len(data)

    def _written(self, result, batch):
        self._writing = False
        failure = result if hasattr(result, "value") else None
        if failure is None and result is not None:      # a compaction: the new size
            self._compacted_to(result)
            self.compactions += 1
            log.info("journal: compacted to {size} bytes", size=result)
        for _, d in batch:
            if d is None:
                continue
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure.value if hasattr(failure, "value") else failure)
        if failure is not None:
            self.failed = failure.value
            log.error("journal: write failed: {error}; the queue stops acting on results "
                      "until it is restarted", error=str(failure.value))
        if any(d is not None for _, d in self._pending):
            self._flush()
        elif self._pending and self._lazy is None:
            # Only lazy records came in meanwhile (typically a message's
            # "done", appended as its last "sent" became durable): they wait
            # for company or a second, as when nothing was being written.
            self._lazy = self.reactor.callLater(LAZY_DELAY, self._lazy_flush)
        return None

