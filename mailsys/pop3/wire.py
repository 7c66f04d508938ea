"""Stored message bytes to the POP3 wire, a chunk at a time.

The stores keep LF line ends (mboxrd-quoted in mbox); RFC 1939 sends CRLF
lines, dot-stuffed, ended by ``.CRLF``.  :class:`WireEncoder` does that
conversion on chunks of any size and split anywhere, so a message is streamed
from disk and never held whole in memory; :func:`wire_size` counts the octets
the encoder will send (without the stuffing dots and the terminator, as
RFC 1939 sizes are counted) for a file that carries no ``W=`` size.
"""
import re

MAX_HOLD = 8192   # bytes of a line kept back to decide on its start; longer lines stream through
_MBOXRD_QUOTED = re.compile(rb"^>+From ")


class WireEncoder:
    """Converts one message; ``feed()`` each chunk, then ``finish()`` once.

    ``unquote``: remove one ``>`` from lines that are ``>``s then ``From ``
    (mboxrd).  ``body_lines``: stop after the header section, the blank line
    and that many body lines (TOP); ``done`` is then True and the rest of the
    input is not needed.
    """

    def __init__(self, unquote=False, body_lines=None):
        self._unquote = unquote
        self._limit = body_lines
        self._partial = b""     # an incomplete line (or a held-back CR) not yet sent
        self._mid = False       # the start of the current line was already sent
        self._in_header = True
        self._body = 0
        self.done = False       # set once the TOP limit is reached

    def _start(self, line):
        if self._unquote and line[:1] == b">" and _MBOXRD_QUOTED.match(line):
            line = line[1:]
        if line[:1] == b".":
            line = b"." + line
        return line

    def _line(self, line, out):
        """A complete line (without its LF)."""
        if line[-1:] == b"\r":
            line = line[:-1]
        blank = not self._mid and not line
        if not self._mid:
            line = self._start(line)
        self._mid = False
        out.append(line + b"\r\n")
        if self._limit is None:
            return
        if self._in_header:
            if blank:
                self._in_header = False
                if self._limit == 0:
                    self.done = True
        else:
            self._body += 1
            if self._body >= self._limit:
                self.done = True

    def feed(self, chunk):
        if self.done or not chunk:
            return b""
        data = self._partial + chunk if self._partial else chunk
        self._partial = b""
        out = []
        start = 0
        while not self.done:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            self._line(data[start:nl], out)
            start = nl + 1
        if not self.done:
            rest = data[start:]
            if len(rest) > MAX_HOLD or (self._mid and rest):
                # A long line: send what we have, keeping a final CR back (it may
                # be the first half of a CRLF).
                keep = b"\r" if rest[-1:] == b"\r" else b""
                piece = rest[:-1] if keep else rest
                if piece:
                    out.append(piece if self._mid else self._start(piece))
                    self._mid = True
                self._partial = keep
            else:
                self._partial = rest
        return b"".join(out)

    def finish(self):
        """The end of the message: a last line without LF gets its CRLF, then ``.CRLF``."""
        out = []
        if not self.done and (self._partial or self._mid):
            self._line(self._partial, out)
            self._partial = b""
        out.append(b".\r\n")
        self.done = True
        return b"".join(out)


def encode(data, unquote=False, body_lines=None):
    """The whole wire form of ``data`` (tests and small messages)."""
    enc = WireEncoder(unquote, body_lines)
    return enc.feed(data) + enc.finish()


class SizeCounter:
    """Counts the RFC 1939 size (CRLF line ends, no stuffing) of chunks fed in order."""

    def __init__(self):
        self.size = 0
        self._prev_cr = False

    def feed(self, chunk):
        if not chunk:
            return
        n = len(chunk) + chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._prev_cr and chunk[:1] == b"\n":
            n -= 1
        self._prev_cr = chunk[-1:] == b"\r"
        self.size += n


def wire_size(path, chunk=1 << 20):
    counter = SizeCounter()
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                return counter.size
            counter.feed(data)
