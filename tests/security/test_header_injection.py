"""Header injection through HELO, addresses, parameters and reverse DNS.

Nothing the client controls may put a CR or LF into the Received header (or any
reply): a bad HELO is refused, an address with CR/LF is refused, and a PTR name
that is not a host name becomes ``unknown``.
"""
import ipaddress
import re
from types import SimpleNamespace

import dns.name
import pytest

from mailsys.rdns import ReverseLookup
from tests.helpers import FakeService, connect, receive_connect, take

EHLO_OK = (b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-ENHANCEDSTATUSCODES\r\n"
           b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 HELP\r\n")
UNKNOWN = b"500 5.5.2 Error: command not recognized\r\n"
BAD_BYTES = b"500 5.5.2 Error: bad characters in command\r\n"


def session(data):
    proto, t, h, clock = connect()
    take(t)
    proto.dataReceived(data)
    return proto, t, h


# -- HELO / EHLO -------------------------------------------------------------------------

@pytest.mark.parametrize("line, reply", [
    (b"HELO evil.example\rX-Injected: yes\r\n", b"501 5.5.4 Error: invalid HELO hostname\r\n"),
    (b"EHLO evil.example\rX-Injected: yes\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO evil example\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"HELO evil.example (forged.example [10.0.0.1])\r\n", b"501 5.5.4 Error: invalid HELO hostname\r\n"),
    (b"EHLO (forged)\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO evil;by.example\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO evil\x00.example\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO evil\t.example\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO evil\x0b.example\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO <evil@example>\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO " + b"a" * 256 + b"\r\n", b"501 5.5.4 Error: invalid EHLO hostname\r\n"),
    (b"EHLO \xc3\xa9vil.example\r\n", BAD_BYTES),
    (b"EHLO \xffvil.example\r\n", BAD_BYTES),
])
def test_bad_helo_refused(line, reply):
    proto, t, h = session(line + b"MAIL FROM:<a@b.example>\r\n")
    assert t.value() == reply + b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    assert proto.helo is None
    assert [c for c in h.calls if c[0] == "helo"] == []


def test_crlf_in_helo_is_two_lines():
    proto, t, h = session(b"EHLO good.example\r\nX-Injected: yes\r\n")
    assert t.value() == EHLO_OK + UNKNOWN
    assert proto.helo == "good.example"


def test_helo_name_of_255_accepted():
    name = b"a" * 255
    proto, t, h = session(b"HELO " + name + b"\r\n")
    assert t.value() == b"250 mx.example.com\r\n"


# -- addresses and parameters ---------------------------------------------------------------

@pytest.mark.parametrize("line, reply", [
    (b"MAIL FROM:<a\r@b.example>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"MAIL FROM:<a@b.example\r>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"MAIL FROM:<\"a\rX-Injected: 1\"@b.example>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"MAIL FROM:<a\x00@b.example>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"MAIL FROM:<a@b.example> ENVID=a+0D+0AX\r\n", b"501 5.5.4 Bad ENVID parameter\r\n"),
    (b"MAIL FROM:<a@b.example> ENVID=a\rb\r\n", b"501 5.5.4 Bad characters in parameter value\r\n"),
])
def test_cr_in_sender(line, reply):
    proto, t, h = session(b"EHLO c.example\r\n" + line)
    assert t.value() == EHLO_OK + reply


@pytest.mark.parametrize("line, reply", [
    (b"RCPT TO:<alice\r@example.com>\r\n", b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"RCPT TO:<alice@example.com\r>\r\n", b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"RCPT TO:<\"x\rX-Injected: 1\"@example.com>\r\n", b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"RCPT TO:<alice@example.com> ORCPT=rfc822;a+0D+0AX-Injected:+20y@example.com\r\n",
     b"501 5.5.4 Bad ORCPT address\r\n"),
])
def test_cr_in_recipient(line, reply):
    proto, t, h = session(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n" + line)
    assert t.value() == EHLO_OK + b"250 2.1.0 Ok\r\n" + reply


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a@b.example> X\rY=1\r\n",
    b"MAIL FROM:<a@b.example>\rX-Injected: 1\r\n",
    b"MAIL FROM:<a@b.example> SIZE=1\r\r\n",
])
def test_cr_in_mail_parameter_keyword_gets_a_clean_501(line):
    proto, t, h = session(b"EHLO c.example\r\n" + line + b"NOOP\r\n")
    out = t.value()
    assert out.startswith(EHLO_OK + b"501 5.5.4 ")
    rest = out[len(EHLO_OK):]
    first, second = rest.split(b"\r\n", 1)
    assert b"\r" not in first and b"\n" not in first
    assert second == b"250 2.0.0 Ok\r\n"


def test_cr_in_rcpt_parameter_keyword_gets_a_clean_501():
    proto, t, h = session(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n"
                          b"RCPT TO:<alice@example.com>\rX-Injected: 1\r\nNOOP\r\n")
    out = t.value()[len(EHLO_OK) + len(b"250 2.1.0 Ok\r\n"):]
    first, second = out.split(b"\r\n", 1)
    assert first.startswith(b"501 5.5.4 ") and b"\r" not in first
    assert second == b"250 2.0.0 Ok\r\n"


# -- the Received header --------------------------------------------------------------------

_RECEIVED = re.compile(
    rb"Received: from [A-Za-z0-9._:\-\[\]]+ \([A-Za-z0-9.\-]+ \[[0-9A-Fa-f.:IPv]+\]\)\r\n"
    rb"\tby mx\.example\.com \(mailsys\) with [A-Z0-9]+ id [0-9A-Z]+\r\n"
    rb"\tfor <[^\r\n]+>; [^\r\n]+\r\n\Z")


def _received(svc):
    data = bytes(svc.spool.commits[0][0].data)
    return data[:data.index(b"Subject:")]


def test_injection_attempts_leave_a_clean_received_header():
    svc = FakeService()
    proto, t = receive_connect(svc, "203.0.113.66")
    proto.dataReceived(b"EHLO evil.example\rX-Injected: 1\r\n"           # refused
                       b"EHLO good.example\r\nX-Injected: 2\r\n"          # EHLO ok, junk refused
                       b"MAIL FROM:<a\r@b.example>\r\n"                   # refused
                       b"MAIL FROM:<a@b.example>\r\n"
                       b"RCPT TO:<alice\r@example.com>\r\n"               # refused
                       b"RCPT TO:<alice@example.com>\r\n"
                       b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    header = _received(svc)
    assert _RECEIVED.match(header), header
    assert header.count(b"\r") == 3 and header.count(b"\n") == 3
    assert header.startswith(b"Received: from good.example (client.example.net [203.0.113.66])\r\n")
    assert b"Injected" not in header
    assert b"for <alice@example.com>;" in header


@pytest.mark.parametrize("content, stored", [
    # A leading continuation line would extend our Received header.
    (b"\tby trusted.example with ESMTP id FORGED\r\nSubject: x\r\n\r\nb\r\n",
     b"\r\n\tby trusted.example with ESMTP id FORGED\r\nSubject: x\r\n\r\nb\r\n"),
    (b" x\r\n", b"\r\n x\r\n"),
    # A message with no header: its lines would sit in the header section.
    (b"just a body line\r\nsecond\r\n", b"\r\njust a body line\r\nsecond\r\n"),
    (b"Subject x\r\n", b"\r\nSubject x\r\n"),
    (b"\r\nbody only\r\n", b"\r\nbody only\r\n"),          # the blank line is there
    (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n"),   # as it was
    # A field name longer than a line may be (RFC 5322 2.1.1) is none.
    (b"X-" + b"a" * 2000 + b": long\r\n\r\nb\r\n", b"\r\nX-" + b"a" * 2000 + b": long\r\n\r\nb\r\n"),
    (b"X-" + b"a" * 990 + b": long\r\n\r\nb\r\n", b"X-" + b"a" * 990 + b": long\r\n\r\nb\r\n"),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_what_follows_our_received_header_is_what_the_client_meant(content, stored, bytewise):
    """Nothing the client sends can continue our Received field: a message that
    does not start with a header field gets a blank line after it, so all of it
    is body (RFC 5322 2.1).  The same however the bytes arrive."""
    svc = FakeService()
    proto, t = receive_connect(svc, "203.0.113.66")
    proto.dataReceived(b"EHLO good.example\r\nMAIL FROM:<a@b.example>\r\n"
                       b"RCPT TO:<alice@example.com>\r\nDATA\r\n")
    wire = content + b".\r\n"
    for piece in ([wire[i:i + 1] for i in range(len(wire))] if bytewise else [wire]):
        proto.dataReceived(piece)
    data = bytes(svc.spool.commits[0][0].data)
    header_end = data.index(b"\r\n", data.index(b"\tfor <alice@example.com>;")) + 2
    assert _RECEIVED.match(data[:header_end]), data[:300]
    assert data[header_end:] == stored


def test_stray_cr_at_the_end_of_helo_is_not_kept():
    proto, t, h = session(b"EHLO evil.example\r\r\n")
    assert t.value() == EHLO_OK
    assert proto.helo == "evil.example"


# -- reverse DNS names ------------------------------------------------------------------------

class _Resolver:
    """PTR: ``names``; A: every name points back at the client (so only the
    syntax check decides here)."""

    def __init__(self, names):
        self.names = names

    def resolve(self, qname, rdtype, lifetime=None):
        if rdtype == "A":
            return [SimpleNamespace(address="203.0.113.66")]
        assert rdtype == "PTR"
        return [SimpleNamespace(target=n) for n in self.names]


def _text(s):
    return SimpleNamespace(to_text=lambda omit_final_dot=False: s)


def _lookup(names):
    r = ReverseLookup(reactor=None, clock=SimpleNamespace(seconds=lambda: 0.0))
    r._resolver = _Resolver(names)
    return r._query(ipaddress.ip_address("203.0.113.66"))[0]


@pytest.mark.parametrize("ptr", [
    "evil.example\r\nX-Injected: yes",
    "evil.example\nX: y",
    "evil.example\r",
    "evil (forged.example [10.0.0.1])",
    "evil example",
    "evil_underscore.example",
    "-evil.example",
    "evil-.example",
    "a" * 64 + ".example",
    ".".join(["a" * 63] * 4) + ".example",
    "",
    "évil.example",
])
def test_rdns_refuses_names_that_are_not_host_names(ptr):
    assert _lookup([_text(ptr)]) is None


def test_rdns_escaped_dns_labels_refused():
    name = dns.name.Name([b"evil\r\nX-Injected: yes", b"example", b""])
    assert _lookup([name]) is None


def test_rdns_good_names_lowercased_and_first_good_one_used():
    assert _lookup([dns.name.from_text("Mail.EXAMPLE.net.")]) == "mail.example.net"
    assert _lookup([_text("bad name"), _text("Good.Example")]) == "good.example"
