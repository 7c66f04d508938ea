"""Maildir (qmail's maildir(5), as Dovecot reads it).

Delivery: write ``tmp/<unique>``, make it durable, hard-link it into ``new/``
(a link never replaces an existing name, unlike rename), remove the tmp name,
make ``new/`` durable, and only then report success.  Messages delivered
together are flushed together (mailsys.mda.durable): every file of the batch,
then every ``new/`` the batch touched once, not file-link-directory per
message.  Unique names are
``<sec>.M<usec>P<pid>Q<counter>.<host>,S=<size>,W=<crlf-size>``: ``S`` is the
size on disk (LF line ends) and ``W`` the RFC 822 size with CRLF, which Dovecot
uses without opening the file.

With a delivery log (mailsys.mda.dedupe) each copy's final name is recorded
after its bytes are written to ``tmp/`` and before the first flush, which
makes the record durable with the file (the log is one more path of that
flush); nothing reaches ``new/`` unrecorded.
"""
import itertools
import os
import socket
import threading
import time

from zope.interface import implementer

from mailsys.delivery import Delivered, PermFail, from_os_error
from mailsys.mda import durable
from mailsys.mda.store import IMailStore, body_parts, make_private_dirs
from mailsys.smtp.reply import Reply

OVER_QUOTA = Reply(552, "5.2.2", "Mailbox full: over quota")

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 16


def _encoded_host():
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


# The process id in every unique name: os.getpid() is a system call per name
# (glibc keeps no cache), so it is kept here and renewed in a forked child.
_pid = os.getpid()


def _renew_pid():
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


@implementer(IMailStore)
class MaildirStore:
    kind = "maildir"

    def __init__(self, flush=durable.flush):
        self._counter = itertools.count(1)
        self._host = _encoded_host()
        self._lock = threading.Lock()
        self._flush = flush

    def _unique(self, size, vsize):
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        with self._lock:
            q = next(self._counter)
        return f"{sec}.M{usec}P{_pid}Q{q}.{self._host},S={size},W={vsize}"

    def _ensure(self, path):
        """Create the Maildir and what leads to it, and make those entries durable
        before a message goes in: the batch's own flushes cover the files in
        ``tmp/`` and the links in ``new/``, not ``new/`` itself or the home."""
        # The mailbox root is ROOT/<domain>/<local>/Maildir: three levels above it.
        changed = make_private_dirs(path, os.path.dirname(os.path.dirname(os.path.dirname(path))))
        for sub in ("tmp", "new", "cur"):
            try:
                os.mkdir(os.path.join(path, sub), 0o700)
            except FileExistsError:
                pass
        self._flush(sorted(set(changed) | {path}))

    def size(self, path):
        total = 0
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(path, sub))
            except FileNotFoundError:
                continue
            for name in names:
                total += _size_from_name(os.path.join(path, sub), name)
        return total

    def deliver(self, path, prefix, message, quota, sender=None, when=None):
        return self.deliver_many([(path, prefix, message, quota, sender, when)])[0]

    def deliver_many(self, items, log=None, keys=None):
        """Deliver several messages; one Outcome per item, in order.

        ``keys[i]``, when given, is ``(queue id, recipient)``: item i's final name
        goes to the delivery ``log`` before the copy becomes visible."""
        outcomes = [None] * len(items)
        sizes = {}
        written = []    # (index, path, tmp, name)
        known = {}      # chunks, size, line ends per message: once however many mailboxes get it
        for i, (path, head, body, quota, _, _) in enumerate(items):
            parts = known.get(id(body))
            if parts is None:
                parts = known[id(body)] = body_parts(body)
            chunks, body_size, n = parts
            data = [head, *chunks]
            size = len(head) + body_size
            if quota:
                used = sizes.get(path)
                if used is None:
                    used = self.size(path)
                if used + size > quota:
                    outcomes[i] = PermFail(OVER_QUOTA)
                    continue
                sizes[path] = used + size
            try:
                # W= is the size with CRLF: one more byte per LF.
                tmp, name = self._write_tmp(path, data, size, size + head.count(b"\n") + n)
            except OSError as e:
                outcomes[i] = from_os_error(e)
                continue
            written.append((i, path, tmp, name))
        if not written:
            return outcomes
        flush = [tmp for _, _, tmp, _ in written]
        recorded = [(keys[i], path, name) for i, path, _, name in written
                    if log is not None and keys and keys[i]]
        try:
            if recorded:
                log.write([(qid, rcpt, path, name) for (qid, rcpt), path, name in recorded])
                flush.append(log.path)
            self._flush(flush)
        except OSError as e:
            for i, _, tmp, _ in written:
                _unlink(tmp)
                outcomes[i] = from_os_error(e)
            return outcomes
        linked = []
        for i, path, tmp, name in written:
            # On a name clash in new/ (never seen in practice) the new name is
            # recorded before the link too; its flush is the one of new/ below.
            rename = None
            if recorded and keys[i]:
                rename = (lambda key, path: lambda new: log.write([key + (path, new)]))(keys[i], path)
            try:
                self._link_new(path, tmp, name, rename)
                linked.append((i, path))
            except OSError as e:
                _unlink(tmp)
                outcomes[i] = from_os_error(e)
        if linked:
            try:
                self._flush(sorted({os.path.join(p, "new") for _, p in linked}))
                for i, _ in linked:
                    outcomes[i] = Delivered()
            except OSError as e:
                for i, _ in linked:
                    outcomes[i] = from_os_error(e)
        return outcomes

    def _write_tmp(self, path, parts, size, vsize):
        for attempt in (0, 1):
            name = self._unique(size, vsize)
            tmp = os.path.join(path, "tmp", name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileNotFoundError:
                if attempt:
                    raise
                self._ensure(path)   # first delivery, or the Maildir was removed
        try:
            _write_all(fd, parts)
        except OSError:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        return tmp, name

    def _link_new(self, path, tmp, name, renamed=None):
        size_part = name.split(",", 1)[1]
        while True:
            try:
                os.link(tmp, os.path.join(path, "new", name))
                break
            except FileExistsError:
                # Never overwrite: pick a new name (the counter moves on).
                base = self._unique(0, 0).split(",", 1)[0]
                name = f"{base},{size_part}"
                if renamed is not None:
                    renamed(name)
        os.unlink(tmp)
        return name

    def holds(self, path, name):
        """Whether the Maildir at ``path`` holds the file ``name`` (a delivery log
        record): in new/, or in cur/ under the same name with a ``:2,...`` info
        suffix as a reader leaves it."""
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            return False
        if os.path.exists(os.path.join(path, "new", name)):
            return True
        prefix = name + ":"
        try:
            with os.scandir(os.path.join(path, "cur")) as entries:
                return any(e.name == name or e.name.startswith(prefix) for e in entries)
        except FileNotFoundError:
            return False

    def messages(self, path):
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(path, sub)
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                with open(os.path.join(d, name), "rb") as f:
                    out.append((name.split(".", 1)[0], name, f.read()))
        out.sort(key=lambda t: (int(t[0]) if t[0].isdigit() else 0, t[1]))
        return [m for _, _, m in out]


def _write_all(fd, parts):
    """``writev`` of ``parts`` in groups the kernel takes (at most IOV_MAX
    buffers), finishing any short write (legal, if rare on a regular file)."""
    for start in range(0, len(parts), _IOV_MAX):
        group = parts[start:start + _IOV_MAX]
        written = os.writev(fd, group)
        want = sum(map(len, group))
        if written < want:
            rest = memoryview(b"".join(group))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _size_from_name(directory, name):
    for part in name.split(":", 1)[0].split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            return int(part[2:])
    try:
        return os.stat(os.path.join(directory, name)).st_size
    except OSError:
        return 0
