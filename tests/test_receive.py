"""mailsys.receive.ReceiveHandler: the MTA policy, the Received header, the spool handoff."""
import email.utils
import ipaddress
import re
from types import SimpleNamespace

import pytest
from twisted.internet import defer

from mailsys import receive
from mailsys.receive import MAX_HOPS, count_hops, protocol_keyword
from mailsys.spool import SpoolError
from tests.helpers import FakeRDNS, FakeService, receive_connect, take

BANNER = b"220 mx.example.com ESMTP\r\n"
DATE = "Mon, 02 Mar 2026 10:00:00 -0000"
_DATE = re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [ 0-9]\d (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
                   rb" \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
OK = b"250 2.0.0 Ok\r\n"
UNKNOWN_USER = b"550 5.1.1 <%s>: Recipient address rejected: User unknown in local recipient table\r\n"
RELAY_DENIED = b"554 5.7.1 <%s>: Relay access denied\r\n"


@pytest.fixture(autouse=True)
def fixed_time(monkeypatch):
    monkeypatch.setattr(receive.time, "time", lambda: 1772445600.0)


def dated(data, count=1):
    """``data`` with each RFC 5322 date replaced by DATE (checked to parse)."""
    found = _DATE.findall(data)
    assert len(found) == count, data
    for d in found:
        assert email.utils.parsedate_to_datetime(d.decode()).utcoffset() is not None
    return _DATE.sub(DATE.encode(), data)


def connect(svc=None, ip="203.0.113.9"):
    svc = svc or FakeService()
    proto, t = receive_connect(svc, ip)
    assert take(t) == BANNER
    return svc, proto, t


def say(proto, t, data):
    proto.dataReceived(data)
    return take(t)


def start(svc=None, ip="203.0.113.9", helo=b"EHLO client.example\r\n", mail=b"MAIL FROM:<s@remote.example>\r\n"):
    svc, proto, t = connect(svc, ip)
    out = say(proto, t, helo + mail)
    assert out.endswith(SENDER_OK)
    return svc, proto, t


# -- RCPT policy -----------------------------------------------------------------------

@pytest.mark.parametrize("ip, rcpt, reply", [
    ("203.0.113.9", b"alice@example.com", RCPT_OK),
    ("203.0.113.9", b"Alice@EXAMPLE.COM", UNKNOWN_USER % b"Alice@example.com"),   # local parts are exact
    ("203.0.113.9", b"alice@Example.Com", RCPT_OK),
    ("203.0.113.9", b"bob@example.com", UNKNOWN_USER % b"bob@example.com"),
    ("203.0.113.9", b"anyone@relay.example", RCPT_OK),
    ("203.0.113.9", b"anyone@sub.relay.example", RELAY_DENIED % b"anyone@sub.relay.example"),
    ("203.0.113.9", b"victim@other.org", RELAY_DENIED % b"victim@other.org"),
    ("203.0.113.9", b"victim@sub.example.com", RELAY_DENIED % b"victim@sub.example.com"),
    ("10.1.2.3", b"victim@other.org", RCPT_OK),
    ("127.0.0.1", b"victim@other.org", RCPT_OK),
    ("::1", b"victim@other.org", RCPT_OK),
    ("2001:db8::7", b"victim@other.org", RELAY_DENIED % b"victim@other.org"),
    ("10.1.2.3", b"bob@example.com", UNKNOWN_USER % b"bob@example.com"),       # mynetworks: still 5.1.1
    ("203.0.113.9", b"postmaster", RCPT_OK),
    ("203.0.113.9", b"POSTMASTER", RCPT_OK),
    ("203.0.113.9", b"postmaster@example.com", RCPT_OK),
    ("203.0.113.9", b"PostMaster@EXAMPLE.com", RCPT_OK),
    ("203.0.113.9", b'"postmaster"@example.com', RCPT_OK),
    ("203.0.113.9", b"postmaster@other.org", RELAY_DENIED % b"postmaster@other.org"),
])
def test_rcpt_policy(ip, rcpt, reply):
    svc, proto, t = start(ip=ip)
    assert say(proto, t, b"RCPT TO:<" + rcpt + b">\r\n") == reply


def test_accounts_are_asked_with_the_parsed_address():
    svc, proto, t = start()
    say(proto, t, b"RCPT TO:<alice@EXAMPLE.com>\r\nRCPT TO:<\"bob\"@example.com>\r\nRCPT TO:<x@other.org>\r\n"
                  b"RCPT TO:<postmaster@example.com>\r\n")
    assert svc.accounts.asked == ["alice@example.com", "bob@example.com"]


def test_null_sender_accepted():
    svc, proto, t = start(mail=b"MAIL FROM:<>\r\n")
    assert say(proto, t, b"RCPT TO:<alice@example.com>\r\n") == RCPT_OK


def test_queue_id_assigned_at_mail():
    svc, proto, t = start()
    assert proto.txn.queue_id == "QID1"


# -- the Received header and the spool handoff -------------------------------------------------

def _send_message(proto, t, rcpts=(b"alice@example.com",), body=b"Subject: hi\r\n\r\nbody\r\n"):
    data = b"".join(b"RCPT TO:" + (r if r.startswith(b"<") else b"<" + r + b">") + b"\r\n" for r in rcpts) + b"DATA\r\n" + body + b".\r\n"
    return say(proto, t, data)


def test_received_header_and_queued_only_after_commit():
    svc, proto, t = start()
    out = _send_message(proto, t)
    assert out == RCPT_OK + GO_AHEAD             # no 250 before the commit fires
    assert len(svc.spool.commits) == 1
    writer, envelope, d = svc.spool.commits[0]
    header = (b"Received: from client.example (client.example.net [203.0.113.9])\r\n"
              b"\tby mx.example.com (mailsys) with ESMTP id QID1\r\n"
              b"\tfor <alice@example.com>; " + DATE.encode() + b"\r\n")
    assert dated(bytes(writer.data)) == header + b"Subject: hi\r\n\r\nbody\r\n"
    assert writer.queue_id == "QID1"
    svc.spool.succeed()
    assert take(t) == b"250 2.0.0 Ok: queued as QID1\r\n"
    assert envelope == {
        "arrival": 1772445600.0,
        "sender": "s@remote.example",
        "params": {},
        "recipients": [{"rcpt": "alice@example.com", "state": "queued"}],
        "client": {"ip": "203.0.113.9", "name": "client.example.net", "helo": "client.example",
                   "proto": "ESMTP", "role": "mta", "auth": None},
    }


def test_received_header_several_recipients_ipv6_and_helo():
    svc, proto, t = start(ip="2001:db8::5", helo=b"HELO [IPv6:2001:db8::5]\r\n",
                          mail=b"MAIL FROM:<>\r\n")
    out = _send_message(proto, t, rcpts=(b"alice@example.com", b"postmaster", b"x@relay.example"))
    assert out == RCPT_OK * 3 + GO_AHEAD
    writer = svc.spool.commits[0][0]
    assert dated(bytes(writer.data)).split(b"Subject")[0] == (
        b"Received: from [IPv6:2001:db8::5] (client.example.net [IPv6:2001:db8::5])\r\n"
        b"\tby mx.example.com (mailsys) with SMTP id QID1;\r\n"
        b"\t" + DATE.encode() + b"\r\n")
    envelope = svc.spool.commits[0][1]
    assert [r["rcpt"] for r in envelope["recipients"]] == ["alice@example.com", "postmaster", "x@relay.example"]
    assert envelope["sender"] == "" and envelope["client"]["proto"] == "SMTP"


def test_ipv4_mapped_client_is_its_ipv4_address_everywhere():
    """A dual-stack tcp6 listener sees 127.0.0.1 as ::ffff:127.0.0.1: relay.mynetworks
    (127.0.0.0/8), the reverse lookup, the per-IP limit, the log label, the Received
    header and the queue record must all see 127.0.0.1, as Postfix's smtpd does."""
    rdns = FakeRDNS(default=None)
    svc = FakeService(rdns=rdns)
    svc, proto, t = start(svc, ip="::ffff:127.0.0.1")
    assert proto.handler.client.label == "unknown[127.0.0.1]"
    assert rdns.lookups == [ipaddress.ip_address("127.0.0.1")]
    assert svc.limiter.held == [ipaddress.ip_address("127.0.0.1")]
    assert _send_message(proto, t, rcpts=(b"victim@other.org",)) == RCPT_OK + GO_AHEAD
    writer, envelope, d = svc.spool.commits[0]
    assert bytes(writer.data).startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n")
    assert envelope["client"]["ip"] == "127.0.0.1"


def test_ipv4_mapped_client_outside_mynetworks_is_still_refused():
    svc, proto, t = start(ip="::ffff:203.0.113.9")
    assert say(proto, t, b"RCPT TO:<victim@other.org>\r\n") == RELAY_DENIED % b"victim@other.org"
    assert proto.handler.client.label == "client.example.net[203.0.113.9]"


def test_envelope_keeps_dsn_parameters():
    svc, proto, t = start(mail=b"MAIL FROM:<s@remote.example> RET=HDRS ENVID=a+2Bb SIZE=50 BODY=8BITMIME\r\n")
    _send_message(proto, t, rcpts=(b"<alice@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Alice@example.com",))
    envelope = svc.spool.commits[0][1]
    assert envelope["params"] == {"ret": "HDRS", "envid": "a+b", "size": 50, "body": "8BITMIME"}
    assert envelope["recipients"] == [{"rcpt": "alice@example.com", "state": "queued",
                                       "notify": ["SUCCESS", "DELAY"], "orcpt": ["rfc822", "Alice@example.com"]}]


def test_smtputf8_keyword_in_header_and_envelope():
    svc, proto, t = start(mail="MAIL FROM:<sé@remote.example> SMTPUTF8\r\n".encode())
    _send_message(proto, t)
    writer, envelope, d = svc.spool.commits[0]
    assert b"\tby mx.example.com (mailsys) with UTF8SMTP id QID1\r\n" in bytes(writer.data)
    assert envelope["sender"] == "sé@remote.example"
    # the queue record and the Received header must name the same protocol
    assert envelope["client"]["proto"] == "UTF8SMTP"


def test_rdns_name_looked_up_before_the_banner():
    d = defer.Deferred()
    rdns = FakeRDNS(default=None)
    rdns.lookup = lambda ip: d
    svc = FakeService(rdns=rdns)
    proto, t = receive_connect(svc, "198.51.100.4")
    proto.dataReceived(b"EHLO c.example\r\n")
    assert t.value() == b""
    d.callback("unknown")
    assert t.value().startswith(BANNER + b"250-mx.example.com\r\n")
    take(t)
    say(proto, t, b"MAIL FROM:<>\r\n")
    _send_message(proto, t)
    assert bytes(svc.spool.commits[0][0].data).startswith(
        b"Received: from c.example (unknown [198.51.100.4])\r\n")
    assert svc.spool.commits[0][1]["client"]["name"] == "unknown"


def test_commit_failure_is_451_and_the_session_goes_on():
    svc, proto, t = start()
    _send_message(proto, t)
    svc.spool.fail(OSError(5, "Input/output error"))
    assert take(t) == b"451 4.3.0 Error: local I/O error, try again later\r\n"
    assert say(proto, t, b"NOOP\r\n") == OK


def test_spool_error_without_nospace_is_451():
    svc, proto, t = start()
    _send_message(proto, t)
    svc.spool.fail(SpoolError("Input/output error"))
    assert take(t) == b"451 4.3.0 Error: local I/O error, try again later\r\n"


def test_enospc_is_452():
    svc, proto, t = start()
    _send_message(proto, t)
    svc.spool.fail(SpoolError("No space left on device", nospace=True))
    assert take(t) == b"452 4.3.1 Error: insufficient system storage, try again later\r\n"
    assert say(proto, t, b"MAIL FROM:<>\r\n") == SENDER_OK


def test_commands_after_the_dot_wait_for_the_commit():
    svc, proto, t = start()
    out = _send_message(proto, t, body=b"x\r\n") + say(proto, t, b"MAIL FROM:<>\r\nQUIT\r\n")
    assert out == RCPT_OK + GO_AHEAD
    svc.spool.succeed()
    assert take(t) == b"250 2.0.0 Ok: queued as QID1\r\n" + SENDER_OK + b"221 2.0.0 Bye\r\n"


def _hops(n):
    return b"".join(b"Received: from h%d.example by h%d.example; %s\r\n" % (i, i + 1, b"1 Jan 2026")
                    for i in range(n)) + b"Subject: loop\r\n\r\nbody\r\n"


def test_exactly_50_received_headers_accepted():
    svc, proto, t = start()
    assert _send_message(proto, t, body=_hops(MAX_HOPS)) == RCPT_OK + GO_AHEAD
    assert len(svc.spool.commits) == 1
    assert count_hops(svc.spool.commits[0][0].head) == 51


def test_51_received_headers_refused_as_a_loop():
    svc, proto, t = start()
    assert _send_message(proto, t, body=_hops(MAX_HOPS + 1)) == \
        RCPT_OK + GO_AHEAD + b"554 5.4.6 Error: too many hops\r\n"
    assert svc.spool.commits == []
    assert svc.spool.writers[0].discarded is True


def test_received_in_the_body_does_not_count():
    svc, proto, t = start()
    body = b"Subject: x\r\n\r\n" + b"Received: quoted\r\n" * 60
    assert _send_message(proto, t, body=body) == RCPT_OK + GO_AHEAD
    assert len(svc.spool.commits) == 1


def test_bare_newline_message_discarded():
    svc, proto, t = start()
    assert _send_message(proto, t, body=b"Subject: x\r\n\r\nline\nline\r\n") == RCPT_OK + GO_AHEAD + \
        b"550 5.5.2 Error: bare <CR> or <LF> in message; use <CR><LF> line endings\r\n"
    assert svc.spool.commits == []
    assert svc.spool.writers[0].discarded is True


def test_message_too_big_discarded():
    svc, proto, t = start(FakeService(message_size=50))
    assert _send_message(proto, t, body=b"x" * 60 + b"\r\n") == RCPT_OK + GO_AHEAD + \
        b"552 5.3.4 Error: message file too big\r\n"
    assert svc.spool.commits == []
    assert svc.spool.writers[0].discarded is True
    # the next transaction works
    say(proto, t, b"MAIL FROM:<>\r\n")
    assert _send_message(proto, t, body=b"small\r\n") == RCPT_OK + GO_AHEAD
    assert len(svc.spool.commits) == 1


def test_rset_after_data_refusal_and_disconnect_discard():
    svc, proto, t = start()
    say(proto, t, b"RCPT TO:<alice@example.com>\r\nDATA\r\npartial\r\n")
    t.loseConnection()
    assert svc.spool.writers[0].discarded is True
    assert svc.spool.commits == []
    assert svc.limiter.held == []


def test_connection_limit():
    svc = FakeService()
    svc.limiter.admit = False
    proto, t = receive_connect(svc)
    assert t.value() == b"421 4.7.0 mx.example.com Error: too many connections\r\n"
    assert t.connected is False
    assert svc.limiter.held == []


def test_limiter_released_on_disconnect():
    svc, proto, t = connect()
    assert svc.limiter.held and str(svc.limiter.held[0]) == "203.0.113.9"
    say(proto, t, b"QUIT\r\n")
    assert svc.limiter.held == []


# -- count_hops and protocol_keyword --------------------------------------------------------------

@pytest.mark.parametrize("head, n", [
    (b"", 0),
    (b"Received: a\r\n", 1),
    (b"Received: a", 1),
    (b"Received: a\r\n\r\n", 1),
    (b"Received: a\r\nReceived: b\r\n\r\nReceived: c\r\n", 2),
    (b"received: a\r\nRECEIVED: b\r\nReCeIvEd: c\r\n\r\n", 3),
    (b"X-Received: a\r\nReceived-SPF: pass\r\n\r\n", 0),
    (b"Subject: Received: x\r\n\r\n", 0),
    (b"Subject: a\r\n Received: folded\r\n\tReceived: folded\r\n\r\n", 0),
    (b"Received: ours\r\n\r\nReceived: in the body\r\n", 1),  # client sent an empty header section
    (b"Subject: x\r\n\r\n\r\nReceived: body\r\n", 0),
    (b"Received: a\r\nReceived:b\r\n", 2),
    (b"Received: a\nReceived: b\n\n", 1),              # only CRLF separates lines
])
def test_count_hops(head, n):
    assert count_hops(head) == n


def _proto(esmtp=True, lmtp=False, tls=False, auth=None, utf8=False, txn=True):
    t = SimpleNamespace(params=SimpleNamespace(smtputf8=utf8)) if txn else None
    return SimpleNamespace(esmtp=esmtp, lmtp=lmtp, tls=tls, auth_user=auth, txn=t)


@pytest.mark.parametrize("kw, keyword", [
    (dict(esmtp=False), "SMTP"),
    (dict(esmtp=False, tls=True), "SMTP"),
    (dict(), "ESMTP"),
    (dict(tls=True), "ESMTPS"),
    (dict(auth="alice@example.com"), "ESMTPA"),
    (dict(tls=True, auth="alice@example.com"), "ESMTPSA"),
    (dict(utf8=True), "UTF8SMTP"),
    (dict(utf8=True, tls=True), "UTF8SMTPS"),
    (dict(utf8=True, tls=True, auth="a@b"), "UTF8SMTPSA"),
    (dict(utf8=True, txn=False), "ESMTP"),
    (dict(lmtp=True), "LMTP"),
    (dict(lmtp=True, tls=True), "LMTPS"),
    (dict(lmtp=True, utf8=True), "UTF8LMTP"),
    (dict(lmtp=True, utf8=True, tls=True, auth="a@b"), "UTF8LMTPSA"),
])
def test_protocol_keyword(kw, keyword):
    assert protocol_keyword(_proto(**kw)) == keyword


def test_protocol_keyword_from_a_live_session():
    svc, proto, t = start()
    assert protocol_keyword(proto) == "ESMTP"
    svc, proto, t = start(helo=b"HELO c.example\r\n")
    assert protocol_keyword(proto) == "SMTP"


# -- how a session ended, in Postfix's words ------------------------------------------

@pytest.fixture
def smtpd_lines(monkeypatch):
    """The text of every line the SMTP server and its handler log."""
    from mailsys.smtp import server

    events = []
    monkeypatch.setattr(receive.log._logger, "observer", events.append)
    monkeypatch.setattr(server.log._logger, "observer", events.append)
    return lambda: [e["text"] for e in events if "text" in e]


def ending(lines):
    """The lines after the connect line (the client name is the same throughout)."""
    return [line for line in lines if not line.startswith("connect from ")]


@pytest.mark.parametrize("sent,lost,stats", [
    (b"RCPT TO:<alice@example.com>\r\nDATA\r\nSubject: x\r\n\r\nabc\r\n", "DATA (19 bytes)",
     "rcpt=1 data=0/1"),
    (b"RCPT TO:<alice@example.com>\r\n", "RCPT", "rcpt=1"),
])
def test_a_connection_lost_says_after_what_and_counts_data_left_unanswered(smtpd_lines, sent, lost,
                                                                           stats):
    svc, proto, t = start()
    say(proto, t, sent)
    t.loseConnection()
    assert ending(smtpd_lines()) == [
        f"lost connection after {lost} from client.example.net[203.0.113.9]",
        f"disconnect from client.example.net[203.0.113.9] ehlo=1 mail=1 {stats}"]


def test_a_session_without_commands_ends_its_line_with_commands_0(smtpd_lines):
    svc, proto, t = connect()
    t.loseConnection()
    assert ending(smtpd_lines()) == [
        "lost connection after CONNECT from client.example.net[203.0.113.9]",
        "disconnect from client.example.net[203.0.113.9] commands=0/0"]


def test_quit_is_no_lost_connection(smtpd_lines):
    svc, proto, t = start()
    assert say(proto, t, b"QUIT\r\n").startswith(b"221 ")
    t.loseConnection()
    assert ending(smtpd_lines()) == ["disconnect from client.example.net[203.0.113.9] ehlo=1 mail=1 quit=1"]


def test_a_timeout_in_data_says_how_far_it_got(smtpd_lines):
    svc, proto, t = start()
    say(proto, t, b"RCPT TO:<alice@example.com>\r\nDATA\r\nSubject: x\r\n")
    svc.clock.advance(svc.config.limits.data_timeout + 1)
    assert take(t) == b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
    assert ending(smtpd_lines()) == [
        "timeout after DATA (12 bytes) from client.example.net[203.0.113.9]",
        "disconnect from client.example.net[203.0.113.9] ehlo=1 mail=1 rcpt=1 data=0/1"]


def test_too_many_errors_names_the_last_command(smtpd_lines):
    svc, proto, t = connect()
    for _ in range(20):
        if t.disconnecting:
            break
        proto.dataReceived(b"BOGUS\r\n")
    assert ending(smtpd_lines())[0] == "too many errors after UNKNOWN from client.example.net[203.0.113.9]"
