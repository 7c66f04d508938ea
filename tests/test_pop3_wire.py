"""Stored bytes to the POP3 wire (mailsys.pop3.wire): CRLF, dot-stuffing, mboxrd
unquoting, TOP, and the same result however the input is cut into chunks."""
import pytest

from mailsys.pop3.wire import MAX_HOLD, SizeCounter, WireEncoder, encode

STORED = (b"Return-Path: <a@b.org>\nSubject: hi\n\nline one\n.dot\n..two dots\n"
          b">From quoted\n>>From twice\nFrom bare\n\n.\nlast\n")
WIRE = (b"Return-Path: <a@b.org>\r\nSubject: hi\r\n\r\nline one\r\n..dot\r\n...two dots\r\n"
        b">From quoted\r\n>>From twice\r\nFrom bare\r\n\r\n..\r\nlast\r\n.\r\n")


def unstuffed_size(wire):
    """RFC 1939 size of a multi-line reply body: without the terminator and stuffing dots."""
    body = wire[:-3]
    lines = body.split(b"\r\n")
    return len(body) - sum(1 for line in lines if line.startswith(b".."))


def test_crlf_and_dot_stuffing():
    assert encode(STORED) == WIRE


def test_mboxrd_unquoting_removes_one_quote_level():
    assert encode(b"a\n>From x\n>>From y\n>Fromage\n> From z\n", unquote=True) == \
        b"a\r\nFrom x\r\n>From y\r\n>Fromage\r\n> From z\r\n.\r\n"


def test_unquoted_line_that_starts_with_a_dot_after_unquoting_is_not_special():
    assert encode(b">From .x\n", unquote=True) == b"From .x\r\n.\r\n"


def test_existing_crlf_is_kept_single():
    assert encode(b"a\r\nb\nc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"


def test_missing_final_newline_gets_one():
    assert encode(b"a\nb") == b"a\r\nb\r\n.\r\n"
    assert encode(b"") == b".\r\n"


@pytest.mark.parametrize("n, expected", [
    (0, b"H: 1\r\nI: 2\r\n\r\n.\r\n"),
    (1, b"H: 1\r\nI: 2\r\n\r\nb1\r\n.\r\n"),
    (2, b"H: 1\r\nI: 2\r\n\r\nb1\r\n\r\n.\r\n"),
    (3, b"H: 1\r\nI: 2\r\n\r\nb1\r\n\r\n..b3\r\n.\r\n"),
    (99, b"H: 1\r\nI: 2\r\n\r\nb1\r\n\r\n..b3\r\n.\r\n"),
])
def test_top_counts_body_lines_after_the_blank_line(n, expected):
    assert encode(b"H: 1\nI: 2\n\nb1\n\n.b3\n", body_lines=n) == expected


def test_top_of_a_message_without_body_sends_the_headers():
    assert encode(b"H: 1\nI: 2\n", body_lines=0) == b"H: 1\r\nI: 2\r\n.\r\n"


@pytest.mark.parametrize("unquote, lines", [(False, None), (True, None), (True, 2), (False, 0)])
def test_every_split_gives_the_same_bytes(unquote, lines):
    data = STORED + b"tail\r\n>From \r\n.\r\nno newline"
    whole = encode(data, unquote, lines)
    for i in range(len(data) + 1):
        enc = WireEncoder(unquote, lines)
        got = enc.feed(data[:i]) + enc.feed(data[i:]) + enc.finish()
        assert got == whole, i
    enc = WireEncoder(unquote, lines)
    got = b"".join(enc.feed(data[i:i + 1]) for i in range(len(data))) + enc.finish()
    assert got == whole


def test_long_lines_stream_through_and_keep_their_start_rules():
    long = b"." + b"x" * (3 * MAX_HOLD) + b"\r"
    data = long + b"\nnext\n"
    expected = b"." + long[:-1] + b"\r\nnext\r\n.\r\n"
    assert encode(data) == expected
    for step in (1000, MAX_HOLD - 1, MAX_HOLD + 1, 3 * MAX_HOLD + 1):
        enc = WireEncoder()
        out = b"".join(enc.feed(data[i:i + step]) for i in range(0, len(data), step)) + enc.finish()
        assert out == expected, step


@pytest.mark.parametrize("data", [STORED, b"a\r\nb\nc", b"\r\n\r\n\n", b"x\ry\n", b""])
def test_size_counter_matches_the_wire(data):
    for i in range(len(data) + 1):
        c = SizeCounter()
        c.feed(data[:i])
        c.feed(data[i:])
        assert c.size == unstuffed_size(encode(data)) - (0 if data.endswith(b"\n") or not data else 2), i
