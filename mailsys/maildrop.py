"""The maildrop: ``mailsys sendmail`` keeps working while the server is down.

Postfix's sendmail never loses a cron job's mail because the mail system is
stopped: it drops the message into a directory that the pickup daemon reads
later.  This is the same for mailsys.  When nothing answers on the submit
socket, ``mailsys sendmail`` writes its submission request (the same JSON line
and message bytes it would have sent on the socket) to
``STATE_DIR/maildrop/<random>.drop`` and exits 0 once the file's data is
fsynced.  Worker 0 picks the directory up at start and every
:data:`PICKUP_INTERVAL` seconds: each file is validated exactly like a socket
submission, spooled (fsynced) and only then removed.

The directory is mode 1733 (sticky, writable by all, listable by its owner
only), as ``/var/spool/postfix/maildrop`` with its group: any local user may
drop a file; nobody but the service user can see the names or remove another
user's file.  Files are mode 0644 under an unguessable name (the service user
must read them; others cannot find them).  The submitting uid is the file's
owner, as the kernel recorded it.  A user other than the service user cannot
fsync the directory (that needs read permission), so a dropped file survives a
crash of the mail server at once and a power loss after the filesystem's next
journal commit (seconds on ext4); root and the service user fsync it too.

Anything in the directory that is not a regular, single-link file of the
expected shape and size is removed with a log line: it cannot be mail a
``mailsys sendmail`` wrote.
"""
import json
import os
import stat
import uuid

from twisted.internet import defer, task
from twisted.logger import Logger

from mailsys.control import RequestError, check_submit, normalise_newlines
from mailsys.files import write_all
from mailsys.logs import MailLog

log = MailLog("mailsys.pickup")
_tlog = Logger(namespace="mailsys.pickup")

PICKUP_INTERVAL = 5.0      # seconds between looks at the maildrop
STALE_TEMPORARY = 3600.0   # a temporary file older than this was abandoned by a killed client
MAX_HEADER = 64 * 1024


def maildrop_path(config):
    return os.path.join(config.server.state_dir, "maildrop")


# -- client side (mailsys sendmail) ---------------------------------------------------

def drop(config, request, message):
    """Write one submission for later pickup; returns the file's path.  Raises
    OSError (no maildrop: the server never ran with this configuration)."""
    directory = maildrop_path(config)
    name = uuid.uuid4().hex
    tmp = os.path.join(directory, f"tmp-{name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)      # whatever the umask: the service user must read it
        data = json.dumps(request).encode("utf-8") + b"\n" + message
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    final = os.path.join(directory, f"{name}.drop")
    os.rename(tmp, final)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return final              # see the module docstring: the next journal commit
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


# -- server side (worker 0) -----------------------------------------------------------

def prepare(config):
    """Create the maildrop with its mode (worker 0, at start)."""
    directory = maildrop_path(config)
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o1733)
    return directory


class Pickup:
    """Moves dropped submissions into the spool, at start and then periodically."""

    def __init__(self, service, clock, interval=PICKUP_INTERVAL):
        self.service = service
        self.clock = clock
        self.directory = maildrop_path(service.config)
        self.limit = service.config.limits.message_size
        self.interval = interval
        self._busy = set()
        self._loop = None

    def start(self):
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: _tlog.failure("pickup stopped", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def scan(self):
        """One pass over the directory; returns a Deferred that fires when every
        file found is spooled (or refused)."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            _tlog.error("pickup: cannot read {dir}: {error}", dir=self.directory, error=str(e))
            return defer.succeed(None)
        waits = []
        for name in sorted(names):
            path = os.path.join(self.directory, name)
            if name.startswith("tmp-"):
                self._remove_if_stale(path)
            elif name not in self._busy:
                waits.append(self._take(name, path))
        return defer.DeferredList(waits) if waits else defer.succeed(None)

    def _remove_if_stale(self, path):
        try:
            st = os.lstat(path)
            if self.clock.seconds() - st.st_mtime > STALE_TEMPORARY:
                os.unlink(path)
        except OSError:
            pass

    def _refuse(self, path, why):
        log.warn(f"pickup: removed {os.path.basename(path)}: {why}", file=path, reason=why)
        try:
            os.unlink(path)
        except OSError:
            pass

    def _take(self, name, path):
        if not (name.endswith(".drop") and len(name) == 37 and all(
                c in "0123456789abcdef" for c in name[:32])):
            self._refuse(path, "not a file mailsys sendmail writes")
            return defer.succeed(None)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self._refuse(path, f"cannot open it ({e.strerror})")
            return defer.succeed(None)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                self._refuse(path, "not a plain file")
                return defer.succeed(None)
            if st.st_size > MAX_HEADER + self.limit:
                self._refuse(path, f"larger than limits.message_size ({self.limit} bytes)")
                return defer.succeed(None)
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_HEADER + self.limit + 1)
        finally:
            os.close(fd)
        end = data.find(b"\n")
        try:
            if end < 0 or end > MAX_HEADER:
                raise RequestError("no request line")
            try:
                request = json.loads(data[:end])
            except ValueError:
                raise RequestError("the request is not JSON")
            if not isinstance(request, dict) or request.get("cmd") != "submit":
                raise RequestError("not a submission")
            check_submit(request, self.limit)
            body = data[end + 1:]
            if len(body) != request["size"]:
                raise RequestError(f"{len(body)} message bytes, {request['size']} announced")
        except RequestError as e:
            self._refuse(path, str(e))
            return defer.succeed(None)
        dsn = {k: request[k] for k in ("notify", "ret", "envid") if request.get(k) is not None}
        self._busy.add(name)
        d = self.service.submit_local(request["sender"], request["recipients"],
                                      normalise_newlines(body), uid=st.st_uid,
                                      smtputf8=request["smtputf8"], dsn=dsn)

        def spooled(answer):
            if answer.get("ok"):
                os.unlink(path)     # only now: the spool has it, fsynced
                log.info(f"{answer['id']}: picked up from the maildrop (uid {st.st_uid})",
                         qid=answer["id"], uid=st.st_uid)
            else:
                log.warn(f"pickup: {name} stays for the next pass: {answer.get('error')}",
                         file=path)

        d.addCallback(spooled)
        d.addErrback(lambda f: _tlog.failure("pickup of {name} failed", f, name=name))
        d.addBoth(lambda _: self._busy.discard(name))
        return d
