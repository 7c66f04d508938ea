"""mailsys.smtp.data.DataReader: end of data, dot-unstuffing, bare CR/LF, segmentation."""
import pytest
from hypothesis import given, settings, strategies as st

from mailsys.smtp.data import DataReader, LFDataReader, crlf_clean, strip_cr


def run(*segments):
    """Feed segments until the end; return (body, remainder or None, reader)."""
    out = []
    reader = DataReader(out.append)
    rest = None
    for seg in segments:
        assert rest is None, "fed after the end"
        rest = reader.feed(seg)
    body = b"".join(out)
    assert all(out), "empty chunk passed to the sink"
    assert reader.size == len(body)
    return body, rest, reader


def segments(data, cuts):
    """``data`` cut at ``cuts`` (any order, repeats and out-of-range cuts ignored)."""
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    segs, last = [], 0
    for c in cuts + [len(data)]:
        segs.append(data[last:c])
        last = c
    return segs


def run_split(data, cuts):
    segs = segments(data, cuts)
    out = []
    reader = DataReader(out.append)
    rest = None
    for seg in segs:
        if rest is not None:
            rest += seg          # the protocol hands later bytes back to command mode
            continue
        rest = reader.feed(seg)
    return b"".join(out), rest, reader.bare_newline, reader.size


# -- end of data -----------------------------------------------------------------

def test_simple_message():
    body, rest, r = run(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert (body, rest, r.bare_newline) == (b"Subject: x\r\n\r\nhello\r\n", b"", False)


def test_remainder_after_end_is_returned():
    body, rest, r = run(b"hi\r\n.\r\nQUIT\r\nNOOP")
    assert (body, rest) == (b"hi\r\n", b"QUIT\r\nNOOP")


def test_remainder_may_start_with_dot_and_crlf():
    body, rest, r = run(b"hi\r\n.\r\n.\r\n\r\n")
    assert (body, rest) == (b"hi\r\n", b".\r\n\r\n")


def test_empty_message():
    body, rest, r = run(b".\r\n")
    assert (body, rest, r.size, r.bare_newline) == (b"", b"", 0, False)
    body, rest, r = run(b".", b"\r", b"\nRSET\r\n")
    assert (body, rest, r.size) == (b"", b"RSET\r\n", 0)


def test_message_of_one_empty_line():
    assert run(b"\r\n.\r\n")[:2] == (b"\r\n", b"")


@pytest.mark.parametrize("data", [
    b"a\n.\nb", b"a\r.\rb", b"a\n.\r\nb", b"a\r\n.\nb", b"a\r\n.\rb", b"a\r.\r\nb", b"a\n.\rb",
    b"a\r.\nb", b"a\r\n. \r\nb", b"a\r\n .\r\nb", b"a\r\n.\r\r\nb", b"a\r\r\n.\r\n"[:-1],
])
def test_only_crlf_dot_crlf_ends(data):
    body, rest, r = run(data)
    assert rest is None
    # the undecided tail is held back, everything else was passed on (unstuffed)
    assert data.replace(b"\r\n.", b"\r\n").startswith(body)


def test_data_not_ended_by_lf_dot_lf_then_ended_by_crlf_dot_crlf():
    body, rest, r = run(b"a\n.\nMAIL FROM:<x@y>\r\n", b".\r\nQUIT\r\n")
    assert (body, rest, r.bare_newline) == (b"a\n.\nMAIL FROM:<x@y>\r\n", b"QUIT\r\n", True)


# -- dot-unstuffing ----------------------------------------------------------------

@pytest.mark.parametrize("wire, body", [
    (b"..leading\r\n.\r\n", b".leading\r\n"),                # first line
    (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),                             # a line of one dot
    (b"...\r\n.\r\n", b"..\r\n"),
    (b"a.b\r\n.\r\n", b"a.b\r\n"),                          # dots inside a line untouched
    (b"a\r\n..\r\n..\r\n.\r\n", b"a\r\n.\r\n.\r\n"),
    (b"x..\r\n.\r\n", b"x..\r\n"),
])
def test_dot_unstuffing(wire, body):
    assert run(wire)[:2] == (body, b"")
    # and one byte at a time
    assert run(*[wire[i:i + 1] for i in range(len(wire))])[:2] == (body, b"")


@pytest.mark.parametrize("wire, body", [
    (b".x\r\n.\r\n", b"x\r\n"),
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),
    (b".\t\r\n.\r\n", b"\t\r\n"),
])
def test_leading_dot_is_removed_from_any_line(wire, body):
    # RFC 5321 4.5.2: "If the first character is a period and there are other
    # characters on the line, the first character is deleted" -- not only when
    # the second one is a period too.
    assert run(wire)[:2] == (body, b"")


# -- bare CR / LF --------------------------------------------------------------------

@pytest.mark.parametrize("segments, bare", [
    ([b"a\r\nb\r\n.\r\n"], False),
    ([b"a\nb\r\n.\r\n"], True),
    ([b"a\rb\r\n.\r\n"], True),
    ([b"a\r\r\n.\r\n"], True),
    ([b"a\n\r\n.\r\n"], True),
    ([b"a\r", b"\nb\r\n.\r\n"], False),          # a CRLF cut in two is no bare CR
    ([b"a\r", b"b\r\n.\r\n"], True),
    ([b"a\r\n", b"\nb\r\n.\r\n"], True),
    ([b"\nx\r\n.\r\n"], True),                    # bare LF on the first line
    ([b"\r.\r\nx\r\n.\r\n"], True),
    ([b"a\r\n", b".", b"\r", b"\n"], False),
])
def test_bare_newline_flag(segments, bare):
    body, rest, r = run(*segments)
    assert rest == b""
    assert r.bare_newline is bare


def test_bare_lf_after_end_is_not_flagged():
    body, rest, r = run(b"a\r\n.\r\nNOOP\n")
    assert (rest, r.bare_newline) == (b"NOOP\n", False)


def test_bare_newline_passed_on_unchanged():
    body, rest, r = run(b"a\nb\rc\r\n.\r\n")
    assert body == b"a\nb\rc\r\n"


# -- bounded carry -----------------------------------------------------------------------

@pytest.mark.parametrize("tail", [b"", b"\r", b"\r\n", b"\r\n.", b"\r\n.\r", b"\r\nab", b"x\r\n.."])
def test_carry_is_a_few_bytes(tail):
    out = []
    r = DataReader(out.append)
    assert r.feed(b"x" * 100000 + tail) is None
    assert len(r._pending) <= 5
    assert len(b"".join(out)) >= 100000 + len(tail) - 5


# -- properties ---------------------------------------------------------------------------

_line = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.lists(st.sampled_from([b".", b"..", b"a", b" ", b"\x00", b"\xff", b"\t"]), max_size=8).map(b"".join),
)


def _stuff(message_lines):
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in message_lines)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_line, max_size=12), trailing=st.binary(max_size=20), data=st.data())
def test_any_message_any_segmentation(lines, trailing, data):
    message = b"".join(l + b"\r\n" for l in lines)
    wire = _stuff(lines) + b".\r\n" + trailing        # message ends in CRLF: "\r\n.\r\n"
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    body, rest, bare, size = run_split(wire, cuts)
    assert body == message
    assert rest == trailing
    assert bare is False
    assert size == len(message)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_line, max_size=6), trailing=st.binary(max_size=10))
def test_any_message_one_byte_at_a_time(lines, trailing):
    message = b"".join(l + b"\r\n" for l in lines)
    wire = _stuff(lines) + b".\r\n" + trailing
    body, rest, bare, size = run_split(wire, range(len(wire)))
    assert (body, rest, bare, size) == (message, trailing, False, len(message))


_noise = st.one_of(
    st.binary(max_size=60),
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n..", b"\r\n.\r\n",
                              b"\n.\n", b"\r.\r"]), max_size=25).map(b"".join),
)


@settings(max_examples=400, deadline=None)
@given(wire=_noise, data=st.data())
def test_result_independent_of_segmentation(wire, data):
    """Any bytes, ended by the marker (if they did not end already): the same
    body, remainder, flag and size however they are cut.  Before the end, what
    was passed on so far is a prefix of that body, short of it by no more than
    the few bytes a reader may hold back (a CRLF, and "\r\n.\r" or a "\r")."""
    ended = wire + b"\r\n.\r\n"
    whole = run_split(ended, [])
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=15))
    assert run_split(ended, cuts) == whole
    assert run_split(ended, range(len(ended))) == whole
    for c in (cuts, range(len(wire))):
        body, rest, _, size = run_split(wire, c)
        if rest is None:
            assert whole[0].startswith(body) and len(whole[0]) - len(body) <= 6
            assert size == len(body)
        else:
            assert (body, rest) == (whole[0], whole[1][:len(rest)])


# -- LF mode (the MDA): the same reader, converted to LF on arrival -------------------------

def run_lf_split(data, cuts):
    """run_split with LFDataReader: (LF body, remainder, bare_newline, size)."""
    segs = segments(data, cuts)
    out = []
    reader = LFDataReader(lambda chunk, size: out.append((chunk, size)))
    rest = None
    for seg in segs:
        if rest is not None:
            rest += seg
            continue
        rest = reader.feed(seg)
    assert all(chunk for chunk, _ in out), "empty chunk passed to the sink"
    assert reader.size == sum(size for _, size in out)
    if not reader.bare_newline:
        # Without bare LF every LF stands for one CRLF.
        assert all(size == len(c) + c.count(b"\n") for c, size in out)
    return b"".join(c for c, _ in out), rest, reader.bare_newline, reader.size


def same_as_crlf_mode(wire, cuts):
    """LF mode gives DataReader's body with LF line ends, and DataReader's
    remainder, bare_newline flag and (CRLF) size."""
    body, rest, bare, size = run_split(wire, cuts)
    assert run_lf_split(wire, cuts) == (body.replace(b"\r\n", b"\n"), rest, bare, size)


def every_split(wire):
    """Cuts at every byte boundary: each single one, each pair, and all at once."""
    yield []
    for i in range(1, len(wire)):
        yield [i]
        for j in range(i + 1, len(wire)):
            yield [i, j]
    yield range(len(wire))


LF_CASES = [
    b".\r\n",                                  # empty message
    b"\r\n.\r\n",                              # one empty line
    b"Subject: x\r\n\r\nhello\r\n.\r\n",
    b"..leading\r\n.\r\n",                     # stuffed dot on the very first line
    b".x\r\n.\r\n",
    b"..\r\n.\r\n",                            # a line of one dot
    b"...\r\n..\r\n.\r\n",
    b"a\r\n..b\r\n..\r\n.\r\n",
    b"a.b\r\nx..\r\n.\r\n",
    b"\r\n\r\n..\r\n\r\n.\r\n",
    b"a\r\r\n.\r\n",                           # bare CR right before CRLF
    b"a\r\r\n..b\r\n.\r\n",
    b"a\rb\r\n.\r\n",
    b"a\nb\r\n.\r\n",                          # bare LF
    b"a\n.b\r\n.\r\n",                         # a dot after a bare LF is no line start
    b"a\n..\r\n.\r\n",
    b"\n.x\r\n.\r\n",                          # bare LF on the first line
    b"\r.\r\nx\r\n.\r\n",
    b"a\n\r\n.\r\n",
    b"a\r\n.\nb\r\n.\r\n",
    b"hi\r\n.\r\nQUIT\r\nNOOP",                # pipelined commands after the end
    b"hi\r\n.\r\n.\r\n\r\n",
    b"a\n.\nMAIL FROM:<x@y>\r\n.\r\nQUIT\r\n",
    b"x\r\n.",                                 # not ended (yet)
    b"x\r\n..\r",
]


@pytest.mark.parametrize("wire", LF_CASES)
def test_lf_mode_matches_crlf_mode_at_every_split(wire):
    for cuts in every_split(wire):
        same_as_crlf_mode(wire, cuts)


@pytest.mark.parametrize("wire, body", [
    (b"Subject: x\r\n\r\n..a\r\n.b\r\nc.\r\n.\r\n", b"Subject: x\n\n.a\nb\nc.\n"),
    (b"..leading\r\n.\r\n", b".leading\n"),
    (b".\r\n", b""),
])
def test_lf_mode_output(wire, body):
    got, rest, bare, size = run_lf_split(wire, [])
    assert (got, rest, bare) == (body, b"", False)
    assert size == len(body) + body.count(b"\n")


def test_lf_mode_cut_between_cr_and_lf_and_before_a_dot():
    wire = b"a\r\n..b\r\n.\r\n"
    for cuts in ([2], [3], [2, 3], [3, 4], [1, 2, 3, 4]):
        assert run_lf_split(wire, cuts) == (b"a\n.b\n", b"", False, 7)


@pytest.mark.parametrize("segments, bare", [
    ([b"a\r", b"\nb\r\n.\r\n"], False),
    ([b"a\r", b"b\r\n.\r\n"], True),
    ([b"a\r\n", b"\nb\r\n.\r\n"], True),
    ([b"a\r\r\n.\r\n"], True),
])
def test_lf_mode_bare_newline_flag(segments, bare):
    cuts = [sum(map(len, segments[:i])) for i in range(1, len(segments))]
    assert run_lf_split(b"".join(segments), cuts)[2] is bare


# LFDataReader checks line ends one of two ways, by how many CRs a segment holds
# (more than one in 16 bytes: counting; fewer: removing the CRs and putting them
# back).  Each defect below is tried with long lines (the second way) and short
# ones (the first), and must give DataReader's flag, body and size either way.
_DEFECTS = [
    b"",                    # clean
    b"\r",                  # bare CR
    b"\n",                  # bare LF
    b"\n\r",                # LF CR: as many CRs as LFs, neither paired
    b"\r\r\n\n",            # as many again, CRLF in the middle
    b"\r\nx\n\r",           # one good CRLF, then the swapped pair
    b"\r\n\r",              # CRLF then a bare CR
    b"\n\r\n",              # a bare LF then CRLF
]


@pytest.mark.parametrize("pad", [b"", b"y" * 40], ids=["short-lines", "long-lines"])
@pytest.mark.parametrize("defect", _DEFECTS)
def test_lf_mode_line_end_check_both_ways(defect, pad):
    wire = pad + b"\r\n" + pad + defect + pad + b"\r\n..z" + pad + b"\r\n.\r\n"
    same_as_crlf_mode(wire, [])
    for i in range(1, len(wire)):
        same_as_crlf_mode(wire, [i])
    assert run_lf_split(wire, [])[2] is bool(defect)


def test_lf_mode_many_line_ends_in_one_segment():
    """A whole segment of short lines, of long lines, of bare LFs, of bare CRs."""
    long_line = b"x" * 70
    for body, bare in ((b"ab\r\n" * 5000, False),
                       ((long_line + b"\r\n") * 900, False),
                       ((long_line + b"\n") * 900, True),
                       (b"\n" * 20000, True),
                       (b"\r" * 20000, True)):
        wire = body + b"\r\n.\r\n"
        same_as_crlf_mode(wire, [])
        assert run_lf_split(wire, [])[2] is bare


def test_lf_mode_carry_is_a_few_bytes():
    r = LFDataReader(lambda chunk, size: None)
    assert r.feed(b"x" * 100000 + b"\r\n.\r") is None
    assert len(r._pending) <= 5


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_line, max_size=12), trailing=st.binary(max_size=20), data=st.data())
def test_lf_mode_any_message_any_segmentation(lines, trailing, data):
    wire = _stuff(lines) + b".\r\n" + trailing
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    message = b"".join(l + b"\n" for l in lines)
    assert run_lf_split(wire, cuts) == (message, trailing, False, len(message) + len(lines))
    assert run_lf_split(wire, range(len(wire)))[0] == message


@settings(max_examples=400, deadline=None)
@given(wire=_noise, data=st.data())
def test_lf_mode_matches_crlf_mode_on_noise(wire, data):
    same_as_crlf_mode(wire, [])
    same_as_crlf_mode(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=15)))
    same_as_crlf_mode(wire, range(len(wire)))


# -- strip_cr: the line-end check every reader and the SMTP courier use ------------------------

_line_ends = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"bcdefghijklmnopqrstuvwxyz0123456789" * 2,
                              b"\r\r\n", b"\n\r"]), max_size=80).map(b"".join),
)


@settings(max_examples=1500, deadline=None)
@given(_line_ends)
def test_strip_cr_answers_exactly_what_counting_did(chunk):
    """The three counts it replaces (DataReader before the seventh session):
    clean exactly when every CR and LF is part of a CRLF.  Both of its ways
    (counting for short lines, rebuilding for long ones) are drawn."""
    n = chunk.count(b"\r\n")
    clean, out, crs = strip_cr(chunk)
    assert clean == (chunk.count(b"\r") == n and chunk.count(b"\n") == n)
    assert crlf_clean(chunk) == clean
    assert crlf_clean(b"y" * 300 + chunk) == clean       # judged sparse at its start
    assert crlf_clean(b"\r\n" * 150 + chunk) == clean   # judged dense
    assert out == chunk.replace(b"\r", b"") and crs == chunk.count(b"\r")


def test_strip_cr_both_ways_on_examples():
    long_line = b"x" * 40
    for chunk, clean in ((b"", True), (b"a\r\n", True), (long_line + b"\r\n", True),
                         (long_line + b"\n", False), (long_line + b"\r", False),
                         (long_line + b"\r\r\n", False), (long_line + b"\n\r", False),
                         (b"\r\n\r\n", True), (b"\r\r\n", False), (b"\n", False)):
        assert strip_cr(chunk)[0] is clean and crlf_clean(chunk) is clean, chunk
