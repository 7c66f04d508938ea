"""mailsys.smtp.data.DataReader: end of data, dot-unstuffing, bare CR/LF, segmentation."""
import pytest
from hypothesis import given, settings, strategies as st

from mailsys.smtp.data import DataReader


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


def run_split(data, cuts):
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    segs, last = [], 0
    for c in cuts + [len(data)]:
        segs.append(data[last:c])
        last = c
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
    whole = run_split(wire, [])
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=15))
    assert run_split(wire, cuts) == whole
    assert run_split(wire, range(len(wire))) == whole
