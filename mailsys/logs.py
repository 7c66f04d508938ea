"""Log lines per CONTRACT section 6, through twisted.logger, cheaply.

Two costs of twisted.logger showed up in profiles of the receive path as more
than the SMTP work itself: ``Logger.emit`` re-validates the level by iterating
and sorting ``LogLevel`` constants on every call, and observers render
``log_format`` with the pure-Python ``string.Formatter``.  So each event here
is built directly with the keys ``Logger.emit`` would set (it goes to the same
observer, the global log publisher) and carries its finished text in one field,
``"{text}"`` being the whole format, next to its structured keys.
"""
import threading
from time import time

from twisted.logger import FileLogObserver, Logger, LogLevel, formatTime, globalLogPublisher

_FORMAT = "{text}"


class MailLog:
    """Emits pre-rendered Postfix-style lines with structured keys."""

    __slots__ = ("_logger", "_namespace")

    def __init__(self, namespace):
        self._logger = Logger(namespace=namespace)
        self._namespace = namespace

    def _emit(self, level, text, keys):
        keys["text"] = text
        keys["log_logger"] = self._logger
        keys["log_level"] = level
        keys["log_namespace"] = self._namespace
        keys["log_source"] = None
        keys["log_format"] = _FORMAT
        keys["log_time"] = time()
        self._logger.observer(keys)

    def info(self, text, **keys):
        self._emit(LogLevel.info, text, keys)

    def warn(self, text, **keys):
        self._emit(LogLevel.warn, text, keys)

    def error(self, text, **keys):
        self._emit(LogLevel.error, text, keys)

    def failure(self, text, failure=None, **keys):
        self._logger.failure(_FORMAT, failure, text=text, **keys)

    def queued(self, qid, sender, size, nrcpt):
        """The line that says a message is in the queue, for every way in (SMTP,
        sendmail, reports, alias copies): ``QID: from=<...>, size=N, nrcpt=N
        (queued)``, CONTRACT section 6 to the letter.  Who sent it (``client=``,
        ``uid=``) is a line of its own before it, as Postfix's smtpd or pickup
        logs it before its queue manager's ``from=`` line, so that a pattern
        written from the contract (``QID: from=<``) matches."""
        self._emit(LogLevel.info, f"{qid}: from=<{sender}>, size={size}, nrcpt={nrcpt} (queued)",
                   {"qid": qid, "sender": sender, "size": size, "nrcpt": nrcpt})


_relayed = {}


def emit_text(namespace, level, text, **keys):
    """One finished line under any namespace, as cheaply as :class:`MailLog` does:
    worker 0 re-emits every line of the other workers this way."""
    log = _relayed.get(namespace)
    if log is None:
        if len(_relayed) >= 256:   # namespaces come from our own workers; bound it anyway
            _relayed.clear()
        log = _relayed[namespace] = MailLog(namespace)
    log._emit(level, text, keys)


class ClassicLineFormatter:
    """``formatEvent`` for twistd's log file that renders our pre-rendered lines
    itself, byte for byte as ``formatEventAsClassicLogText`` would.

    Why: with the event building above already cheap, profiles of the receive
    path still put 8-11% of all CPU in twistd's file observer, most of it the
    timestamp (a ``datetime`` and a ``FixedOffsetTimeZone`` built and
    ``strftime``-ed for every line) and ``eventAsText``'s generic passes.  Here
    the stamp is made by Twisted's own ``formatTime`` once per second (``%S`` has
    no fraction, so every event of that second gets the same text) and the line
    is one f-string.  Any other event -- a format with fields, a failure, an
    explicit ``log_system`` -- goes to the formatter it replaces, unchanged.
    """

    __slots__ = ("_fallback", "_second", "_stamp")

    def __init__(self, fallback):
        self._fallback = fallback
        self._second = None
        self._stamp = ""

    def __call__(self, event):
        if (event.get("log_format") is not _FORMAT or "log_failure" in event
                or "log_system" in event or "log_flattened" in event):
            return self._fallback(event)
        text = event.get("text")
        when = event.get("log_time")
        level = event.get("log_level")
        if not text or when is None or level is None or not isinstance(text, str):
            return self._fallback(event)
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        return f"{self._stamp} [{event.get('log_namespace', '-')}#{level.name}] {text}\n"


class TurnBufferedFile:
    """The log file behind twistd's observer, written once per reactor turn.

    ``FileLogObserver`` writes and flushes every line: with twistd's ``LogFile``
    that is a lock, a rotation check and a ``write`` system call per line, six
    lines a message.  Here lines of one reactor turn are joined and go out in
    one write at the end of the turn (``callLater(0)``), in order.  They go at
    once when the reactor is not running (start-up, shutdown), when they are
    logged from another thread, or when :data:`limit` bytes are waiting.  What a
    ``kill -9`` can lose is the current turn's lines, never mail (the spool and
    the journal are written and synced on their own)."""

    limit = 64 * 1024

    def __init__(self, f, reactor):
        self._f = f
        self._reactor = reactor
        self._buf = []
        self._size = 0
        self._scheduled = False
        # Re-entrant: Python runs a signal handler in the main thread between two
        # bytecodes, wherever that thread is, and Twisted's SIGTERM handler logs
        # ("Received SIGTERM, shutting down.").  Landing inside flush_now, whose
        # lock is held around the file write, its line came back to write() and
        # waited for that lock forever: twistd hung on SIGTERM (seen in CI).
        self._lock = threading.RLock()

    def write(self, data):
        with self._lock:
            self._buf.append(data)
            self._size += len(data)

    def flush(self):
        reactor = self._reactor
        if (self._size >= self.limit or not reactor.running
                or threading.current_thread() is not _main_thread):
            self.flush_now()
        elif not self._scheduled:
            self._scheduled = True
            reactor.callLater(0, self.flush_now)

    def flush_now(self):
        with self._lock:
            self._scheduled = False
            # Take the lines first: one a signal handler adds from here on goes
            # to the new list and out with the next flush, never lost.
            buf, self._buf = self._buf, []
            self._size = 0
            if not buf:
                return
            data = buf[0][:0].join(buf)
            self._f.write(data)
            self._f.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)


_main_thread = threading.main_thread()


def speed_up_log_files(publisher=globalLogPublisher, reactor=None):
    """Give every text file observer of ``publisher`` (twistd's ``--logfile``,
    or ``-`` for standard output) the :class:`ClassicLineFormatter`, and, given
    the ``reactor``, a :class:`TurnBufferedFile`.  Returns how many it changed.

    twistd builds its observer before the application starts and offers no hook
    to pick its formatter, so this looks at the publisher's observers after the
    fact (``LogPublisher`` keeps them in ``_observers``, a ``FileLogObserver``
    its file in ``_outFile``; should that ever change, nothing is changed and
    the lines are still written, only more slowly).
    """
    changed = 0
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, FileLogObserver) and not isinstance(observer.formatEvent, ClassicLineFormatter):
            observer.formatEvent = ClassicLineFormatter(observer.formatEvent)
            out = getattr(observer, "_outFile", None)
            if (out is not None and not isinstance(out, TurnBufferedFile)
                    and hasattr(reactor, "running") and hasattr(reactor, "addSystemEventTrigger")):
                observer._outFile = buffered = TurnBufferedFile(out, reactor)
                reactor.addSystemEventTrigger("after", "shutdown", buffered.flush_now)
            changed += 1
    return changed
