"""Maildir (qmail's maildir(5), as Dovecot reads it).

Delivery: write ``tmp/<unique>``, fsync it, hard-link it into ``new/`` (a link
never replaces an existing name, unlike rename), remove the tmp name, fsync
``new/``, and only then report success.  Unique names are
``<sec>.M<usec>P<pid>Q<counter>.<host>,S=<size>,W=<crlf-size>``: ``S`` is the
size on disk (LF line ends) and ``W`` the RFC 822 size with CRLF, which Dovecot
uses without opening the file.
"""
import errno
import itertools
import os
import socket
import threading
import time

from zope.interface import implementer

from mailsys.delivery import Delivered, PermFail, from_os_error
from mailsys.mda.store import IMailStore, to_lf
from mailsys.smtp.reply import Reply

OVER_QUOTA = Reply(552, "5.2.2", "Mailbox full: over quota")


def _encoded_host():
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


@implementer(IMailStore)
class MaildirStore:
    kind = "maildir"

    def __init__(self):
        self._counter = itertools.count(1)
        self._host = _encoded_host()
        self._made = set()
        self._lock = threading.Lock()

    def _unique(self, size, vsize):
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        with self._lock:
            q = next(self._counter)
        return f"{sec}.M{usec}P{os.getpid()}Q{q}.{self._host},S={size},W={vsize}"

    def _ensure(self, path):
        if path in self._made:
            return
        for sub in ("", "/tmp", "/new", "/cur"):
            try:
                os.makedirs(path + sub, mode=0o700, exist_ok=True)
            except FileExistsError:
                pass
        self._made.add(path)

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
        data = to_lf(prefix + message)
        size = len(data)
        vsize = size + data.count(b"\n")
        if quota and self.size(path) + size > quota:
            return PermFail(OVER_QUOTA)
        tmp = None
        try:
            self._ensure(path)
            name = self._unique(size, vsize)
            tmp = os.path.join(path, "tmp", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            while True:
                try:
                    os.link(tmp, os.path.join(path, "new", name))
                    break
                except FileExistsError:
                    # Never overwrite: pick a new name (the counter moves on).
                    name = self._unique(size, vsize)
            os.unlink(tmp)
            tmp = None
            _fsync_dir(os.path.join(path, "new"))
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._made.discard(path)
            return from_os_error(e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return Delivered()

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


def _size_from_name(directory, name):
    for part in name.split(":", 1)[0].split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            return int(part[2:])
    try:
        return os.stat(os.path.join(directory, name)).st_size
    except OSError:
        return 0


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
