"""Log lines per CONTRACT section 6, through twisted.logger, cheaply.

Two costs of twisted.logger showed up in profiles of the receive path as more
than the SMTP work itself: ``Logger.emit`` re-validates the level by iterating
and sorting ``LogLevel`` constants on every call, and observers render
``log_format`` with the pure-Python ``string.Formatter``.  So each event here
is built directly with the keys ``Logger.emit`` would set (it goes to the same
observer, the global log publisher) and carries its finished text in one field,
``"{text}"`` being the whole format, next to its structured keys.
"""
from time import time

from twisted.logger import Logger, LogLevel

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
