"""SMTP smuggling (CVE-2023-51764 class): every non-standard end-of-data sequence.

A message whose body contains ``<LF>.<LF>`` (or any other variant) followed by a
second transaction must never be split in two: the smuggled commands are body
text, the message is refused after the real ``<CRLF>.<CRLF>`` with 550 5.5.2,
and nothing reaches the spool.
"""
import pytest

from tests.helpers import FakeService, connect, receive_connect, take

VARIANTS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r.\n"]
IDS = ["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR", "CR.CRLF", "LF.CR", "CR.LF"]

BANNER = b"220 mx.example.com ESMTP\r\n"
EHLO = (b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-ENHANCEDSTATUSCODES\r\n"
        b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-ETRN\r\n250 HELP\r\n")
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
REFUSED = b"550 5.5.2 Error: bare <CR> or <LF> in message; use <CR><LF> line endings\r\n"
BYE = b"221 2.0.0 Bye\r\n"

HEAD = (b"EHLO attacker.example\r\n"
        b"MAIL FROM:<sender@remote.example>\r\n"
        b"RCPT TO:<alice@example.com>\r\n"
        b"DATA\r\n"
        b"From: sender@remote.example\r\nSubject: innocent\r\n\r\nhello")
SMUGGLED = (b"MAIL FROM:<evil@x.example>\r\n"
            b"RCPT TO:<victim@example.com>\r\n"
            b"DATA\r\n"
            b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nwire the money")
TAIL = b"\r\n.\r\nQUIT\r\n"
EXPECTED = BANNER + EHLO + SENDER_OK + RCPT_OK + GO_AHEAD + REFUSED + BYE


def script(variant):
    return HEAD + variant + SMUGGLED + TAIL


def run_receive(segments):
    svc = FakeService(users=("alice@example.com", "victim@example.com"))
    proto, t = receive_connect(svc, "203.0.113.66")
    for s in segments:
        proto.dataReceived(s)
    return svc, t


def check(svc, t):
    assert t.value() == EXPECTED
    assert svc.spool.commits == []
    assert [w.discarded for w in svc.spool.writers] == [True]
    # only the one real RCPT was ever looked at
    assert svc.accounts.asked == ["alice@example.com"]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_smuggled_transaction_never_executes(variant):
    svc, t = run_receive([script(variant)])
    check(svc, t)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_smuggling_one_byte_at_a_time(variant):
    data = script(variant)
    svc, t = run_receive([data[i:i + 1] for i in range(len(data))])
    check(svc, t)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_smuggling_split_around_the_fake_end(variant):
    data = script(variant)
    start = len(HEAD) - 3
    for cut in range(start, start + len(variant) + 8):
        svc, t = run_receive([data[:cut], data[cut:]])
        check(svc, t)
    # and with the fake end arriving as its own segment
    svc, t = run_receive([HEAD, variant, SMUGGLED, TAIL])
    check(svc, t)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_smuggled_commands_never_reach_the_handler(variant):
    proto, t, h, clock = connect()
    proto.dataReceived(script(variant))
    assert t.value() == EXPECTED.replace(b"250-ETRN\r\n", b"")   # ETRN: the mta role only
    assert [c for c in h.calls if c[0] in ("mail", "rcpt")] == [
        ("mail", "sender@remote.example", {}), ("rcpt", "alice@example.com", {})]
    assert h.messages == []
    assert h.calls[-2:] == [("data_abort", REFUSED), ("disconnected",)]
    # the body was never cut at the fake end: all of it went to the handler
    # (dot-unstuffed: a "." that starts a CRLF line is removed, RFC 5321 4.5.2)
    sent = b"\r\nhello" + variant + SMUGGLED + b"\r\n"
    assert bytes(h.body) == (b"From: sender@remote.example\r\nSubject: innocent\r\n" +
                             sent.replace(b"\r\n.", b"\r\n"))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_connection_usable_after_refusal(variant):
    svc = FakeService()
    proto, t = receive_connect(svc, "203.0.113.66")
    proto.dataReceived(script(variant)[:-len(b"QUIT\r\n")])
    take(t)
    proto.dataReceived(b"MAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
                       b"clean\r\n.\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD
    assert len(svc.spool.commits) == 1
    assert svc.spool.commits[0][0].data.endswith(b"\r\nclean\r\n")
