"""The durable spool: the one way into the queue.

Design (measured, see docs/spool.rst and docs/performance.rst): messages are
appended as self-checking records to a segment file, and the writes of every
message that finished at about the same time are made durable together by one
``fdatasync`` (group commit) on a dedicated writer thread, off the reactor.  A
message is acknowledged only after the fdatasync that covers it has returned.

A record is visible only when it is complete and its CRC matches: a crash at any
moment leaves every acknowledged message intact and at most a torn tail, which
start-up cuts off.  Bodies larger than the in-memory budget are streamed to a
scratch file under ``incoming/`` while they arrive (bounded memory whatever the
size) and copied into the segment at commit; scratch files are never part of
the queue and are removed at start-up.
"""
import errno
import json
import os
import struct
import time
import zlib

from twisted.internet import defer
from twisted.logger import Logger

from mailsys.compactjson import dumpb
from mailsys.files import fsync_dir, write_all
from mailsys.offload import Offload

log = Logger(namespace="mailsys.spool")

MAGIC = b"MSY1"
# magic, envelope length, message length, CRC-32 of the envelope, CRC-32 of the message
HEADER = struct.Struct(">4sIQII")
SEGMENT_LIMIT = 128 * 1024 * 1024
MEMORY_PER_MESSAGE = 4 * 1024 * 1024   # larger bodies spill to incoming/
MEMORY_BUDGET = 128 * 1024 * 1024      # all in-memory bodies together
MAX_ENVELOPE = 16 * 1024 * 1024
ENTRY_READ = 64 * 1024   # read_entry: one pread covers a record of up to this size



class SpoolError(Exception):
    """Writing failed; ``nospace`` tells the caller to answer 452 4.3.1 rather than 451 4.3.0."""

    def __init__(self, message, nospace=False):
        super().__init__(message)
        self.nospace = nospace


class QueueIds:
    """Unique, sortable, filename-safe queue ids (hex, as Postfix's short ids).

    Microseconds since the epoch times 1024 plus a counter, times 16 plus the
    worker number: unique across worker processes even when the clock stalls,
    sortable by arrival, and never reused after a restart unless the clock goes
    back.
    """

    def __init__(self, clock=time.time, worker=0):
        self._clock = clock
        self._last = 0
        self._worker = worker   # low four bits: ids of concurrent workers never collide

    def next(self):
        n = int(self._clock() * 1_000_000) << 10
        if n <= self._last:
            n = self._last + 1
        self._last = n
        return f"{n * 16 + self._worker:X}"


class MessageWriter:
    """Collects one message body as it arrives, in memory or spilled to a file."""

    __slots__ = ("spool", "queue_id", "chunks", "size", "crc", "spill_fd", "spill_path",
                 "head", "_budgeted", "closed")

    def __init__(self, spool, queue_id):
        self.spool = spool
        self.queue_id = queue_id
        self.chunks = []
        self.size = 0
        self.crc = 0
        self.spill_fd = None
        self.spill_path = None
        self.head = b""          # the first bytes, for header checks by the caller
        self._budgeted = 0
        self.closed = False

    def write(self, chunk):
        self.size += len(chunk)
        self.crc = zlib.crc32(chunk, self.crc)
        if len(self.head) < 65536:
            self.head += chunk[:65536 - len(self.head)]
        if self.spill_fd is None:
            if self.size <= MEMORY_PER_MESSAGE and self.spool._reserve(len(chunk)):
                self._budgeted += len(chunk)
                self.chunks.append(chunk)
                return
            self._spill()
        write_all(self.spill_fd, chunk)

    def _spill(self):
        path = os.path.join(self.spool.incoming, f"{self.queue_id}.{self.spool.worker:02d}")
        self.spill_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.spill_path = path
        for c in self.chunks:
            write_all(self.spill_fd, c)
        self.chunks = []
        self.spool._release(self._budgeted)
        self._budgeted = 0

    def discard(self):
        if self.closed:
            return
        self.closed = True
        self.chunks = []
        self.spool._release(self._budgeted)
        self._budgeted = 0
        if self.spill_fd is not None:
            os.close(self.spill_fd)
            try:
                os.unlink(self.spill_path)
            except OSError:
                pass
            self.spill_fd = None


class SpoolEntry:
    """A queued message as found in a segment: where it is and its envelope."""

    __slots__ = ("queue_id", "segment", "offset", "envelope", "message_offset", "message_size")

    def __init__(self, queue_id, segment, offset, envelope, message_offset, message_size):
        self.queue_id = queue_id
        self.segment = segment
        self.offset = offset
        self.envelope = envelope
        self.message_offset = message_offset
        self.message_size = message_size

    def read_message(self):
        fd = os.open(self.segment, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _pread_all(fd, self.message_size, self.message_offset)
        finally:
            os.close(fd)


def _pread_all(fd, size, offset):
    """``size`` bytes at ``offset`` (fewer only at end of file)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _header(data):
    """(envelope length, message length, envelope CRC, message CRC) of the record
    header at the start of ``data``, or None if it is none of ours."""
    magic, elen, mlen, ecrc, mcrc = HEADER.unpack_from(data)
    if magic != MAGIC or elen > MAX_ENVELOPE:
        return None
    return elen, mlen, ecrc, mcrc


def _entry(segment, pos, env_bytes, ecrc, mlen):
    """The SpoolEntry of the record at ``pos`` whose (already checked) message
    is ``mlen`` bytes, if its envelope is intact; else None."""
    if zlib.crc32(env_bytes) != ecrc:
        return None
    try:
        envelope = json.loads(env_bytes)
    except ValueError:
        return None
    return SpoolEntry(envelope.get("id"), segment, pos, envelope, pos + HEADER.size + len(env_bytes), mlen)


def _read_record(f, pos, size):
    """The intact record at ``pos`` as (SpoolEntry, next position), or None."""
    f.seek(pos)
    hdr = f.read(HEADER.size)
    if len(hdr) < HEADER.size:
        return None
    fields = _header(hdr)
    if fields is None:
        return None
    elen, mlen, ecrc, mcrc = fields
    if pos + HEADER.size + elen + mlen > size:
        return None
    env_bytes = f.read(elen)
    c = 0
    left = mlen
    while left:
        block = f.read(min(left, 1 << 20))
        if not block:
            return None
        c = zlib.crc32(block, c)
        left -= len(block)
    if c != mcrc:
        return None
    entry = _entry(f.name, pos, env_bytes, ecrc, mlen)
    return (entry, pos + HEADER.size + elen + mlen) if entry is not None else None


def _next_intact(f, pos, size):
    """Offset of the first intact record after ``pos``, or None (only a torn tail)."""
    f.seek(pos)
    carry = b""
    base = pos
    while base < size:
        block = carry + f.read(1 << 20)
        if len(block) == len(carry):
            return None
        i = block.find(MAGIC)
        while i >= 0:
            found = _read_record(f, base - len(carry) + i, size)
            if found is not None:
                return base - len(carry) + i
            i = block.find(MAGIC, i + 1)
        base += len(block) - len(carry)
        carry = block[-(len(MAGIC) - 1):]
        f.seek(base)
    return None


def scan_segment(path, repair=False):
    """The intact records of one segment; with ``repair``, cut a torn tail.

    A record that fails its checks at the very end is a write that a crash
    interrupted (never acknowledged) and is cut off.  One that fails in the
    middle (damage on disk) is skipped with an error logged, and the intact,
    acknowledged records after it are kept: nothing after damage is thrown away.
    """
    entries = []
    with open(path, "r+b" if repair else "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = good_end = 0
        while pos < size:
            found = _read_record(f, pos, size)
            if found is not None:
                entry, pos = found
                entries.append(entry)
                good_end = pos
                continue
            later = _next_intact(f, pos + 1, size)
            if later is None:
                break
            log.error("spool: damaged data in {segment} at {offset}: {count} bytes skipped",
                      segment=path, offset=pos, count=later - pos)
            pos = later
        if good_end < size and repair:
            log.warn("spool: cutting torn tail of {segment} at {offset} ({lost} bytes never acknowledged)",
                     segment=path, offset=good_end, lost=size - good_end)
            f.truncate(good_end)
            os.fsync(f.fileno())
    return entries, good_end


def read_entry(segment, offset):
    """The record at ``offset`` of ``segment`` (a worker's notification), or None.

    Checked as the start-up scan checks it (both CRCs), but read with one
    ``pread`` for a record of up to :data:`ENTRY_READ` bytes: worker 0 does this
    for every message another worker receives, and Python's buffered file
    object with its seeks and reads was a twelfth of worker 0's work."""
    try:
        fd = os.open(segment, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, ENTRY_READ, offset)
        fields = _header(data) if len(data) >= HEADER.size else None
        if fields is None:
            return None
        elen, mlen, ecrc, mcrc = fields
        need = HEADER.size + elen + mlen
        if len(data) < need:
            data = _pread_all(fd, need, offset)
            if len(data) < need:
                return None
    finally:
        os.close(fd)
    view = memoryview(data)
    if zlib.crc32(view[HEADER.size + elen:need]) != mcrc:
        return None
    return _entry(segment, offset, bytes(view[HEADER.size:HEADER.size + elen]), ecrc, mlen)


def read_spool(directory):
    """Every complete message in the spool at ``directory`` (read-only; tools and tests).

    A running server removes a segment once every message in it is done, so a
    segment listed here may be gone when it is opened: it held nothing queued
    and is skipped."""
    out = []
    seg_dir = os.path.join(directory, "segments")
    if not os.path.isdir(seg_dir):
        return out
    for name in sorted(os.listdir(seg_dir)):
        if name.endswith(".seg"):
            try:
                out.extend(scan_segment(os.path.join(seg_dir, name))[0])
            except FileNotFoundError:
                continue
    return out


class Spool:
    """Appends messages to segment files with group commit; see the module docstring."""

    def __init__(self, directory, reactor, *, segment_limit=SEGMENT_LIMIT, fsync=True, worker=0):
        self.directory = directory
        self.reactor = reactor
        self.worker = worker
        self.segments = os.path.join(directory, "segments")
        self.incoming = os.path.join(directory, "incoming")
        self.segment_limit = segment_limit
        self.fsync = fsync
        self.ids = QueueIds(worker=worker)
        self.entries = []
        self._memory = 0
        self._pending = []
        self._flushing = False
        self._fd = None
        self._seg_path = None
        self._seg_no = 0
        self._seg_size = 0
        self._seg_count = 0
        self._pool = None
        self.on_commit = []      # callables(entry) told of each durable message
        # callables(path, count) told when the writer leaves a segment for a new
        # one, with how many messages it committed to it (after their on_commit)
        self.on_close = []
        # self.entries: what open() found (for the queue to load); not kept up to date.

    # -- start-up ---------------------------------------------------------------

    def open(self, everything=True):
        """Create the layout, cut torn tails, drop scratch files, index the queue.

        Each worker process appends only to segments named after it.  The first
        process (``everything``) repairs and indexes every segment before any
        worker runs; a worker restarted on its own repairs only its own.
        """
        for d in (self.directory, self.segments, self.incoming):
            os.makedirs(d, mode=0o700, exist_ok=True)
        mine = f"{self.worker:02d}-"
        for name in os.listdir(self.incoming):
            if everything or name.endswith(f".{self.worker:02d}"):
                os.unlink(os.path.join(self.incoming, name))
        names = sorted(n for n in os.listdir(self.segments)
                       if n.endswith(".seg") and not n.startswith(".")
                       and (everything or n.startswith(mine)))
        for name in names:
            entries, _ = scan_segment(os.path.join(self.segments, name), repair=True)
            if everything:
                self.entries.extend(entries)
            if name.startswith(mine):
                self._seg_no = max(self._seg_no, int(name[len(mine):-4], 16))
        fsync_dir(self.segments)
        self._pool = Offload(self.reactor, "mailsys-spool")
        self._pool.start()
        self._new_segment()
        if everything:
            log.info("spool: {count} queued messages in {segments} segments",
                     count=len(self.entries), segments=len(names))
        return self.entries

    @property
    def current_segment(self):
        return self._seg_path

    def close(self):
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _new_segment(self):
        old, count = self._seg_path, self._seg_count
        if self._fd is not None:
            os.close(self._fd)
        self._seg_no += 1
        self._seg_path = os.path.join(self.segments, f"{self.worker:02d}-{self._seg_no:08X}.seg")
        # Not O_APPEND: the writer thread owns the position (pwritev at known
        # offsets), and copy_file_range refuses O_APPEND destinations.
        self._fd = os.open(self._seg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._seg_size = 0
        self._seg_count = 0
        fsync_dir(self.segments)
        if old is not None:
            # Only between flushes (_start_flush): every message committed to the
            # old segment has had its on_commit, so a listener has heard of them all.
            for notify in self.on_close:
                notify(old, count)

    # -- memory budget ----------------------------------------------------------

    def _reserve(self, n):
        if self._memory + n > MEMORY_BUDGET:
            return False
        self._memory += n
        return True

    def _release(self, n):
        self._memory -= n

    # -- writing ----------------------------------------------------------------

    def new_message(self, queue_id=None):
        return MessageWriter(self, queue_id or self.ids.next())

    def commit(self, writer, envelope, notify=True):
        """Make the message durable; the Deferred fires (with its SpoolEntry) only
        after the fdatasync covering it returned, or fails with SpoolError.
        ``notify=False``: not a new message (the queue's copy of one it has,
        mailsys.queue), so :attr:`on_commit` is not told; it still counts in
        the segment's total."""
        envelope = dict(envelope, id=writer.queue_id, size=writer.size)
        env_bytes = dumpb(envelope)
        header = HEADER.pack(MAGIC, len(env_bytes), writer.size, zlib.crc32(env_bytes), writer.crc)
        d = defer.Deferred()
        self._pending.append((writer, header, env_bytes, envelope, d, notify))
        if not self._flushing:
            self._start_flush()
        return d

    def _start_flush(self):
        batch, self._pending = self._pending, []
        self._flushing = True
        if self._seg_size >= self.segment_limit:
            self._new_segment()
        d = self._pool.run(self._write_batch,
                           [(w.chunks, w.spill_fd, w.size, h, e) for w, h, e, _, _, _ in batch],
                           self._fd, self._seg_size)
        d.addBoth(self._flushed, batch)

    def _write_batch(self, records, fd, start):
        """Writer thread: append every record, one fdatasync; undo on error."""
        pos = start
        offsets = []
        try:
            for chunks, spill_fd, size, header, env in records:
                offsets.append(pos)
                iov = [header, env]
                iov.extend(chunks)
                for i in range(0, len(iov), 512):
                    pos = _pwrite_all(fd, iov[i:i + 512], pos)
                if spill_fd is not None:
                    _copy_spill(spill_fd, fd, size, pos)
                    pos += size
            if self.fsync:
                os.fdatasync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise SpoolError(f"{e.strerror or e}", nospace=e.errno in (errno.ENOSPC, errno.EDQUOT))
        return offsets, pos

    def _flushed(self, result, batch):
        self._flushing = False
        if isinstance(result, Exception) or hasattr(result, "value"):
            err = result.value if hasattr(result, "value") else result
            if not isinstance(err, SpoolError):
                err = SpoolError(str(err))
            log.error("spool: write failed, {count} messages refused: {error}",
                      count=len(batch), error=str(err))
            for w, _, _, _, d, _ in batch:
                w.discard()
                d.errback(err)
        else:
            offsets, self._seg_size = result
            self._seg_count += len(batch)
            for (w, header, env, envelope, d, notify), off in zip(batch, offsets):
                w.discard()
                entry = SpoolEntry(envelope["id"], self._seg_path, off, envelope,
                                   off + HEADER.size + len(env), envelope["size"])
                d.callback(entry)
                if notify:
                    for listener in self.on_commit:
                        listener(entry)
        if self._pending:
            self._start_flush()


def _pwrite_all(fd, buffers, pos):
    """Write ``buffers`` at ``pos``; a short write (legal) continues where it stopped."""
    want = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, pos)
    if written < want:
        rest = b"".join(buffers)[written:]
        view = memoryview(rest)
        at = pos + written
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
    return pos + want


def _copy_spill(src, dst, size, at):
    """Copy a scratch body into the segment at ``at``, in the kernel when it can."""
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(src, dst, size - offset, offset, at + offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            n = 0
        if n == 0:
            block = os.pread(src, min(1 << 20, size - offset), offset)
            if not block:
                raise OSError(errno.EIO, "scratch file shorter than its message")
            _pwrite_all(dst, [block], at + offset)
            n = len(block)
        offset += n



class SegmentReaper:
    """Deletes a segment while the server runs, once its writer has closed it and
    every message in it is done.

    Why: start-up deletes finished segments (mailsys.queue.open_queue), but a
    server that runs for months must not keep every message it received until
    its next restart.  Certainty comes from counts, not from guessing: a
    writer that moves on to a new segment reports how many messages it
    committed to the old one (:attr:`Spool.on_close`, through the worker pipe
    for the other workers, in order behind their "spooled" notices), and the
    queue reports every message it learns of (:meth:`track`) and every one
    that is done (:meth:`done`, once the journal holds its recipients' final
    states).  A segment goes only when the queue has seen exactly as many of
    its messages as were committed and none is left: a notice still in the
    pipe, or one lost with a worker that died, keeps it until the next
    start-up scan.  Segments found at start-up are closed, and the scan saw
    all of them (:meth:`close` with the count loaded).  A message deferred for
    days keeps its segment until the queue copies it forward (mailsys.queue,
    :meth:`stranded`).

    It also remembers which messages of a segment still on disk are done
    (:meth:`done_marks`): the queue's journal, compacted while the server runs,
    must keep saying so, or a restart would deliver them again.
    """

    def __init__(self, unlink=os.unlink):
        self._live = {}          # segment path -> queue ids not done
        self._seen = {}          # segment path -> messages the queue learnt of
        self._closed = {}        # segment path -> messages its writer committed
        self._done = {}          # segment path -> queue ids done (the segment is still there)
        self._total = {}         # segment path -> messages in it, done or not (once closed)
        self._unlink = unlink
        self.removed = 0

    def track(self, segment, qid):
        self._live.setdefault(segment, set()).add(qid)
        self._seen[segment] = self._seen.get(segment, 0) + 1

    def seen(self, segment):
        return self._seen.get(segment, 0)

    def close(self, segment, committed, total=None):
        """The writer left ``segment`` after ``committed`` messages the queue is
        to hear of; ``total`` counts the done ones too where they differ (a
        segment found at start-up, whose done messages are not tracked)."""
        self._closed[segment] = committed
        self._total[segment] = committed if total is None else total
        self._check(segment)

    def done(self, segment, qid):
        self._done.setdefault(segment, set()).add(qid)
        live = self._live.get(segment)
        if live is not None:
            live.discard(qid)
            self._check(segment)

    def stranded(self, segment, share):
        """Whether ``segment`` is closed and at most ``share`` of the messages
        committed to it are still queued: worth copying those few forward
        (mailsys.queue) rather than keeping the whole file for them."""
        total = self._total.get(segment)
        live = self._live.get(segment)
        return bool(total and live) and len(live) <= share * total

    def finished(self, segment, qid):
        """``qid`` is done, but its segment is still being read (a delivery in
        progress): remember the mark without letting the segment go; :meth:`done`
        follows."""
        self._done.setdefault(segment, set()).add(qid)

    def remember_done(self, segment, qids):
        """Messages found done at start-up in a segment that stays."""
        if qids:
            self._done.setdefault(segment, set()).update(qids)

    def done_marks(self):
        """Every queue id known to be done whose segment is still on disk."""
        for qids in self._done.values():
            yield from qids

    def _check(self, segment):
        committed = self._closed.get(segment)
        if committed is None or self._live.get(segment) or self._seen.get(segment, 0) < committed:
            return
        self._live.pop(segment, None)
        self._seen.pop(segment, None)
        self._total.pop(segment, None)
        del self._closed[segment]
        try:
            self._unlink(segment)
        except FileNotFoundError:
            self._done.pop(segment, None)
            return
        except OSError as e:     # it stays on disk: so do its done marks
            log.error("spool: cannot remove finished segment {segment}: {error}",
                      segment=segment, error=e.strerror)
            return
        self._done.pop(segment, None)
        self.removed += 1
        log.info("spool: removed segment {name}: every message in it is done",
                 name=os.path.basename(segment), segment=segment)
