"""mailsys.smtp.server.SMTPServerProtocol on StringTransport and task.Clock.

Every expectation is the exact bytes on the wire.  The session tests feed one
script in every segmentation (all at once, every two-piece split, one byte at a
time, each command split on its own) and demand identical output and bodies.
"""
import pytest
from hypothesis import given, settings, strategies as st

from mailsys.smtp import server as server_mod
from mailsys.smtp.reply import Reply
from tests.helpers import FakeHandler, connect, feed, feed_bytewise, limits, lines, take

BANNER = b"220 mx.example.com ESMTP\r\n"
EHLO_REPLY = (b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n"
              b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 HELP\r\n")
HELO_REPLY = b"250 mx.example.com\r\n"
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as TESTID\r\n"
OK = b"250 2.0.0 Ok\r\n"
BYE = b"221 2.0.0 Bye\r\n"
UNKNOWN = b"500 5.5.2 Error: command not recognized\r\n"
TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
BAD_BYTES = b"500 5.5.2 Error: bad characters in command\r\n"
NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NESTED = b"503 5.5.1 Error: nested MAIL command\r\n"
NO_RCPT = b"554 5.5.1 Error: no valid recipients\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 mx.example.com Error: too many errors\r\n"
TOO_MANY_RCPTS = b"452 4.5.3 Error: too many recipients\r\n"
TIMEOUT = b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
TOO_BIG = b"552 5.3.4 Error: message file too big\r\n"
IO_ERROR = b"451 4.3.0 Error: local I/O error, try again later\r\n"
HELP = (b"214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n"
        b"214 2.0.0 See RFC 5321\r\n")
VRFY = b"252 2.0.0 Send mail to find out; the address is not verified\r\n"
EXPN = b"502 5.5.1 Error: command not implemented\r\n"


def session(data=b"", handler=None, **kw):
    proto, t, h, clock = connect(handler, **kw)
    assert take(t) == BANNER
    if data:
        proto.dataReceived(data)
    return proto, t, h, clock


def ehlo_session(**kw):
    proto, t, h, clock = session(b"EHLO client.example\r\n", **kw)
    out = take(t)
    assert out.startswith(b"250-mx.example.com\r\n250-PIPELINING\r\n") and out.endswith(b"250 HELP\r\n")
    return proto, t, h, clock


def closed(t, h):
    return t.connected is False and h.calls[-1] == ("disconnected",)


# -- greeting, EHLO, HELO ----------------------------------------------------------------

def test_banner():
    proto, t, h, clock = connect()
    assert t.value() == BANNER
    assert h.calls == [("connected",)]


def test_refused_at_connect():
    h = FakeHandler()
    h.answers["connected"] = Reply(421, "4.7.0", "mx.example.com Error: too many connections")
    proto, t, h, clock = connect(h)
    assert t.value() == b"421 4.7.0 mx.example.com Error: too many connections\r\n"
    assert closed(t, h)


def test_banner_waits_for_the_handler_and_early_talk_is_answered_after_it():
    h = FakeHandler()
    h.hold.add("connected")
    proto, t, h, clock = connect(h)
    proto.dataReceived(b"NOOP\r\n")
    assert t.value() == b""
    h.release("connected")
    assert t.value() == BANNER + OK


def test_ehlo_lists_exactly_the_extensions():
    proto, t, h, clock = session(b"EHLO client.example\r\n")
    assert t.value() == EHLO_REPLY
    assert h.calls[-1] == ("helo", "client.example", True)


def test_ehlo_advertises_the_configured_size():
    proto, t, h, clock = session(b"EHLO c.example\r\n", limits_=limits(message_size=1234))
    assert b"250-SIZE 1234\r\n" in t.value()


def test_ehlo_with_tls_and_auth_configured():
    proto, t, h, clock = session(b"EHLO c.example\r\n", tls_available=True, auth_mechanisms=("PLAIN",))
    # no AUTH before TLS, STARTTLS offered
    assert t.value() == (b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-STARTTLS\r\n"
                         b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n"
                         b"250 HELP\r\n")


def test_helo():
    proto, t, h, clock = session(b"HELO client.example\r\n")
    assert t.value() == HELO_REPLY
    assert h.calls[-1] == ("helo", "client.example", False)
    assert (proto.helo, proto.esmtp) == ("client.example", False)


@pytest.mark.parametrize("name", [b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"a-b.c_d.example",
                                  b"  spaced.example  ", b"x"])
def test_helo_names_accepted(name):
    proto, t, h, clock = session(b"HELO " + name + b"\r\n")
    assert t.value() == HELO_REPLY
    assert proto.helo == name.decode().strip()


def test_ehlo_and_helo_need_a_name():
    proto, t, h, clock = session(b"EHLO\r\nHELO \r\nEHLO   \r\n")
    assert t.value() == (b"501 5.5.4 Syntax: EHLO hostname\r\n501 5.5.4 Syntax: HELO hostname\r\n"
                         b"501 5.5.4 Syntax: EHLO hostname\r\n")
    assert proto.helo is None


def test_helo_refused_by_handler():
    h = FakeHandler()
    h.answers["helo"] = Reply(550, "5.7.1", "Go away")
    proto, t, h, clock = session(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n", h)
    assert t.value() == b"550 5.7.1 Go away\r\n" + NEED_HELO


def test_ehlo_resets_the_transaction():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nEHLO again.example\r\n"
                       b"RCPT TO:<c@d.example>\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + EHLO_REPLY + NEED_MAIL
    assert ("data_abort", None) in h.calls


# -- MAIL / RCPT / DATA --------------------------------------------------------------------

def test_one_transaction():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD
    take(t)
    proto.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert t.value() == QUEUED
    assert h.messages == [b"Subject: x\r\n\r\nbody\r\n"]
    assert h.calls[1:] == [("helo", "client.example", True), ("mail", "a@b.example", {}),
                           ("rcpt", "c@d.example", {}), ("data", ["c@d.example"]),
                           ("data_end", 20, ["c@d.example"])]
    assert proto.txn is None


def test_mail_with_params_reaches_the_handler():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME RET=FULL ENVID=x+2By\r\n"
                       b"RCPT TO:<c@d.example> NOTIFY=FAILURE ORCPT=rfc822;c@d.example\r\n")
    assert t.value() == SENDER_OK + RCPT_OK
    assert h.calls[-2:] == [
        ("mail", "a@b.example", {"size": 100, "body": "8BITMIME", "ret": "FULL", "envid": "x+y"}),
        ("rcpt", "c@d.example", {"notify": ["FAILURE"], "orcpt": ["rfc822", "c@d.example"]})]


def test_null_sender_and_bare_postmaster():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<>\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + b"501 5.1.3 Bad recipient address syntax\r\n"
    assert h.calls[-2:] == [("mail", "", {}), ("rcpt", "postmaster", {})]


def test_lower_case_commands_and_space_after_colon():
    proto, t, h, clock = session(b"ehlo c.example\r\nmail from: <a@b.example>\r\nrcpt to: <c@d.example>\r\n"
                                 b"noop\r\nrset\r\nquit\r\n")
    assert t.value() == EHLO_REPLY + SENDER_OK + RCPT_OK + OK + OK + BYE


def test_address_errors_have_the_side_code():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<a b@c.example>\r\nMAIL FROM:<us\xc3\xa9r@c.example>\r\n"
                       b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a b@c.example>\r\n"
                       b"RCPT TO:<us\xc3\xa9r@c.example>\r\n")
    assert t.value() == (b"501 5.1.7 Bad sender address syntax\r\n"
                         b"553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"
                         + SENDER_OK +
                         b"501 5.1.3 Bad recipient address syntax\r\n"
                         b"553 5.6.7 Non-ASCII recipient address requires SMTPUTF8\r\n")


def test_smtputf8_transaction():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived("MAIL FROM:<usér@c.example> SMTPUTF8\r\nRCPT TO:<用户@例子.广告>\r\n".encode())
    assert t.value() == SENDER_OK + RCPT_OK
    assert h.calls[-1] == ("rcpt", "用户@例子.广告", {})


def test_param_errors():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<a@b.example> SIZE=10485761\r\nMAIL FROM:<a@b.example> FOO=1\r\n"
                       b"MAIL FROM:<a@b.example> SIZE=1 SIZE=1\r\nMAIL FROM:<a@b.example> SIZE=10485760\r\n"
                       b"RCPT TO:<c@d.example> NOTIFY=BAD\r\nRCPT TO:<c@d.example> BAR\r\n")
    assert t.value() == (b"552 5.3.4 Message size exceeds fixed limit\r\n"
                         b"555 5.5.4 Unsupported option: FOO\r\n"
                         b"501 5.5.4 Duplicate parameter: SIZE\r\n" + SENDER_OK +
                         b"501 5.5.4 Bad NOTIFY parameter\r\n"
                         b"555 5.5.4 Unsupported option: BAR\r\n")


def test_params_need_ehlo():
    proto, t, h, clock = session(b"HELO c.example\r\nMAIL FROM:<a@b.example> SIZE=10\r\n"
                                 b"MAIL FROM:<a@b.example>\r\n")
    assert t.value() == HELO_REPLY + b"555 5.5.4 Error: parameters need EHLO\r\n" + SENDER_OK


def test_handler_refusals():
    h = FakeHandler()
    h.answers["mail"] = lambda sender, params: Reply(550, "5.7.1", "No") if sender == "bad@x.example" else None
    h.answers["rcpt"] = lambda rcpt, params: Reply(550, "5.1.1", f"<{rcpt}>: no") if rcpt.startswith("x") else None
    h.answers["data"] = Reply(451, "4.3.0", "Not now")
    proto, t, h, clock = session(b"EHLO c.example\r\n", h)
    take(t)
    proto.dataReceived(b"MAIL FROM:<bad@x.example>\r\nRCPT TO:<y@z.example>\r\nMAIL FROM:<ok@x.example>\r\n"
                       b"RCPT TO:<x@z.example>\r\nDATA\r\nRCPT TO:<y@z.example>\r\nDATA\r\n")
    assert t.value() == (b"550 5.7.1 No\r\n" + NEED_MAIL + SENDER_OK + b"550 5.1.1 <x@z.example>: no\r\n"
                         + NO_RCPT + RCPT_OK + b"451 4.3.0 Not now\r\n")
    assert proto.txn.recipients[0][0].local == "y" and len(proto.txn.recipients) == 1


def test_handler_positive_reply_text_is_used():
    h = FakeHandler()
    h.answers["mail"] = Reply(250, "2.1.0", "Sender fine")
    proto, t, h, clock = session(b"EHLO c.example\r\n", h)
    take(t)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert t.value() == b"250 2.1.0 Sender fine\r\n" + RCPT_OK


def test_data_end_reply_is_the_handlers():
    h = FakeHandler()
    h.answers["data_end"] = Reply(554, "5.7.1", "Spam")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD + b"554 5.7.1 Spam\r\n" + OK


def test_data_end_none_is_the_default_positive_reply():
    # The handler contract: None means "the default positive reply".
    h = FakeHandler()
    h.answers["data_end"] = None
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n")
    out = lines(t.value())
    assert out[:3] == [SENDER_OK, RCPT_OK, GO_AHEAD]
    assert len(out) == 4 and out[3].startswith(b"250 2.0.0 ")


def test_handler_failure_is_a_temporary_error():
    h = FakeHandler()
    h.hold.add("rcpt")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nNOOP\r\n")
    h.fail("rcpt")
    assert t.value() == SENDER_OK + IO_ERROR + OK
    assert proto.txn.recipients == []


def test_rset_noop_quit_help_vrfy_expn():
    proto, t, h, clock = session(b"NOOP\r\nNOOP anything\r\nRSET\r\nHELP\r\nHELP MAIL\r\nVRFY alice\r\n"
                                 b"VRFY <alice@example.com>\r\nEXPN staff\r\nQUIT\r\nNOOP\r\n")
    assert t.value() == OK + OK + OK + HELP + HELP + VRFY + VRFY + EXPN + BYE
    assert closed(t, h)


def test_rset_aborts_the_transaction():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRSET\r\nRCPT TO:<c@d.example>\r\n"
                       b"DATA\r\nMAIL FROM:<a@b.example>\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + OK + NEED_MAIL + NEED_MAIL + SENDER_OK
    assert h.calls.count(("data_abort", None)) == 1


def test_syntax_errors():
    proto, t, h, clock = ehlo_session()
    proto.dataReceived(b"MAIL\r\nMAIL TO:<a@b.example>\r\nMAIL FROM<a@b.example>\r\nRSET now\r\nVRFY\r\n"
                       b"MAIL FROM:<a@b.example>\r\nRCPT\r\nRCPT FROM:<c@d.example>\r\nDATA now\r\n")
    assert t.value() == (b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n" * 3 +
                         b"501 5.5.4 Syntax: RSET\r\n501 5.5.4 Syntax: VRFY address\r\n" + SENDER_OK +
                         b"501 5.5.4 Syntax: RCPT TO:<address>\r\n" * 2 + b"501 5.5.4 Syntax: DATA\r\n")


def test_sequence_errors():
    proto, t, h, clock = session(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                                 b"HELO c.example\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                                 b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n")
    assert t.value() == (NEED_HELO + NEED_MAIL + NEED_MAIL + HELO_REPLY + NEED_MAIL + NEED_MAIL +
                         SENDER_OK + NESTED + NO_RCPT)


@pytest.mark.parametrize("line", [b"FOO\r\n", b"\r\n", b"MAILFROM:<a@b.example>\r\n", b" NOOP\r\n",
                                  b"NOOP\t\r\n", b"LHLO c.example\r\n", b"NOOP\r\r\n", b"NO\xc3\xa9OP\r\n",
                                  b"XEXPS\r\n"])
def test_unknown_commands(line):
    proto, t, h, clock = session(line)
    assert t.value() == UNKNOWN


@pytest.mark.parametrize("line", [b"NOOP \xff\r\n", b"\xff\r\n", "NOOP é\r\n".encode(),
                                  "EHLO é.example\r\n".encode(), b"MAIL FROM:<\xff@b.example>\r\n"])
def test_bad_bytes_in_commands(line):
    proto, t, h, clock = session(line)
    assert t.value() == BAD_BYTES


def test_starttls_and_auth_when_not_configured():
    proto, t, h, clock = session(b"EHLO c.example\r\nSTARTTLS\r\nAUTH PLAIN\r\nNOOP\r\n")
    assert t.value() == (EHLO_REPLY + b"502 5.5.1 Error: command not implemented\r\n"
                         b"503 5.5.1 Error: authentication not enabled\r\n" + OK)


def test_lf_alone_ends_a_command_line():
    proto, t, h, clock = session(b"NOOP\nNOOP\r\n")
    assert t.value() == OK + OK


# -- line length -------------------------------------------------------------------------

def test_line_of_2048_bytes_accepted_2049_refused():
    ok_line = b"NOOP " + b"A" * (2048 - 7) + b"\r\n"
    long_line = b"NOOP " + b"A" * (2049 - 7) + b"\r\n"
    assert len(ok_line) == 2048 and len(long_line) == 2049
    for segments in ([ok_line + long_line + b"NOOP\r\n"],
                     [ok_line[i:i + 1] for i in range(len(ok_line))] +
                     [long_line[i:i + 1] for i in range(len(long_line))] + [b"NOOP\r\n"]):
        proto, t, h, clock = session()
        for s in segments:
            proto.dataReceived(s)
        assert t.value() == OK + TOO_LONG + OK


@pytest.mark.parametrize("tail", [b"\rQUIT\r", b" QUIT", b"\rQUIT\r\rQUIT", b"\x00QUIT\r"])
def test_over_long_line_answered_once_and_its_tail_never_executed(tail):
    # Everything up to the first LF is one line, whatever it looks like.
    script = b"NOOP " + b"X" * 2100 + tail + b"\nNOOP\r\n"
    expected = TOO_LONG + OK
    proto, t, h, clock = session(script)
    assert t.value() == expected
    assert t.connected
    proto, t, h, clock = session()
    feed_bytewise(proto, script)
    assert t.value() == expected
    for cut in range(1, len(script)):
        proto, t, h, clock = session()
        feed(proto, script, cut)
        assert t.value() == expected, cut


def test_over_long_line_then_lf_in_next_segment():
    proto, t, h, clock = session(b"X" * 5000)
    assert t.value() == b""
    proto.dataReceived(b"Y" * 5000)
    proto.dataReceived(b"\nQUIT\r\n")
    assert t.value() == TOO_LONG + BYE


# -- limits ----------------------------------------------------------------------------------

def test_recipient_limit():
    proto, t, h, clock = ehlo_session(limits_=limits(recipients=2))
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<r1@d.example>\r\nRCPT TO:<r2@d.example>\r\n"
                       b"RCPT TO:<r3@d.example>\r\nRCPT TO:<r4@d.example>\r\nDATA\r\nx\r\n.\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + RCPT_OK + TOO_MANY_RCPTS + TOO_MANY_RCPTS + GO_AHEAD + QUEUED
    assert [c for c in h.calls if c[0] == "rcpt"] == [("rcpt", "r1@d.example", {}), ("rcpt", "r2@d.example", {})]
    assert h.calls[-1] == ("data_end", 3, ["r1@d.example", "r2@d.example"])


def test_refused_recipients_do_not_count_towards_the_limit():
    h = FakeHandler()
    h.answers["rcpt"] = lambda rcpt, params: Reply(550, "5.1.1", "no") if rcpt.startswith("x") else None
    proto, t, h, clock = ehlo_session(handler=h, limits_=limits(recipients=1))
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\nRCPT TO:<r@d.example>\r\n"
                       b"RCPT TO:<s@d.example>\r\n")
    assert t.value() == SENDER_OK + b"550 5.1.1 no\r\n" + RCPT_OK + TOO_MANY_RCPTS


def test_error_budget():
    proto, t, h, clock = session(b"BOGUS\r\n" * 9 + b"NOOP\r\n")
    assert t.value() == UNKNOWN * 9 + OK
    assert t.connected
    proto.dataReceived(b"BOGUS\r\nNOOP\r\nQUIT\r\n")
    assert t.value() == UNKNOWN * 9 + OK + UNKNOWN + TOO_MANY_ERRORS
    assert closed(t, h)


def test_error_budget_counts_mixed_errors():
    proto, t, h, clock = session(b"MAIL FROM:<a@b.example>\r\nEHLO\r\nFOO\r\nEXPN x\r\nNOOP " + b"x" * 3000 +
                                 b"\r\n" + b"VRFY\r\n" + b"RCPT TO:<a@b.example>\r\n" * 4 + b"NOOP\r\n")
    assert t.value() == (NEED_HELO + b"501 5.5.4 Syntax: EHLO hostname\r\n" + UNKNOWN + EXPN + TOO_LONG +
                         b"501 5.5.4 Syntax: VRFY address\r\n" + NEED_MAIL * 4 + TOO_MANY_ERRORS)
    assert closed(t, h)


def test_message_size_limit_then_next_transaction():
    proto, t, h, clock = ehlo_session(limits_=limits(message_size=100))
    take(t)
    body_ok = b"a" * 98 + b"\r\n"          # exactly 100 bytes
    body_big = b"a" * 99 + b"\r\n"         # 101 bytes
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" + body_big + b".\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD + TOO_BIG
    assert h.calls[-1] == ("data_abort", TOO_BIG)
    take(t)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" + body_ok + b".\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED
    assert h.messages == [body_ok]
    assert h.calls[-1] == ("data_end", 100, ["c@d.example"])


def test_message_size_limit_reads_to_the_real_end():
    proto, t, h, clock = ehlo_session(limits_=limits(message_size=10))
    take(t)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    take(t)
    for i in range(100):
        proto.dataReceived(b"QUIT\r\nline %d\r\n" % i)
    assert t.value() == b""
    proto.dataReceived(b".\r\nNOOP\r\n")
    assert t.value() == TOO_BIG + OK
    assert t.connected


# -- timeouts ------------------------------------------------------------------------------

def test_command_timeout():
    proto, t, h, clock = session()
    clock.advance(299.9)
    assert t.value() == b"" and t.connected
    clock.advance(0.1)
    assert t.value() == TIMEOUT
    assert closed(t, h)


def test_complete_commands_move_the_deadline():
    proto, t, h, clock = session()
    clock.advance(299)
    proto.dataReceived(b"NOOP\r\n")
    clock.advance(299.9)
    assert t.value() == OK and t.connected
    clock.advance(0.1)
    assert t.value() == OK + TIMEOUT
    assert closed(t, h)


def test_trickling_an_incomplete_command_does_not_extend_the_timeout():
    proto, t, h, clock = session()
    for c in b"NOOP":
        clock.advance(299 if c == ord("N") else 0.5)
        proto.dataReceived(bytes([c]))
    clock.advance(298)   # t = 598.5 when the timer fired long ago
    assert t.value() == TIMEOUT
    proto2, t2, h2, clock2 = session()
    clock2.advance(299)
    proto2.dataReceived(b"N")
    clock2.advance(1)
    assert t2.value() == TIMEOUT
    assert closed(t2, h2)


def test_no_timeout_while_a_reply_is_owed_to_the_client():
    # A commit in progress is our slowness, not the client's: closing would make
    # it resend a message that may already be queued.
    h = FakeHandler()
    h.hold.add("mail")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    clock.advance(300)
    assert t.value() == b"" and t.connected
    h.release("mail")
    assert t.value() == SENDER_OK
    take(t)
    clock.advance(299)
    assert t.value() == b""
    clock.advance(1)
    assert t.value() == TIMEOUT


def test_handler_stuck_for_a_further_timeout_is_given_up():
    h = FakeHandler()
    h.hold.add("mail")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    clock.pump([1] * 599)
    assert t.value() == b"" and t.connected
    clock.pump([1] * 2)
    assert t.value() == TIMEOUT and not t.connected
    h.release("mail")
    assert t.value() == TIMEOUT


def _in_data(**kw):
    proto, t, h, clock = ehlo_session(**kw)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD
    take(t)
    return proto, t, h, clock


def test_data_timeout_total_not_reset_by_trickling():
    """A trickle earns one second per MIN_DATA_RATE bytes, no more: twelve bytes in
    598 s move the 600 s deadline by 12/1024 s."""
    proto, t, h, clock = _in_data(limits_=limits(command_timeout=300, data_timeout=600))
    for i in range(2):
        clock.advance(299)
        proto.dataReceived(b"line\r\n")
    clock.advance(1)                 # t = 599
    assert t.value() == b"" and t.connected
    clock.advance(1)                 # t = 600
    assert t.value() == b"" and t.connected
    clock.advance(12 / server_mod.MIN_DATA_RATE)
    assert t.value() == TIMEOUT
    assert closed(t, h)
    assert ("data_abort", None) in h.calls


def test_data_timeout_shorter_than_command_timeout():
    proto, t, h, clock = _in_data(limits_=limits(command_timeout=300, data_timeout=100))
    clock.advance(99)
    proto.dataReceived(b"x")
    assert t.value() == b""
    clock.advance(1 + 1 / server_mod.MIN_DATA_RATE)   # the DATA deadline, plus one byte's credit
    assert t.value() == TIMEOUT


def test_slow_big_message_is_not_cut_off():
    """2 KiB a second for 1,000 s (past data_timeout): the data earns its time."""
    proto, t, h, clock = _in_data(limits_=limits(command_timeout=300, data_timeout=600))
    line = b"x" * 2046 + b"\r\n"
    for i in range(1000):
        clock.advance(1)
        proto.dataReceived(line)
    assert t.value() == b"" and t.connected
    proto.dataReceived(b".\r\n")
    assert t.value().startswith(b"250 ")
    assert t.connected


def test_below_the_minimum_rate_is_cut_off_when_the_time_is_used_up():
    """Half the minimum rate: cut off once 600 s plus the earned time have passed,
    not before: 1,198 half-rate seconds of data earn 599 s, so the end is at 1,199 s."""
    proto, t, h, clock = _in_data(limits_=limits(command_timeout=300, data_timeout=600))
    half = b"y" * (server_mod.MIN_DATA_RATE // 2 - 2) + b"\r\n"
    for i in range(1198):
        clock.advance(1)
        proto.dataReceived(half)
    clock.advance(0.999)
    assert t.value() == b"" and t.connected
    clock.advance(0.001)             # t = 1199
    assert t.value() == TIMEOUT


def test_a_pause_longer_than_data_timeout_is_cut_off_whatever_was_earned():
    proto, t, h, clock = _in_data(limits_=limits(command_timeout=300, data_timeout=600))
    proto.dataReceived(b"z" * 1022 + b"\r\n" * 5000)   # a lot of credit at once
    clock.advance(599)
    assert t.value() == b"" and t.connected
    clock.advance(1)                 # 600 s without a byte
    assert t.value() == TIMEOUT


def test_command_timeout_again_after_data():
    proto, t, h, clock = _in_data(limits_=limits(command_timeout=300, data_timeout=600))
    clock.advance(500)
    proto.dataReceived(b"x\r\n.\r\n")
    assert t.value() == QUEUED
    clock.advance(299)
    assert t.connected
    clock.advance(1)
    assert t.value() == QUEUED + TIMEOUT


# -- pipelining and handler Deferreds -------------------------------------------------------

def test_pending_handler_delays_later_replies_which_come_in_order():
    h = FakeHandler()
    h.hold.update({"mail", "rcpt"})
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\n"
                       b"NOOP\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n")
    assert t.value() == b""
    assert [c[0] for c in h.calls[2:]] == ["mail"]
    h.release("mail")
    assert t.value() == SENDER_OK
    assert [c[0] for c in h.calls[2:]] == ["mail", "rcpt"]
    h.release("rcpt")
    assert t.value() == SENDER_OK + RCPT_OK
    h.release("rcpt", Reply(450, "4.2.0", "Later"))
    assert t.value() == SENDER_OK + RCPT_OK + b"450 4.2.0 Later\r\n" + OK + GO_AHEAD + QUEUED + BYE
    assert h.messages == [b"body\r\n"]


def test_pending_data_end_holds_the_next_commands():
    h = FakeHandler()
    h.hold.add("data_end")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"
                       b"MAIL FROM:<f@b.example>\r\nQUIT\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD
    assert h.calls[-1][0] == "data_end"
    h.release("data_end")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED + SENDER_OK + BYE


def test_pending_data_holds_the_body():
    h = FakeHandler()
    h.hold.add("data")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nbody\r\n.\r\nNOOP\r\n")
    assert t.value() == SENDER_OK + RCPT_OK
    assert h.body == b""
    h.release("data")
    assert t.value() == SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED + OK
    assert h.messages == [b"body\r\n"]


def test_refused_data_does_not_start_data_mode():
    h = FakeHandler()
    h.answers["data"] = Reply(554, "5.7.1", "No")
    proto, t, h, clock = ehlo_session(handler=h)
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nNOOP\r\n")
    assert t.value() == SENDER_OK + RCPT_OK + b"554 5.7.1 No\r\n" + OK


def test_disconnect_mid_transaction_aborts():
    proto, t, h, clock = _in_data()
    proto.dataReceived(b"partial body")
    t.loseConnection()
    assert h.calls[-2:] == [("data_abort", None), ("disconnected",)]


# -- the byte-split session -----------------------------------------------------------------

COMMANDS = [
    b"EHLO client.example\r\n",
    b"MAIL FROM:<sender@client.example> SIZE=300 BODY=8BITMIME RET=HDRS ENVID=qid+2B1\r\n",
    b"RCPT TO:<alice@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.com\r\n",
    b"RCPT TO:<nobody@example.com>\r\n",
    b"RCPT TO:<\"bob smith\"@example.com>\r\n",
    b"DATA\r\n",
    b"Subject: split test\r\n\r\n..leading dot\r\nplain line\r\n...\r\n\r\n.x\r\n",
    b".\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b"second message\r\n..\r\n",
    b".\r\n",
    b"QUIT\r\n",
]
SCRIPT = b"".join(COMMANDS)
EXPECTED_OUTPUT = (BANNER + EHLO_REPLY + SENDER_OK + RCPT_OK +
                   b"550 5.1.1 <nobody@example.com>: User unknown\r\n" + RCPT_OK + GO_AHEAD + QUEUED +
                   OK + OK + SENDER_OK + RCPT_OK + GO_AHEAD + QUEUED + BYE)
# ".x" is the one line a client should have stuffed but did not: assert on bodies
# that do not depend on how the server treats it (see test_smtp_data).
BODY_1_PREFIX = b"Subject: split test\r\n\r\n.leading dot\r\nplain line\r\n..\r\n\r\n"
BODY_2 = b"second message\r\n.\r\n"


def _split_handler():
    h = FakeHandler()
    h.answers["rcpt"] = lambda rcpt, params: (
        Reply(550, "5.1.1", f"<{rcpt}>: User unknown") if rcpt.startswith("nobody") else None)
    return h


def run_session(segments):
    h = _split_handler()
    proto, t, h, clock = connect(h)
    for s in segments:
        proto.dataReceived(s)
    return t.value(), h.messages, h.calls


def _check(result, reference):
    out, messages, calls = result
    assert out == EXPECTED_OUTPUT
    assert messages == reference[1]
    assert calls == reference[2]


@pytest.fixture(scope="module")
def reference():
    result = run_session([SCRIPT])
    out, messages, calls = result
    assert out == EXPECTED_OUTPUT
    assert len(messages) == 2
    assert messages[0].startswith(BODY_1_PREFIX)
    assert messages[1] == BODY_2
    assert [c[0] for c in calls] == ["connected", "helo", "mail", "rcpt", "rcpt", "rcpt", "data",
                                     "data_end", "mail", "rcpt", "data", "data_end", "disconnected"]
    assert calls[7] == ("data_end", len(messages[0]), ["alice@example.com", '"bob smith"@example.com'])
    return result


def test_session_all_at_once(reference):
    _check(run_session([SCRIPT]), reference)


def test_session_one_command_per_segment(reference):
    _check(run_session(COMMANDS), reference)


def test_session_split_at_every_byte_boundary(reference):
    for cut in range(1, len(SCRIPT)):
        _check(run_session([SCRIPT[:cut], SCRIPT[cut:]]), reference)


def test_session_one_byte_at_a_time(reference):
    _check(run_session([SCRIPT[i:i + 1] for i in range(len(SCRIPT))]), reference)


@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_session_each_command_split_at_every_byte(reference, index):
    command = COMMANDS[index]
    for cut in range(1, len(command)):
        segments = COMMANDS[:index] + [command[:cut], command[cut:]] + COMMANDS[index + 1:]
        _check(run_session(segments), reference)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, len(SCRIPT) - 1), max_size=40))
def test_session_any_segmentation(cuts):
    ref = run_session([SCRIPT])
    cuts = sorted(set(cuts))
    segments, last = [], 0
    for c in cuts + [len(SCRIPT)]:
        segments.append(SCRIPT[last:c])
        last = c
    _check(run_session(segments), ref)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, len(SCRIPT) - 1), max_size=20))
def test_session_any_segmentation_with_slow_handler(cuts):
    """Same session while every handler answer is a Deferred fired after each segment."""
    cuts = sorted(set(cuts))
    h = _split_handler()
    h.hold.update({"helo", "mail", "rcpt", "data", "data_end"})
    proto, t, h, clock = connect(h)
    last = 0
    for c in cuts + [len(SCRIPT)]:
        proto.dataReceived(SCRIPT[last:c])
        last = c
        while h.held:
            h.release()
    assert t.value() == EXPECTED_OUTPUT
    assert h.messages[1] == BODY_2 and h.messages[0].startswith(BODY_1_PREFIX)


# -- ETRN (RFC 1985), offered on the mta role only ----------------------------------------

ETRN_SCRIPT = (b"ETRN example.net\r\nEHLO client.example\r\nETRN\r\nETRN #q\r\nETRN @Sub.Example.NET\r\n"
               b"MAIL FROM:<a@b.example>\r\nETRN example.net\r\nRSET\r\nETRN a..b\r\n")
ETRN_REPLIES = [
    b"503 5.5.1 Error: send HELO/EHLO first",
    None,
    b"501 5.5.4 Syntax: ETRN domain",
    b"458 4.3.0 Unable to queue messages for node #q: queue names are not supported",
    b"250 2.0.0 Queuing for node sub.example.net started",
    SENDER_OK.rstrip(),
    b"503 5.5.1 Error: ETRN is not allowed within a mail transaction",
    OK.rstrip(),
    b"501 5.5.4 Syntax: ETRN domain (a domain name)",
]


@pytest.mark.parametrize("split", [None, 1, 7])
def test_etrn_replies_and_the_handler_sees_only_valid_requests(split):
    proto, t, h, clock = session(etrn=True)
    if split is None:
        proto.dataReceived(ETRN_SCRIPT)
    else:
        for i in range(0, len(ETRN_SCRIPT), split):
            proto.dataReceived(ETRN_SCRIPT[i:i + split])
    out = take(t).split(b"\r\n")
    ehlo_end = out.index(b"250 HELP")
    assert b"250-ETRN" in out[:ehlo_end]
    replies = out[:1] + out[ehlo_end + 1:-1]
    assert replies == [r for r in ETRN_REPLIES if r is not None]
    assert [c for c in h.calls if c[0] == "etrn"] == [("etrn", "sub.example.net")]


def test_etrn_refused_by_the_handler_and_absent_elsewhere():
    h = FakeHandler()
    h.answers["etrn"] = Reply(459, "4.7.1", "<example.net>: Node not allowed: client not in "
                                            "relay.mynetworks")
    proto, t, h, clock = session(b"HELO c\r\nETRN example.net\r\n", handler=h, etrn=True)
    assert take(t) == HELO_REPLY + (b"459 4.7.1 <example.net>: Node not allowed: client not in "
                                    b"relay.mynetworks\r\n")
    proto, t, h, clock = session(b"EHLO c\r\nETRN example.net\r\n")
    out = take(t)
    assert b"ETRN" not in out.split(b"250 HELP\r\n")[0]
    assert out.endswith(b"502 5.5.1 ETRN is not offered on this port\r\n")
    assert [c for c in h.calls if c[0] == "etrn"] == []
