"""The DATA phase reader: end-of-data detection and dot-unstuffing, in chunks.

Per-line Python work is what makes a Python SMTP server slow, so the body is
handled a TCP segment at a time with bytes methods that run in C: one ``find``
of ``<CRLF>.`` (which finds the end marker and the lines to unstuff alike),
skipped when the segment has no ``.`` at all, a ``replace`` for dot-unstuffing
only in a segment that has such a line, and :func:`strip_cr` (two memchr-speed
passes and a compare) to spot a bare CR or LF.  At most a few bytes are carried between segments (a
possible start of ``<CRLF>.`` that the next segment completes), so memory is
bounded whatever the message size and the result never depends on how the
client's bytes were cut into segments.

Only ``<CRLF>.<CRLF>`` ends the data (RFC 5321 4.1.1.4).  Lone CR or LF never
does; they are passed through unchanged but reported, so the caller can refuse
the message after its real end (SMTP smuggling, CVE-2023-51764).

:class:`LFDataReader` is the same reader for a consumer that stores LF line ends
(the MDA): it converts each segment as it arrives, so the message is never
walked again just to change its line ends.
"""

_END = b"\r\n.\r\n"
# RFC 5321 4.5.2: the first character of any line that starts with a period is
# deleted.  The end marker was found before this runs, and a "\r\n." at the end
# of a segment is carried over, so the replace never sees a partial pattern.
_STUFFED = b"\r\n."
_UNSTUFFED = b"\r\n"
# LFDataReader's: the same pattern after CRLF -> LF, valid only while every LF
# came from a CRLF (no bare LF).
_CRLF = b"\r\n"
_LF = b"\n"
_CR = b"\r"
_LF_STUFFED = b"\n."
_DOT = b"."


def strip_cr(chunk):
    """``(clean, without_cr, crs)``: whether every CR and LF of ``chunk`` is part
    of a CRLF (no bare CR or LF), ``chunk`` with its CRs deleted, and how many
    there were.

    Deleting every CR is one memchr-speed pass with no object per line.  When
    every CR was the start of a CRLF and every LF the end of one, the result is
    the LF text, its LFs are the CRLFs, and putting a CR back before each LF
    gives the bytes again: one more such pass and a memcmp prove the line ends
    clean.  ``bytes.count`` of CR, LF and CRLF, which it replaces, scans at about
    1.3 GB/s here (a loop per byte, no memchr): 130-170 us per 64 KiB against
    28-41 us this way (docs/performance.rst).  That check costs a copy per line
    end, so for very short lines (more than one CR in 16 bytes) counting is
    cheaper: clean exactly when as many LFs and CRLFs as CRs.  Both answer the
    same question exactly.
    """
    out = chunk.replace(_CR, b"")
    crs = len(chunk) - len(out)
    if crs * 16 > len(chunk):
        clean = chunk.count(_LF) == crs and chunk.count(_CRLF) == crs
    else:
        clean = out.replace(_LF, _CRLF) == chunk
    return clean, out, crs


def crlf_clean(chunk):
    """Whether every CR and LF of ``chunk`` is part of a CRLF: ``strip_cr``'s
    first answer, for a caller that needs only that.  Very short lines (judged
    by the first 256 bytes) are counted, as before: deleting a CR every few
    bytes costs more than the three counts."""
    head = min(len(chunk), 256)
    if chunk.count(_CR, 0, head) * 16 > head:
        n = chunk.count(_CRLF)
        return chunk.count(_CR) == n and chunk.count(_LF) == n
    return strip_cr(chunk)[0]


class DataReader:
    """Feed raw DATA bytes; get unstuffed body bytes and, once, the remainder.

    ``sink(chunk)`` receives the unstuffed message bytes in order.  ``feed``
    returns None while the data goes on, or the bytes that followed the end
    marker (pipelined commands) once it has been seen.
    """

    __slots__ = ("_sink", "_pending", "_virtual", "_line_start", "bare_newline", "size")

    def __init__(self, sink):
        self._sink = sink
        # Bytes held back from the last segment (a possible start of "\r\n." or
        # of the end marker that the next segment may complete): a few at most.
        self._pending = b""
        # Whether the next byte starts a line.  The data starts at the beginning
        # of a line, and so does every segment after one that ended in CRLF
        # (usual: clients write whole lines).  Such a segment is examined on its
        # own, without copying it behind carried bytes, unless it starts with a
        # ".": then a virtual CRLF in front lets one pattern find a "." or ".."
        # there as on any other line, and _emit drops it again (_virtual).
        self._line_start = True
        self._virtual = False
        self.bare_newline = False
        self.size = 0

    def feed(self, data):
        if not data:
            return None
        if self._pending:
            s = self._pending + data
        elif self._line_start and data[:1] == b".":
            s = _CRLF + data
            self._virtual = True
        else:
            s = data
        self._pending = b""
        self._line_start = False
        # One search answers two questions for most segments: where there is no
        # "\r\n." there is neither the end marker nor a line to unstuff, so the
        # usual segment of a big body costs one scan here instead of two, and
        # no replace in _emit (docs/performance.rst).  And a segment without a
        # "." at all (base64, the bulk of big mail) needs not even that: a
        # one-byte search runs at memchr speed, the three-byte one at 1.3 GB/s.
        first = s.find(_STUFFED) if _DOT in s else -1
        if first >= 0:
            end = s.find(_END, first)
            if end >= 0:
                self._emit(s[:end + 2], first < end)
                return s[end + 5:]
        # Hold back whatever could be the start of "\r\n." or "\r\n.\r\n".  One
        # that starts before the last CRLF lies wholly inside s (a CRLF cannot sit
        # inside either pattern except as its own start or end), so it was seen
        # above; only one starting at that CRLF, or at a final "\r", can be
        # completed by the next segment.  A final CRLF itself is not held: the
        # next segment then starts a line, which feed() looks at first.  Only
        # "\r\n." and "\r\n.\r" at the end, or a final "\r" (the LF may follow;
        # LFDataReader must never split a CRLF), are carried, and cost a copy.
        k = s.rfind(_CRLF, max(0, len(s) - 4))
        tail = s[k + 2:] if k >= 0 else None
        if tail == b"":
            cut = len(s)
            self._line_start = True
        elif tail == b"." or tail == b".\r":
            cut = k
        elif s.endswith(_CR):
            cut = len(s) - 1
        else:
            cut = len(s)
        # No "\r\n." straddles the cut (it would need a "." or "\n" where the cut
        # leaves a "\r"), so the first one, if any, tells whether s[:cut] has one.
        stuffed = 0 <= first < cut
        if cut == len(s):     # the common case for a big body: no copies
            self._emit(s, stuffed)
            return None
        if cut:
            self._emit(s[:cut], stuffed)
        self._pending = s[cut:]
        return None

    def _emit(self, chunk, stuffed=True):
        """``stuffed``: whether ``chunk`` may hold a "\r\n." to unstuff."""
        if not crlf_clean(chunk):
            self.bare_newline = True
        if stuffed:
            chunk = chunk.replace(_STUFFED, _UNSTUFFED)
        if self._virtual:
            chunk = chunk[2:]
            self._virtual = False
        if chunk:
            self.size += len(chunk)
            self._sink(chunk)


class LFDataReader(DataReader):
    """A DataReader whose output has LF line ends: the body is converted once, on
    arrival, instead of by a later pass over the whole message.

    End-of-data detection and the carried bytes are DataReader's (they work on the
    wire's CRLF bytes); only ``_emit`` differs.  ``sink(chunk, size)`` gets the
    unstuffed LF bytes and ``size``, their length in CRLF form (what DataReader
    would have passed), and ``size`` totals that, so a SIZE limit means the same
    in both modes.  ``bare_newline`` is set exactly when DataReader sets it.
    """

    __slots__ = ()

    def _emit(self, chunk, stuffed=True):
        # strip_cr deletes the CRs and checks the line ends in one go: three to
        # four times cheaper than split + join for mail's usual lines
        # (docs/performance.rst), and its answer is DataReader's exactly.
        clean, out, crlf = strip_cr(chunk)
        if clean:
            if stuffed:     # every LF came from a CRLF: "\n." only where "\r\n." was
                out = out.replace(_LF_STUFFED, _LF)
        else:
            # After a bare LF a "." starts no line: unstuff the CRLF text instead
            # (rare, and the message is refused; the output still matches DataReader's).
            self.bare_newline = True
            crlf = chunk.count(_CRLF)
            out = chunk.replace(_STUFFED, _UNSTUFFED).replace(_CRLF, _LF)
        if self._virtual:
            out = out[1:]       # the virtual CRLF in front, now one LF
            crlf -= 1
            self._virtual = False
        if out:
            size = len(out) + crlf
            self.size += size
            self._sink(out, size)


class ChunkReader:
    """BDAT content (RFC 3030 CHUNKING): the chunks' bytes as they arrive, with
    no end marker to look for and nothing to unstuff, through ``inner``'s own
    line-end check (and, for an :class:`LFDataReader`, its conversion to LF), so
    a message means the same to the handler whichever command carried it: a
    bare CR or LF is reported exactly as DataReader reports it.

    A CR at the end of a piece is held back until the next piece, which may
    start with its LF (a CRLF is cut by a TCP segment or a chunk boundary alike);
    :meth:`finish` hands on a CR still held at the very end, a bare one.
    """

    __slots__ = ("_inner", "_cr")

    def __init__(self, inner):
        self._inner = inner
        self._cr = False

    @property
    def bare_newline(self):
        return self._inner.bare_newline

    def feed(self, data):
        if self._cr:
            data = _CR + data
            self._cr = False
        if data.endswith(_CR):
            data = data[:-1]
            self._cr = True
        if data:
            self._inner._emit(data, False)

    def finish(self):
        if self._cr:
            self._cr = False
            self._inner._emit(_CR, False)
