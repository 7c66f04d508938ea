"""Worker plumbing without processes: the pipe a worker writes its log lines and
notifications to, worker 0's relay of them, and who accepts on the MDA's LMTP
listeners while other workers run."""
import os
from types import SimpleNamespace

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, formatEventAsClassicLogText, globalLogPublisher
from twisted.python import log as legacy_log

from mailsys import workers
from mailsys.logs import ClassicLineFormatter, MailLog


class Reactor(task.Clock):
    running = True


def read_all(fd):
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    reactor = Reactor()
    yield workers.ParentPipe(w, reactor), r, reactor
    os.close(r)
    os.close(w)


def test_log_lines_of_one_turn_go_out_in_one_write(pipe, monkeypatch):
    parent, r, reactor = pipe
    writes = []
    real_write = os.write
    monkeypatch.setattr(workers.os, "write", lambda fd, data: writes.append(bytes(data)) or
                        real_write(fd, data))
    parent.log(b"one\n")
    parent.log(b"two\n")
    assert read_all(r) == b"" and writes == []
    reactor.advance(0)
    assert writes == [b"one\ntwo\n"]
    assert read_all(r) == b"one\ntwo\n"
    reactor.advance(0)
    assert writes == [b"one\ntwo\n"]       # nothing pending, nothing written


def test_a_notification_goes_at_once_behind_earlier_log_lines(pipe):
    parent, r, reactor = pipe
    parent.log(b"log 1\n")
    parent.send(b"S\t2\t/seg\n")
    assert read_all(r) == b"log 1\nS\t2\t/seg\n"
    parent.log(b"log 2\n")
    reactor.advance(0)
    assert read_all(r) == b"log 2\n"


def test_without_a_running_reactor_lines_go_at_once(pipe):
    parent, r, reactor = pipe
    reactor.running = False
    parent.log(b"late\n")
    assert read_all(r) == b"late\n"


def test_short_writes_are_finished(pipe, monkeypatch):
    parent, r, reactor = pipe
    real_write = os.write
    monkeypatch.setattr(workers.os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    parent.send(b"abcdefghij\n")
    assert read_all(r) == b"abcdefghij\n"


def test_a_pipe_closed_by_worker_zero_is_not_an_error():
    r, w = os.pipe()
    os.close(r)
    parent = workers.ParentPipe(w, Reactor())
    try:
        parent.send(b"lost\n")      # EPIPE: worker 0 is gone
        assert parent.pending == []
    finally:
        os.close(w)


def test_observer_sends_mail_log_text_as_is_and_renders_others(pipe):
    parent, r, reactor = pipe
    observe = workers._stdout_observer(parent)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        MailLog("mailsys.smtpd").info("ABC123: client=x[1.2.3.4]", qid="ABC123")
    finally:
        globalLogPublisher.removeObserver(events.append)
    observe(events[0])
    observe({"log_format": "worker {n} said {what}", "n": 1, "what": "hi",
             "log_level": LogLevel.warn, "log_namespace": "other"})
    observe({"log_format": "{text}", "text": "two\nlines\twith a \\ too",
             "log_level": LogLevel.error, "log_namespace": "mailsys.queue"})
    reactor.advance(0)
    assert read_all(r).splitlines() == [
        b"L\tinfo\tmailsys.smtpd\t\tABC123: client=x[1.2.3.4]",
        b"L\twarn\tother\t\tworker 1 said hi",
        b"L\terror\tmailsys.queue\t\ttwo\\nlines\\twith a \\\\ too"]


def test_worker_zero_re_emits_a_relayed_line():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto = workers.WorkerProcess(pool=None, index=3)
        proto._relay(b"L\twarn\tmailsys.lmtp\t\tX: to=<a@b>, status=sent")
        proto._relay(b"not a line of ours")
        proto._relay(workers.log_line("error", "mailsys.queue", "", "two\nlines\twith a \\ too")[:-1])
        proto._relay(b"L\tnonsense\tmailsys.queue\t\ttext")
    finally:
        globalLogPublisher.removeObserver(events.append)
    (first, second, third, fourth) = events
    assert (first["log_namespace"], first["log_level"], first["text"], first["worker"]) == (
        "mailsys.lmtp", LogLevel.warn, "X: to=<a@b>, status=sent", 3)
    assert first["log_format"] == "{text}"
    assert (second["log_namespace"], second["log_level"], second["text"]) == (
        "mailsys.workers", LogLevel.info, "not a line of ours")
    assert (third["log_namespace"], third["log_level"], third["text"]) == (
        "mailsys.queue", LogLevel.error, "two\nlines\twith a \\ too")
    assert (fourth["log_namespace"], fourth["log_level"], fourth["text"]) == (
        "mailsys.workers", LogLevel.info, "L\tnonsense\tmailsys.queue\t\ttext")


def test_twisted_system_tag_survives_the_relay(pipe):
    """A worker's legacy Twisted line ("Factory starting on ...") reaches the
    log file as worker 0's own would, "[-] ...", not "[log_legacy#info] ..."."""
    parent, r, reactor = pipe
    observe = workers._stdout_observer(parent)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy_log.msg("ReceiveFactory starting on 2525")
        legacy_log.msg("tagged", system="smtp,3,127.0.0.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    for event in events:
        observe(event)
    reactor.advance(0)
    lines = read_all(r).splitlines()
    assert lines == [b"L\tinfo\tlog_legacy\t-\tReceiveFactory starting on 2525",
                     b"L\tinfo\tlog_legacy\tsmtp,3,127.0.0.1\ttagged"]

    relayed = []
    globalLogPublisher.addObserver(relayed.append)
    try:
        proto = workers.WorkerProcess(pool=None, index=1)
        for line in lines:
            proto._relay(line)
    finally:
        globalLogPublisher.removeObserver(relayed.append)
    assert [(e["log_system"], e["text"], e["worker"]) for e in relayed] == [
        ("-", "ReceiveFactory starting on 2525", 1), ("smtp,3,127.0.0.1", "tagged", 1)]
    fmt = ClassicLineFormatter(formatEventAsClassicLogText)
    assert [fmt(e).partition(" ")[2] for e in relayed] == [
        "[-] ReceiveFactory starting on 2525\n", "[smtp,3,127.0.0.1] tagged\n"]
    assert fmt(events[0]) == formatEventAsClassicLogText(events[0])


class Host:
    """What WorkerPool needs of the MailHost, recording serve_lmtp calls."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.listeners, self.ports = [], []
        self.lock_fd = 0
        self.config_path = "/dev/null"
        self.serving = []

    def serve_lmtp(self, serving):
        self.serving.append(serving)


class Transport:
    pid = 4242


class SpawningReactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, proto, executable, args, env, path, childFDs):
        proto.transport = Transport()
        self.spawned.append(proto)


def test_worker_zero_leaves_lmtp_to_running_workers_and_takes_it_back():
    reactor = SpawningReactor()
    host = Host(reactor)
    pool = workers.WorkerPool(host, 1)
    pool.start()
    assert host.serving == [False]
    (proto,) = reactor.spawned
    pool.ended(proto, _reason("killed"))
    assert host.serving == [False, True]           # no worker left: worker 0 serves LMTP
    reactor.advance(1)                              # the restart pause
    assert len(reactor.spawned) == 2 and host.serving == [False, True, False]


def test_worker_zero_keeps_lmtp_off_while_another_worker_runs():
    reactor = SpawningReactor()
    host = Host(reactor)
    pool = workers.WorkerPool(host, 2)
    pool.start()
    pool.ended(reactor.spawned[0], _reason("killed"))
    assert host.serving == [False, False]          # worker 2 still runs


def test_no_lmtp_change_while_stopping():
    reactor = SpawningReactor()
    host = Host(reactor)
    pool = workers.WorkerPool(host, 1)
    pool.start()
    pool.stopping = True
    pool.ended(reactor.spawned[0], _reason("terminated"))
    assert host.serving == [False]


def _reason(text):
    from twisted.python.failure import Failure

    return Failure(Exception(text))



def test_worker_zero_passes_spooled_and_closed_notices_to_its_queue():
    """In pipe order: the queue learns of a worker's messages, then that the worker
    left their segment with that many committed (mailsys.spool.SegmentReaper)."""
    calls = []
    queue = SimpleNamespace(add_at=lambda seg, off: calls.append(("add_at", seg, off)),
                            segment_closed=lambda seg, n: calls.append(("closed", seg, n)))
    pool = SimpleNamespace(host=SimpleNamespace(queue=queue))
    proto = workers.WorkerProcess(pool=pool, index=1)
    odd = "/s p\tace\\/x\ny/segments/01-00000002.seg"
    for event in ({"spooled": ["/s/segments/01-00000001.seg", 0]},
                  {"closed": ["/s/segments/01-00000001.seg", 1]},
                  {"spooled": [odd, 4711]}, {"closed": [odd, 2]}):
        line = workers.notice_line(event)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        proto._relay(line[:-1])
    assert workers.notice_line({"spooled": ["/s/a.seg", 7]}) == b"S\t7\t/s/a.seg\n"
    assert calls == [("add_at", "/s/segments/01-00000001.seg", 0),
                     ("closed", "/s/segments/01-00000001.seg", 1),
                     ("add_at", odd, 4711), ("closed", odd, 2)]


def test_worker_zero_passes_a_flush_request_on():
    flushed = []
    pool = SimpleNamespace(host=SimpleNamespace(request_flush=flushed.append))
    proto = workers.WorkerProcess(pool=pool, index=1)
    proto._relay(workers.notice_line({"flush": "example.org"})[:-1])
    proto._relay(workers.notice_line({"flush": None})[:-1])
    assert flushed == ["example.org", None]
