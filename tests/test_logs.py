"""mailsys.logs: the fast formatter writes exactly what twistd's own would."""
import io
import os
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import (LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime,
                            textFileLogObserver, timeFormatRFC3339)

from mailsys.logs import ClassicLineFormatter, MailLog, speed_up_log_files


def twistd_format(event):
    """What twistd's textFileLogObserver renders (its formatEvent, spelled out)."""
    return formatEventAsClassicLogText(event, formatTime=lambda e: formatTime(e, timeFormatRFC3339))


def captured(namespace, level, text, **keys):
    events = []
    log = MailLog(namespace)
    log._logger.observer = events.append
    getattr(log, level)(text, **keys)
    return events[0]


# Times across second boundaries, a fraction just under the next second, and a
# summer and a winter date (the local offset is part of the stamp).
TIMES = [1_700_000_000.0, 1_700_000_000.999999, 1_700_000_001.0, 1_700_000_001.5, 1_719_000_000.25]


@pytest.fixture(params=["UTC", "Europe/Berlin", "America/St_Johns"])
def local_zone(request, monkeypatch):
    """The stamp carries the local offset: check it in zones with summer time
    and with a half-hour offset, not just in the machine's own."""
    if not os.path.exists(os.path.join("/usr/share/zoneinfo", request.param)):
        pytest.fail(f"tzdata has no {request.param}")
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("when", TIMES)
@pytest.mark.parametrize("level", ["info", "warn", "error"])
@pytest.mark.parametrize("text", [
    "19851B94036494001: to=<postmaster@example.com>, relay=lmtp, status=sent (250 2.0.0 Ok)",
    "a line\nwith a newline\n",
    "brace {text} and {0} and percent %s",
    "unicode: Grüße, 日本",
])
def test_our_lines_are_rendered_byte_for_byte_as_twistd_would(when, level, text, local_zone):
    event = captured("mailsys.queue", level, text, queue_id="ABC", to="x@example.com")
    event["log_time"] = when
    assert ClassicLineFormatter(twistd_format)(event) == twistd_format(event)


def test_the_stamp_follows_each_event_not_the_first_of_a_run():
    fmt = ClassicLineFormatter(twistd_format)
    lines = []
    for when in sorted(TIMES * 2):
        event = captured("mailsys.smtpd", "info", "x")
        event["log_time"] = when
        lines.append((fmt(event), twistd_format(event)))
    assert [a for a, _ in lines] == [b for _, b in lines]
    assert len({a[:24] for a, _ in lines}) == 3      # three distinct seconds among TIMES


def fallback_events():
    yield dict(log_format="started on {port}", port=25, log_time=TIMES[0], log_namespace="x",
               log_level=LogLevel.info)
    yield dict(log_format="{text}", text="explicit system", log_system="TCP Port 25", log_time=TIMES[0],
               log_level=LogLevel.info, log_namespace="x")
    yield dict(log_format="{text}", text="no time", log_level=LogLevel.info, log_namespace="x")
    yield dict(log_format="{text}", text="", log_time=TIMES[0], log_level=LogLevel.info, log_namespace="x")
    yield dict(log_format=None, log_time=TIMES[0])
    try:
        1 / 0
    except ZeroDivisionError:
        from twisted.python.failure import Failure

        failure = Failure()
    yield dict(log_format="{text}", text="boom", log_failure=failure, log_time=TIMES[0],
               log_level=LogLevel.critical, log_namespace="x")


@pytest.mark.parametrize("event", list(fallback_events()))
def test_any_other_event_goes_to_the_formatter_it_replaced(event):
    seen = []

    def fallback(e):
        seen.append(e)
        return twistd_format(e)

    # A format string equal to "{text}" but not our constant object is also
    # someone else's event: only MailLog's own events take the fast path.
    event = dict(event)
    if event.get("log_format") == "{text}":
        event["log_format"] = "".join(["{te", "xt}"])
    assert ClassicLineFormatter(fallback)(event) == twistd_format(event)
    assert seen == [event]


def test_speed_up_log_files_swaps_the_formatter_of_file_observers_only():
    publisher = LogPublisher()
    out = io.StringIO()
    file_observer = textFileLogObserver(out)
    other = []
    publisher.addObserver(file_observer)
    publisher.addObserver(other.append)
    assert speed_up_log_files(publisher) == 1
    assert isinstance(file_observer.formatEvent, ClassicLineFormatter)
    assert speed_up_log_files(publisher) == 0       # not wrapped twice

    log = MailLog("mailsys.smtpd")
    log._logger.observer = publisher
    log.info("connect from localhost[127.0.0.1]", client="127.0.0.1")
    publisher(dict(log_format="plain {n}", n=1, log_time=TIMES[0], log_namespace="t",
                   log_level=LogLevel.warn))
    assert out.getvalue() == "".join(twistd_format(e) for e in other)
    assert out.getvalue().count("\n") == 2
    assert "] connect from localhost[127.0.0.1]\n" in out.getvalue()


class TurnReactor(Clock):
    """A Clock with what the buffered log file asks of a reactor."""

    def __init__(self):
        super().__init__()
        self.running = True
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, f):
        self.triggers.append((phase, event, f))


class CountingFile(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, data):
        self.writes += 1
        return super().write(data)

    def flush(self):
        self.flushes += 1


def buffered_publisher():
    publisher = LogPublisher()
    out = CountingFile()
    observer = textFileLogObserver(out)
    publisher.addObserver(observer)
    reactor = TurnReactor()
    assert speed_up_log_files(publisher, reactor=reactor) == 1
    log = MailLog("mailsys.queue")
    log._logger.observer = publisher
    return log, out, reactor, observer


def test_lines_of_one_reactor_turn_go_out_in_one_write_in_order():
    log, out, reactor, observer = buffered_publisher()
    for i in range(5):
        log.info(f"Q{i}: removed", qid=f"Q{i}")
    assert out.getvalue() == "" and out.writes == 0
    reactor.advance(0)
    assert out.writes == 1 and out.flushes == 1
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        f"Q{i}: removed" for i in range(5)]
    reactor.advance(0)
    assert out.writes == 1                    # nothing waiting, nothing written
    assert [p for p, e, f in reactor.triggers] == ["after"]
    log.info("Q9: removed")
    reactor.triggers[0][2]()                  # shutdown: what waits goes out
    assert out.getvalue().endswith("] Q9: removed\n")


def test_lines_go_at_once_without_a_running_reactor_or_from_another_thread_or_when_many():
    import threading

    log, out, reactor, observer = buffered_publisher()
    reactor.running = False
    log.info("before the reactor runs")
    assert out.getvalue().endswith("] before the reactor runs\n")
    reactor.running = True
    log.info("in the reactor thread")
    t = threading.Thread(target=log.info, args=("from a thread",))
    t.start()
    t.join()
    # The thread's line does not wait, and does not overtake the one before it.
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        "before the reactor runs", "in the reactor thread", "from a thread"]
    before = out.writes
    log.info("x" * (observer._outFile.limit + 1))
    assert out.writes == before + 1


def test_a_signal_handler_that_logs_during_a_flush_does_not_hang_it():
    """Python runs a signal handler in the main thread between two bytecodes,
    wherever it is; Twisted's SIGTERM handler logs a line.  Landing inside
    TurnBufferedFile.flush_now (the file write), that line came back to write()
    and waited forever for the lock flush_now held: twistd ignored SIGTERM.
    Here the file's write plays the handler, and the flush runs in a thread so
    that a deadlock fails the test instead of hanging it."""
    import threading
    from types import SimpleNamespace

    from mailsys.logs import TurnBufferedFile

    out = []

    class File:
        def write(self, data):
            out.append(data)
            if len(out) == 1:       # the "signal" lands inside the first write
                buffered.write("Received SIGTERM, shutting down.\n")
                buffered.flush()

        def flush(self):
            pass

    clock = Clock()
    reactor = SimpleNamespace(running=True, callLater=clock.callLater)
    buffered = TurnBufferedFile(File(), reactor)
    buffered.write("first\n")
    flushing = threading.Thread(target=buffered.flush_now, daemon=True)
    flushing.start()
    flushing.join(10)
    assert not flushing.is_alive(), "flush_now deadlocked on a line logged from inside it"
    buffered.flush_now()
    assert out == ["first\n", "Received SIGTERM, shutting down.\n"]
