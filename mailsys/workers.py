"""Worker processes: more processes serving the same listening sockets.

One Python process saturates one CPU with SMTP work long before the disk is
busy, so the twistd process (worker 0) starts ``server.workers - 1`` copies of
itself that inherit every listening socket and accept on them too; the kernel
spreads the connections.  A worker is the same MailHost minus the listening:
it adopts the inherited sockets, appends to spool segments of its own (so no
two processes ever write one file) and sends its log events to the parent as
lines on its stdout (tab-separated, see :func:`log_line` and
:func:`notice_line`), which the parent re-emits: one log, as before.

Workers die with the parent (PR_SET_PDEATHSIG), so ``kill -9`` of twistd takes
them along; they also hold the state directory's lock (inherited), so a new
instance starts only when all of the old one is gone.  The parent restarts a
worker that exits unexpectedly, with a growing pause if it keeps failing.
"""
import ctypes
import json
import os
import re
import signal
import socket
import sys

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger, LogLevel

from mailsys.files import write_all
from mailsys.logs import emit_text

log = Logger(namespace="mailsys.workers")

_LEVELS = {level.name: level for level in LogLevel.iterconstants()}

FIRST_FD = 3


def _family(port):
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return socket.AF_INET6
    if isinstance(host, UNIXAddress):
        return socket.AF_UNIX
    if isinstance(host, IPv4Address):
        return socket.AF_INET
    raise ValueError(f"cannot pass a {type(host).__name__} listener to a worker")


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool, index):
        self.pool, self.index = pool, index
        self._out = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self._relay(line)

    def _relay(self, line):
        keys = {"worker": self.index}
        try:
            kind = line[:2]
            if kind in (b"S\t", b"C\t"):       # spooled (offset) / closed (count), segment
                number, segment = line[2:].split(b"\t", 1)
                segment = unescape(segment.decode("utf-8", "surrogateescape"))
                queue = self.pool.host.queue
                if queue is not None:
                    if kind == b"S\t":
                        queue.add_at(segment, int(number))
                    else:
                        queue.segment_closed(segment, int(number))
                return
            if kind == b"F\t":
                self.pool.host.request_flush(json.loads(line[2:]))
                return
            if kind != b"L\t":
                raise ValueError(line)
            level, namespace, system, text = line[2:].decode("utf-8", "replace").split("\t", 3)
            level = _LEVELS[level]
            if system:
                keys["log_system"] = unescape(system)
            text = unescape(text)
        except (ValueError, KeyError, TypeError, Exception):
            level, namespace, text = LogLevel.info, "mailsys.workers", line.decode("utf-8", "replace")
        emit_text(namespace, level, text, **keys)

    def errReceived(self, data):
        for line in data.decode("utf-8", "replace").splitlines():
            log.error("worker {index}: {line}", index=self.index, line=line)

    def processEnded(self, reason):
        if self._out:
            self._relay(self._out)
        self.ended.callback(None)
        self.pool.ended(self, reason)


class WorkerPool:
    """The parent's side: start, watch and stop the extra worker processes."""

    def __init__(self, host, count):
        self.host = host
        self.count = count
        self.reactor = host.reactor
        self.processes = {}
        self.stopping = False
        self._failures = {}

    def start(self):
        for index in range(1, self.count + 1):
            self.spawn(index)

    def spawn(self, index):
        host = self.host
        child_fds = {0: "w", 1: "r", 2: "r"}
        listen = []
        for n, ((role, endpoint, _), port) in enumerate(zip(host.listeners, host.ports)):
            child_fds[FIRST_FD + n] = port.fileno()
            listen.append([role, endpoint, FIRST_FD + n, int(_family(port))])
        lock_fd = FIRST_FD + len(listen)
        child_fds[lock_fd] = host.lock_fd
        spec = json.dumps({"worker": index, "workers": self.count + 1,
                           "config": host.config_path, "listen": listen})
        args = [sys.executable, "-m", "mailsys.workers", spec]
        proto = WorkerProcess(self, index)
        self.processes[index] = proto
        self.reactor.spawnProcess(proto, sys.executable, args, env=dict(os.environ),
                                  path=os.getcwd(), childFDs=child_fds)
        log.info("worker {index} started (pid {pid})", index=index, pid=proto.transport.pid)
        host.serve_lmtp(False)

    def ended(self, proto, reason):
        if self.processes.get(proto.index) is proto:
            del self.processes[proto.index]
        if self.stopping:
            return
        if not self.processes:
            self.host.serve_lmtp(True)     # until a worker is back
        n = self._failures.get(proto.index, 0) + 1
        self._failures[proto.index] = n
        pause = min(2 ** (n - 1), 30)
        log.error("worker {index} exited ({reason}); restarting in {pause} s",
                  index=proto.index, reason=reason.getErrorMessage(), pause=pause)
        self.reactor.callLater(pause, self._respawn, proto.index)

    def _respawn(self, index):
        if not self.stopping and index not in self.processes:
            self.spawn(index)

    def stop(self, grace=10.0):
        self.stopping = True
        waits = []
        for proto in list(self.processes.values()):
            waits.append(proto.ended)
            try:
                proto.transport.signalProcess("TERM")
            except Exception:
                pass
        if not waits:
            return defer.succeed(None)
        done = defer.DeferredList(waits)
        timer = self.reactor.callLater(grace, self._kill)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done

    def _kill(self):
        for proto in list(self.processes.values()):
            try:
                proto.transport.signalProcess("KILL")
            except Exception:
                pass


# -- the worker process ------------------------------------------------------------

def _die_with_parent():
    """PR_SET_PDEATHSIG: the kernel kills us when the parent dies, even by kill -9."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)


class ParentPipe:
    """Lines to worker 0 on our stdout (a pipe), several log lines to one write.

    A write per log event cost a system call and a wake-up of worker 0 per line
    (six or seven per message).  Log lines now wait for the end of the current
    reactor turn and go out together; a notification that steers the queue
    (``spooled``, ``closed``, ``flush``) goes out at once, behind the log lines written
    before it, so worker 0 sees everything in the order it happened.  A line is
    only ever lost with the process itself (kill -9), and then only log text:
    the spool record, not this pipe, is what makes mail durable."""

    def __init__(self, fd, reactor):
        self.fd = fd
        self.reactor = reactor
        self.pending = []
        self.scheduled = False

    def log(self, line):
        self.pending.append(line)
        if not self.scheduled:
            if self.reactor.running:
                self.scheduled = True
                self.reactor.callLater(0, self.flush)
            else:
                self.flush()

    def send(self, line):
        self.pending.append(line)
        self.flush()

    def flush(self):
        self.scheduled = False
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending = []
        try:
            write_all(self.fd, data)
        except OSError:
            pass    # worker 0 is gone; we die with it (PR_SET_PDEATHSIG)


def escape(text):
    """A field of one line for the pipe: backslash, newline and tab escaped."""
    if "\\" in text or "\n" in text or "\t" in text:
        text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return text


_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
_UNESCAPE = {"n": "\n", "t": "\t"}


def unescape(text):
    """What :func:`escape` was given."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), text)


def log_line(level, namespace, system, text):
    """``L<TAB>level<TAB>namespace<TAB>system<TAB>text``: a log event for worker 0."""
    return f"L\t{level}\t{namespace}\t{escape(system)}\t{escape(text)}\n".encode("utf-8", "replace")


def notice_line(event):
    """A notice steering worker 0: ``S`` spooled (offset, segment), ``C`` a
    segment closed (committed count, segment), ``F`` a flush request (JSON)."""
    if "spooled" in event:
        segment, offset = event["spooled"]
        return f"S\t{int(offset)}\t{escape(segment)}\n".encode("utf-8", "surrogateescape")
    if "closed" in event:
        segment, committed = event["closed"]
        return f"C\t{int(committed)}\t{escape(segment)}\n".encode("utf-8", "surrogateescape")
    if "flush" in event:
        return b"F\t" + json.dumps(event["flush"]).encode() + b"\n"
    raise ValueError(f"unknown notice {event!r}")


def _stdout_observer(pipe):
    """Every log event of this worker, as one tab-separated line to worker 0.

    The line used to be JSON: an encoder built per event in this process and a
    decoder in worker 0, for six lines a message.  Levels and namespaces never
    hold a tab or a newline; the system tag and the text are escaped."""
    from twisted.logger import eventAsText

    def observe(event):
        try:
            text = event.get("text")
            if event.get("log_format") != "{text}" or "log_failure" in event or not isinstance(text, str):
                text = eventAsText(event, includeTimestamp=False, includeSystem=False)
            # Twisted's own messages (legacy log.msg) carry a system tag, which
            # twistd's file shows instead of namespace#level: keep it, so a
            # worker's line reads like worker 0's ("[-] ..."), not "[log_legacy#info]".
            system = event.get("log_system")
            pipe.log(log_line(event.get("log_level", LogLevel.info).name,
                              event.get("log_namespace", "-"),
                              "" if system is None else str(system), text))
        except Exception:
            pass
    return observe


def main(argv=None):
    _die_with_parent()
    spec = json.loads((argv or sys.argv[1:])[0])
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mailsys.config import load
    from mailsys.tap import build

    pipe = ParentPipe(1, reactor)
    globalLogBeginner.beginLoggingTo([_stdout_observer(pipe)], redirectStandardIO=False)
    config = load(spec["config"])
    host = build(config, reactor, worker=spec["worker"], nworkers=spec["workers"],
                 config_path=spec["config"])
    listen = spec["listen"]
    if [(r, e) for r, e, _ in host.listeners] != [(r, e) for r, e, _, _ in listen]:
        raise SystemExit("worker: listeners differ from the parent's; restart mailsys")
    host.adopt = [tuple(x) for x in listen]

    def notify(event):
        pipe.send(notice_line(event))

    # Worker 0 runs the queue: tell it where each durable record is, and, behind
    # every "spooled" of a segment (same pipe, in order), how many the segment
    # got once this worker has left it (mailsys.spool.SegmentReaper).
    host.spool.on_commit.append(lambda entry: notify({"spooled": [entry.segment, entry.offset]}))
    host.spool.on_close.append(lambda segment, committed: notify({"closed": [segment, committed]}))
    host.notify_parent = notify
    host.privilegedStartService()
    host.startService()
    reactor.addSystemEventTrigger("before", "shutdown", host.stopService)
    reactor.run()
    pipe.flush()


if __name__ == "__main__":
    main()
