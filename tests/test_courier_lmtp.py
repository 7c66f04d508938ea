"""The LMTP courier without a network: the client protocol on StringTransport with a
task.Clock and scripted server replies, the courier on MemoryReactorClock, and the
client talking to our own LMTP server protocol in memory."""
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure

from mailsys.accounts import Expansion, User
from mailsys.couriers import lmtp as courier_module
from mailsys.couriers.lmtp import (LMTPClientProtocol, LMTPCourier, ProtocolError, ReplyParser,
                                   client_endpoint_for, parse_reply, stuffed_chunks)
from mailsys.delivery import Delivered, PermFail, TempFail, lmtp_action
from mailsys.mda.lmtp import MDA, LMTPFactory
from mailsys.mda.memory import MemoryStore
from mailsys.smtp.data import DataReader
from mailsys.smtp.reply import Reply

HOST = "queue.example.org"
MSG = b"From: a@example.org\r\nSubject: test\r\n\r\nhello\r\n.dot line\r\n"
STUFFED = b"From: a@example.org\r\nSubject: test\r\n\r\nhello\r\n..dot line\r\n.\r\n"

GREETING = b"220 mda.example.com LMTP\r\n"
LHLO_FULL = (b"250-mda.example.com\r\n250-PIPELINING\r\n250-SIZE 10000\r\n"
             b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 HELP\r\n")
LHLO_PLAIN = b"250-mda.example.com\r\n250 ENHANCEDSTATUSCODES\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
START = b"354 End data with <CR><LF>.<CR><LF>\r\n"
DELIVERED = b"250 2.0.0 Ok: delivered\r\n"
BYE = b"221 2.0.0 Bye\r\n"


# --- helpers ------------------------------------------------------------------------------

def rcpts(*addresses):
    return [(a, {}) for a in addresses]


def start(recipients=("joe@example.com", "ann@example.com"), message=MSG, params=None,
          sender="alice@example.org", timeout=300):
    clock = task.Clock()
    proto = LMTPClientProtocol(HOST, sender, rcpts(*recipients), message, params, clock=clock,
                               timeout=timeout)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    results = []
    proto.result.addCallback(results.append)
    return SimpleNamespace(proto=proto, t=t, clock=clock, results=results)


def server(s, data):
    """The server sends ``data``; what the client wrote in answer (and the producer pumped)."""
    s.t.clear()
    s.proto.dataReceived(data)
    pump(s.t)
    return s.t.value()


def pump(t):
    while t.producer is not None:
        t.producer.resumeProducing()


def feed_cut(proto, data, cuts):
    last = 0
    for cut in list(cuts) + [len(data)]:
        if cut > last:
            proto.dataReceived(data[last:cut])
        last = max(last, cut)


def outcome(s):
    assert len(s.results) == 1, s.results
    return s.results[0]


def reference_unstuff(wire):
    """Per-line reference: the message a server gets from the bytes after 354, and
    whether the terminator came only at the very end."""
    lines = wire.split(b"\r\n")
    assert lines[-1] == b""
    out = []
    for idx, line in enumerate(lines):
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b".") else line)
    else:
        raise AssertionError("no terminator")
    return b"".join(x + b"\r\n" for x in out), idx == len(lines) - 2


def server_reader_unstuff(wire):
    """The same through our server's DataReader (an independent implementation)."""
    got = []
    reader = DataReader(got.append)
    rest = reader.feed(wire)
    assert rest == b""
    return b"".join(got)


def expected_body(message):
    return message if message == b"" or message.endswith(b"\r\n") else message + b"\r\n"


# --- replies ------------------------------------------------------------------------------

def test_parser_single_multi_and_bare_code():
    p = ReplyParser()
    got = p.feed(b"250 2.1.0 Ok\r\n450-4.2.0 mailbox busy\r\n450 4.2.0 try later\r\n250\r\n")
    assert got == [(250, ["2.1.0 Ok"]), (450, ["4.2.0 mailbox busy", "4.2.0 try later"]), (250, [""])]
    assert parse_reply(450, ["4.2.0 mailbox busy", "4.2.0 try later"]) == Reply(
        450, "4.2.0", "mailbox busy", "try later")
    assert parse_reply(450, ["4.2.0 mailbox busy", "4.2.0 try later"]).text == "mailbox busy try later"
    # Status only when it has the reply's class; otherwise it is text.
    assert parse_reply(250, ["5.1.1 odd"]) == Reply(250, "", "5.1.1 odd")
    assert parse_reply(554, ["no service"]) == Reply(554, "", "no service")
    assert parse_reply(250, [""]) == Reply(250, "", "")


def test_parser_is_independent_of_segmentation():
    data = (b"220 mda LMTP\r\n" + LHLO_FULL + b"250 2.1.0 Ok\r\n550-5.1.1 <x@y>: first\r\n"
            b"550 5.1.1 second\r\n" + START + DELIVERED)
    whole = ReplyParser().feed(data)
    assert len(whole) == 6
    p = ReplyParser()
    bytewise = [r for i in range(len(data)) for r in p.feed(data[i:i + 1])]
    assert bytewise == whole
    # A bare LF ends a line too.
    assert ReplyParser().feed(b"250 Ok\n") == [(250, ["Ok"])]


@pytest.mark.parametrize("data, what", [
    (b"hello\r\n", "malformed"),
    (b"25 x\r\n", "malformed"),
    (b"250x\r\n", "malformed"),
    (b"150 x\r\n", "malformed"),
    (b"650 x\r\n", "malformed"),
    (b"250-a\r\n251 b\r\n", "code changed"),
    (b"250 " + b"x" * 5000 + b"\r\n", "longer than"),
    (b"250 " + b"x" * 5000, "longer than"),
    (b"250-x\r\n" * 300, "more than"),
])
def test_parser_errors(data, what):
    got = ReplyParser().feed(data)
    assert isinstance(got[-1], ProtocolError) and what in str(got[-1])


def test_parser_keeps_replies_before_an_error_and_then_stops():
    p = ReplyParser()
    got = p.feed(b"250 2.0.0 delivered\r\ngarbage\r\n")
    assert got[0] == (250, ["2.0.0 delivered"]) and isinstance(got[1], ProtocolError)
    assert p.feed(b"250 ok\r\n") == []


def test_line_of_exactly_the_limit_is_fine():
    line = b"250 " + b"x" * (courier_module.MAX_LINE - 6) + b"\r\n"
    assert len(line) == courier_module.MAX_LINE
    p = ReplyParser()
    assert p.feed(line[:-1]) == []
    assert p.feed(line[-1:]) == [(250, ["x" * (courier_module.MAX_LINE - 6)])]


# --- a whole session ------------------------------------------------------------------------

def test_pipelined_session_step_by_step():
    s = start()
    assert s.t.value() == b""
    assert server(s, GREETING) == b"LHLO queue.example.org\r\n"
    # RFC 2920: MAIL, the RCPTs and DATA in one group; only the message waits for 354.
    assert server(s, LHLO_FULL) == (b"MAIL FROM:<alice@example.org> SIZE=%d\r\n"
                                    b"RCPT TO:<joe@example.com>\r\nRCPT TO:<ann@example.com>\r\n"
                                    b"DATA\r\n" % len(MSG))
    assert server(s, MAIL_OK) == b""
    assert server(s, RCPT_OK) == b""
    assert server(s, RCPT_OK) == b""
    assert server(s, START) == STUFFED
    assert server(s, DELIVERED) == b""
    assert s.results == []
    assert server(s, b"250 2.0.0 Ok: delivered too\r\n") == b"QUIT\r\n"
    assert outcome(s) == [Delivered(Reply(250, "2.0.0", "Ok: delivered")),
                          Delivered(Reply(250, "2.0.0", "Ok: delivered too"))]
    assert s.t.connected
    server(s, BYE)
    assert not s.t.connected
    assert s.proto.closed.called


def test_our_mdas_words_give_the_notice_action():
    """mailsys.mda.lmtp answers an alias of several addresses "expanded to N",
    an alias of one outside address "queued as"; the success notice's Action
    follows (RFC 3461 6.2.7.3, RFC 3464 2.3.3)."""
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    for reply in (MAIL_OK, RCPT_OK, RCPT_OK, START):
        server(s, reply)
    server(s, b"250 2.0.0 Ok: expanded to 3 recipients\r\n250 2.0.0 Ok: queued as 1A2B\r\n")
    first, second = outcome(s)
    assert (first.action, second.action) == ("expanded", "relayed")
    assert lmtp_action(Reply(250, "2.0.0", "Ok: delivered")) == "delivered"
    assert lmtp_action(Reply(250, "2.0.0", "Ok: already delivered")) == "delivered"
    assert lmtp_action(Reply(250, "2.0.0", "Saved")) == "delivered"


FULL_SCRIPT = GREETING + LHLO_FULL + MAIL_OK + RCPT_OK + RCPT_OK + START + DELIVERED + \
    b"251-2.0.0 multi\r\n251 2.0.0 line\r\n" + BYE
FULL_CLIENT = (b"LHLO queue.example.org\r\nMAIL FROM:<alice@example.org> SIZE=%d\r\n"
               b"RCPT TO:<joe@example.com>\r\nRCPT TO:<ann@example.com>\r\nDATA\r\n" % len(MSG)
               + STUFFED + b"QUIT\r\n")
FULL_OUTCOME = [Delivered(Reply(250, "2.0.0", "Ok: delivered")),
                Delivered(Reply(251, "2.0.0", "multi", "line"))]


def test_whole_conversation_in_one_segment():
    s = start()
    s.proto.dataReceived(FULL_SCRIPT)
    assert s.t.value() == FULL_CLIENT
    assert outcome(s) == FULL_OUTCOME
    assert not s.t.connected


def test_whole_conversation_split_at_every_byte():
    s = start()
    feed_cut(s.proto, FULL_SCRIPT, range(1, len(FULL_SCRIPT)))
    assert s.t.value() == FULL_CLIENT
    assert outcome(s) == FULL_OUTCOME


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(FULL_SCRIPT) - 1), max_size=12))
def test_whole_conversation_any_segmentation(cuts):
    s = start()
    feed_cut(s.proto, FULL_SCRIPT, sorted(cuts))
    assert s.t.value() == FULL_CLIENT
    assert outcome(s) == FULL_OUTCOME


def test_without_pipelining_commands_wait_for_replies():
    s = start()
    server(s, GREETING)
    assert server(s, LHLO_PLAIN) == b"MAIL FROM:<alice@example.org>\r\n"
    assert server(s, MAIL_OK) == b"RCPT TO:<joe@example.com>\r\n"
    assert server(s, RCPT_OK) == b"RCPT TO:<ann@example.com>\r\n"
    assert server(s, RCPT_OK) == b"DATA\r\n"
    assert server(s, START) == STUFFED
    assert server(s, DELIVERED + DELIVERED) == b"QUIT\r\n"
    assert outcome(s) == [Delivered(Reply(250, "2.0.0", "Ok: delivered"))] * 2


def test_null_sender():
    s = start(sender="")
    server(s, GREETING)
    assert server(s, LHLO_PLAIN) == b"MAIL FROM:<>\r\n"


def test_rcpt_rejections_get_their_own_outcomes_in_order():
    s = start(["nobody@example.com", "busy@example.com", "joe@example.com"])
    server(s, GREETING)
    server(s, LHLO_FULL)
    out = server(s, MAIL_OK + b"550 5.1.1 <nobody@example.com>: User unknown\r\n"
                 b"452 4.2.2 <busy@example.com>: over quota\r\n" + RCPT_OK)
    assert out == b""                               # DATA went with the RCPTs
    assert server(s, START) == STUFFED
    assert server(s, DELIVERED) == b"QUIT\r\n"      # one final reply: one accepted RCPT
    assert outcome(s) == [PermFail(Reply(550, "5.1.1", "<nobody@example.com>: User unknown")),
                          TempFail(Reply(452, "4.2.2", "<busy@example.com>: over quota")),
                          Delivered(Reply(250, "2.0.0", "Ok: delivered"))]


def test_every_rcpt_rejected_means_no_message():
    s = start()
    server(s, GREETING)
    assert server(s, LHLO_FULL).endswith(b"DATA\r\n")
    out = server(s, MAIL_OK + b"550 5.1.1 no\r\n550 5.1.1 nor you\r\n")
    assert out == b""
    # The pipelined DATA is refused (RFC 2920 3.1): no message, the session ends.
    out = server(s, b"554 5.5.1 Error: no valid recipients\r\n")
    assert out == b"QUIT\r\n"
    assert outcome(s) == [PermFail(Reply(550, "5.1.1", "no")), PermFail(Reply(550, "5.1.1", "nor you"))]


def test_every_rcpt_rejected_yet_data_accepted_drops_the_connection():
    """A server that says 354 with no accepted recipient would wait for a message
    that has no final reply to end it: the client hangs up, the refusals stand."""
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    out = server(s, MAIL_OK + b"550 5.1.1 no\r\n550 5.1.1 nor you\r\n" + START)
    assert out == b"" and not s.t.connected
    assert outcome(s) == [PermFail(Reply(550, "5.1.1", "no")), PermFail(Reply(550, "5.1.1", "nor you"))]


@pytest.mark.parametrize("code, status, cls", [(554, "5.5.1", PermFail), (451, "4.3.0", TempFail)])
def test_data_refused_fails_the_accepted_recipients(code, status, cls):
    s = start(["joe@example.com", "nobody@example.com", "ann@example.com"])
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + b"550 5.1.1 unknown\r\n" + RCPT_OK)
    out = server(s, f"{code} {status} no thanks\r\n".encode())
    assert out == b"QUIT\r\n"
    refusal = cls(Reply(code, status, "no thanks"))
    assert outcome(s) == [refusal, PermFail(Reply(550, "5.1.1", "unknown")), refusal]


def test_data_answered_250_is_a_protocol_error():
    s = start(["joe@example.com"])
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK)
    server(s, b"250 2.0.0 huh\r\n")
    (o,) = outcome(s)
    assert isinstance(o, TempFail) and o.reply.code == 451 and "unexpected reply" in o.reply.text


def test_temporary_failure_at_the_final_reply_for_one_of_two():
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + RCPT_OK)
    server(s, START)
    out = server(s, DELIVERED + b"452-4.3.1 <ann@example.com>: Insufficient\r\n452 4.3.1 storage\r\n")
    assert out == b"QUIT\r\n"
    assert outcome(s) == [Delivered(Reply(250, "2.0.0", "Ok: delivered")),
                          TempFail(Reply(452, "4.3.1", "<ann@example.com>: Insufficient", "storage"))]


def test_permanent_failure_at_the_final_reply():
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + RCPT_OK + START)
    server(s, b"552 5.2.2 <joe@example.com>: Mailbox full\r\n" + DELIVERED)
    assert outcome(s) == [PermFail(Reply(552, "5.2.2", "<joe@example.com>: Mailbox full")),
                          Delivered(Reply(250, "2.0.0", "Ok: delivered"))]


def test_connection_lost_after_the_first_of_two_final_replies():
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + RCPT_OK + START)
    server(s, DELIVERED)
    assert s.results == []
    s.t.loseConnection()
    first, second = outcome(s)
    assert first == Delivered(Reply(250, "2.0.0", "Ok: delivered"))
    assert isinstance(second, TempFail)
    assert (second.reply.code, second.reply.status) == (451, "4.4.2")
    assert "connection lost waiting for the final replies" in second.reply.text
    assert s.proto.closed.called


def test_a_partial_final_reply_is_no_reply():
    s = start(["joe@example.com"])
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + START)
    server(s, b"250 2.0.0 Ok: deliv")       # no CRLF yet
    s.proto.connectionLost(Failure(ConnectionLost("reset")))
    (o,) = outcome(s)
    assert isinstance(o, TempFail) and "reset" in o.reply.text


def test_connection_lost_at_any_point_never_counts_as_delivered():
    """Cut the server's side of the conversation after every byte: a recipient is
    Delivered exactly when its whole final reply line arrived, else TempFail."""
    first_end = FULL_SCRIPT.index(DELIVERED) + len(DELIVERED)
    second_end = FULL_SCRIPT.index(b"251 2.0.0 line\r\n") + len(b"251 2.0.0 line\r\n")
    for k in range(len(FULL_SCRIPT) + 1):
        s = start()
        s.proto.dataReceived(FULL_SCRIPT[:k])
        s.proto.connectionLost(Failure(ConnectionDone("gone")))
        outcomes = outcome(s)
        assert len(outcomes) == 2
        assert outcomes[0].delivered == (k >= first_end), k
        assert outcomes[1].delivered == (k >= second_end), k
        for o in outcomes:
            assert isinstance(o, (Delivered, TempFail)), (k, o)
        assert s.proto.closed.called


def test_timeout_waiting_for_a_reply():
    s = start()
    server(s, GREETING)
    s.clock.advance(299)
    assert s.results == []
    s.clock.advance(1)
    a, b = outcome(s)
    assert a == b and isinstance(a, TempFail)
    assert (a.reply.code, a.reply.status) == (451, "4.4.2")
    assert "timeout after LHLO" in a.reply.text
    assert not s.t.connected
    assert s.proto.closed.called
    assert s.clock.getDelayedCalls() == []


def test_timeout_after_the_first_final_reply():
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + RCPT_OK + START)
    server(s, DELIVERED)
    s.clock.advance(300)
    first, second = outcome(s)
    assert first.delivered
    assert isinstance(second, TempFail) and "timeout waiting for the final replies" in second.reply.text


def test_progress_moves_the_deadline():
    s = start(["joe@example.com"])
    s.clock.advance(200)
    server(s, GREETING)
    s.clock.advance(200)
    server(s, LHLO_FULL)
    s.clock.advance(200)
    server(s, MAIL_OK + RCPT_OK)
    s.clock.advance(200)
    server(s, START)
    s.clock.advance(299)
    server(s, DELIVERED)
    assert outcome(s)[0].delivered
    server(s, BYE)
    assert s.clock.getDelayedCalls() == []


def test_timeout_waiting_for_the_greeting_and_after_quit():
    s = start()
    s.clock.advance(300)
    assert all(isinstance(o, TempFail) and "waiting for the greeting" in o.reply.text
               for o in outcome(s))
    # No reply to QUIT: the connection is dropped after the timeout; outcomes stand.
    s = start(["joe@example.com"])
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + START)
    assert server(s, DELIVERED) == b"QUIT\r\n"
    assert outcome(s)[0].delivered
    assert s.t.connected
    s.clock.advance(300)
    assert not s.t.connected
    assert outcome(s)[0].delivered
    assert s.clock.getDelayedCalls() == []


def test_size_refusal_sends_nothing():
    s = start(message=b"x" * 20000 + b"\r\n")
    server(s, GREETING)
    assert server(s, LHLO_FULL) == b"QUIT\r\n"
    expected = PermFail(Reply(552, "5.3.4", "Message size (20002 bytes) exceeds the LMTP server's "
                                            "limit (10000 bytes)"))
    assert outcome(s) == [expected, expected]


def test_size_zero_means_no_limit():
    s = start(["joe@example.com"], message=b"x" * 20000 + b"\r\n")
    server(s, GREETING)
    out = server(s, b"250-mda\r\n250 SIZE 0\r\n")
    assert out.startswith(b"MAIL FROM:<alice@example.org> SIZE=20002\r\n")


@pytest.mark.parametrize("advertised", [False, True])
@pytest.mark.parametrize("requested", [False, True])
def test_body_and_smtputf8_only_when_advertised_and_requested(advertised, requested):
    s = start(["joe@example.com"], params={"body": "8BITMIME", "smtputf8": True} if requested else {})
    server(s, GREETING)
    lhlo = b"250-mda\r\n250-PIPELINING\r\n" + (b"250-8BITMIME\r\n250-SMTPUTF8\r\n" if advertised else b"") \
        + b"250 ENHANCEDSTATUSCODES\r\n"
    mail = server(s, lhlo).split(b"\r\n")[0]
    both = advertised and requested
    assert mail == b"MAIL FROM:<alice@example.org>" + (b" BODY=8BITMIME SMTPUTF8" if both else b"")


def test_utf8_addresses():
    s = start(["jörg@example.com", "joe@example.com"], sender="élise@example.org")
    server(s, GREETING)
    out = server(s, LHLO_FULL)
    assert out.startswith(f"MAIL FROM:<élise@example.org> SIZE={len(MSG)} SMTPUTF8\r\n"
                          "RCPT TO:<jörg@example.com>\r\n".encode("utf-8"))


def test_utf8_recipient_without_smtputf8_is_refused_alone():
    s = start(["jörg@example.com", "joe@example.com"])
    server(s, GREETING)
    out = server(s, b"250-mda\r\n250 PIPELINING\r\n")
    assert out == b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
    server(s, MAIL_OK + RCPT_OK + START)
    server(s, DELIVERED)
    refused, ok = outcome(s)
    assert refused.permanent and refused.reply.status == "5.6.7"
    assert ok.delivered


def test_utf8_sender_without_smtputf8_fails_everyone():
    s = start(sender="élise@example.org")
    server(s, GREETING)
    assert server(s, b"250-mda\r\n250 PIPELINING\r\n") == b"QUIT\r\n"
    assert all(o.permanent and o.reply.status == "5.6.7" for o in outcome(s))


def test_orcpt_only_with_dsn():
    clock = task.Clock()
    for lhlo, expected in [(LHLO_FULL, b"RCPT TO:<joe@example.com>\r\nDATA\r\n"),
                           (b"250-mda\r\n250-PIPELINING\r\n250 DSN\r\n",
                            b"RCPT TO:<joe@example.com> ORCPT=rfc822;a+2Bb@example.com\r\nDATA\r\n")]:
        proto = LMTPClientProtocol(HOST, "", [("joe@example.com", {"orcpt": ["rfc822", "a+b@example.com"]})],
                                   MSG, {}, clock=clock)
        t = StringTransportWithDisconnection()
        t.protocol = proto
        proto.makeConnection(t)
        proto.dataReceived(GREETING)
        t.clear()
        proto.dataReceived(lhlo)
        assert t.value().split(b"\r\n", 1)[1] == expected


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_refused(pipelining):
    s = start()
    server(s, GREETING)
    out = server(s, LHLO_FULL if pipelining else LHLO_PLAIN)
    if pipelining:
        assert out.count(b"RCPT TO") == 2
        assert server(s, b"553 5.1.7 bad sender\r\n") == b""
        assert server(s, b"503 5.5.1 need MAIL\r\n") == b""
        assert server(s, b"503 5.5.1 need MAIL\r\n") == b""
        assert server(s, b"503 5.5.1 need RCPT\r\n") == b"QUIT\r\n"     # the pipelined DATA
    else:
        assert server(s, b"553 5.1.7 bad sender\r\n") == b"QUIT\r\n"
    assert outcome(s) == [PermFail(Reply(553, "5.1.7", "bad sender"))] * 2


def test_mail_refused_temporarily():
    s = start(["joe@example.com"])
    server(s, GREETING)
    server(s, LHLO_PLAIN)
    server(s, b"451 4.3.0 try later\r\n")
    assert outcome(s) == [TempFail(Reply(451, "4.3.0", "try later"))]


@pytest.mark.parametrize("greeting, cls", [(b"554 5.3.2 no service\r\n", PermFail),
                                           (b"450 4.3.2 busy\r\n", TempFail)])
def test_greeting_refused(greeting, cls):
    s = start()
    assert server(s, greeting) == b"QUIT\r\n"
    assert outcome(s) == [cls(parse_reply(*ReplyParser().feed(greeting)[0]))] * 2


def test_greeting_421_closes():
    s = start()
    assert server(s, b"421 4.3.2 shutting down\r\n") == b""
    assert outcome(s) == [TempFail(Reply(421, "4.3.2", "shutting down"))] * 2
    assert not s.t.connected


def test_421_mid_session_fails_whatever_is_open():
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + RCPT_OK + START + DELIVERED)
    server(s, b"421 4.4.2 mda.example.com Error: timeout exceeded\r\n")
    first, second = outcome(s)
    assert first.delivered
    assert second == TempFail(Reply(421, "4.4.2", "mda.example.com Error: timeout exceeded"))
    assert not s.t.connected


def test_lhlo_refused_is_temporary_whatever_the_code():
    s = start(["joe@example.com"])
    server(s, GREETING)
    assert server(s, b"500 5.5.2 Error: command not recognized\r\n") == b"QUIT\r\n"
    (o,) = outcome(s)
    assert isinstance(o, TempFail) and o.reply.code == 451 and o.reply.status == "4.3.5"
    assert "500 5.5.2 Error: command not recognized" in o.reply.text


@pytest.mark.parametrize("bad", [b"garbage\r\n", b"250 " + b"x" * 5000, b"250-x\r\n" * 300])
def test_malformed_or_oversized_reply_is_a_temporary_failure(bad):
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    server(s, MAIL_OK + RCPT_OK + RCPT_OK + START)
    server(s, bad)
    a, b = outcome(s)
    assert a == b and isinstance(a, TempFail)
    assert (a.reply.code, a.reply.status) == (451, "4.5.0") and "protocol error" in a.reply.text
    assert not s.t.connected and s.proto.closed.called


def test_surplus_final_reply_changes_nothing():
    s = start()
    server(s, GREETING)
    server(s, LHLO_FULL)
    # A third final reply for two recipients arrives after QUIT went out: it is
    # taken as QUIT's answer and the outcomes stand.
    server(s, MAIL_OK + RCPT_OK + RCPT_OK + START + DELIVERED + DELIVERED + DELIVERED)
    assert [o.delivered for o in outcome(s)] == [True, True]
    assert not s.t.connected


def test_extra_reply_while_sending_the_message_is_a_protocol_error():
    with mock.patch.object(courier_module, "CHUNK", 8):
        s = start(["joe@example.com"])
        server(s, GREETING)
        server(s, LHLO_FULL)
        server(s, MAIL_OK + RCPT_OK)
        s.t.clear()
        s.proto.dataReceived(START)
        assert s.t.producer is not None
        s.proto.dataReceived(b"250 2.0.0 too early\r\n")
        (o,) = outcome(s)
        assert isinstance(o, TempFail) and "unexpected reply" in o.reply.text


# --- the message on the wire -----------------------------------------------------------------

def test_stuffed_chunks_examples():
    assert b"".join(stuffed_chunks(b"")) == b".\r\n"
    assert b"".join(stuffed_chunks(b"abc")) == b"abc\r\n.\r\n"
    assert b"".join(stuffed_chunks(b".\r\n")) == b"..\r\n.\r\n"
    assert b"".join(stuffed_chunks(b"a\r\n.\r\n..\r\n.x")) == b"a\r\n..\r\n...\r\n..x\r\n.\r\n"
    for size in range(2, 12):
        assert b"".join(stuffed_chunks(b"a\r\n.\r\n..\r\n.x", size)) == b"a\r\n..\r\n...\r\n..x\r\n.\r\n"


messages = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"a", b"..", b"\r\n.\r\n"]), max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(messages, st.integers(min_value=2, max_value=40))
def test_stuffing_round_trips(message, size):
    wire = b"".join(stuffed_chunks(message, size))
    assert wire == b"".join(stuffed_chunks(message, 1 << 20))   # chunking changes nothing
    body, terminator_only_at_end = reference_unstuff(wire)
    assert terminator_only_at_end
    assert body == expected_body(message)
    assert wire.find(b"\r\n.\r\n") in (-1, len(wire) - 5)
    assert wire == b".\r\n" or not wire.startswith(b".\r\n")
    if wire != b".\r\n":
        assert server_reader_unstuff(wire) == expected_body(message)


@settings(max_examples=150, deadline=None)
@given(messages, st.sampled_from([2, 3, 7, 64, courier_module.CHUNK]))
def test_bytes_after_354_unstuff_to_the_message(message, chunk):
    """Through the protocol (the producer path when the message exceeds a chunk)."""
    with mock.patch.object(courier_module, "CHUNK", chunk):
        s = start(["joe@example.com"], message=message)
        server(s, GREETING)
        server(s, LHLO_FULL)
        server(s, MAIL_OK + RCPT_OK)
        wire = server(s, START)
        body, terminator_only_at_end = reference_unstuff(wire)
        assert terminator_only_at_end
        assert body == expected_body(message)
        assert wire.find(b"\r\n.\r\n") in (-1, len(wire) - 5)
        assert server(s, DELIVERED) == b"QUIT\r\n"
        assert outcome(s)[0].delivered


def test_large_message_through_the_producer():
    line = b".starts with a dot and is long enough to matter here\r\n"
    message = b"Subject: big\r\n\r\n" + line * 60000 + b"..\r\n.\r\n"   # ~3.3 MB
    s = start(["joe@example.com"], message=message)
    server(s, GREETING)
    server(s, LHLO_FULL.replace(b"SIZE 10000", b"SIZE 10000000"))
    server(s, MAIL_OK + RCPT_OK)
    s.t.clear()
    s.proto.dataReceived(START)
    assert s.t.producer is not None and not s.t.streaming
    writes = 0
    while s.t.producer is not None:
        s.t.producer.resumeProducing()
        writes += 1
    assert writes == -(-len(message) // courier_module.CHUNK)
    wire = s.t.value()
    assert wire.count(b"\r\n..starts") == 60000 and wire.startswith(b"Subject")
    assert server_reader_unstuff(wire) == message
    assert server(s, DELIVERED) == b"QUIT\r\n"


@pytest.mark.parametrize("chunking", [False, True])
def test_connection_lost_while_sending_stops_the_producer(chunking):
    """After DATA's 354, or (BDAT, tests/test_courier_lmtp_bdat.py) right after LHLO."""
    with mock.patch.object(courier_module, "CHUNK", 16):
        s = start(["joe@example.com"])
        server(s, GREETING)
        if chunking:
            s.proto.dataReceived(LHLO_FULL.replace(b"250 HELP", b"250-CHUNKING\r\n250 HELP"))
        else:
            server(s, LHLO_FULL)
            server(s, MAIL_OK + RCPT_OK)
            s.proto.dataReceived(START)
        producer = s.t.producer
        producer.resumeProducing()
        s.t.loseConnection()
        assert producer.stopped
        (o,) = outcome(s)
        assert isinstance(o, TempFail) and "sending the message" in o.reply.text


def test_timeout_while_sending():
    with mock.patch.object(courier_module, "CHUNK", 16):
        s = start(["joe@example.com"])
        server(s, GREETING)
        server(s, LHLO_FULL)
        server(s, MAIL_OK + RCPT_OK)
        s.proto.dataReceived(START)
        s.clock.advance(200)
        s.t.producer.resumeProducing()      # progress: the transport took a chunk
        s.clock.advance(200)
        assert s.results == []
        s.clock.advance(100)
        (o,) = outcome(s)
        assert isinstance(o, TempFail) and "timeout sending the message" in o.reply.text


# --- endpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("listen, path", [
    ("unix:/run/mailsys/lmtp.sock", "/run/mailsys/lmtp.sock"),
    ("unix:/run/mailsys/lmtp.sock:mode=660", "/run/mailsys/lmtp.sock"),
    ("unix:address=/srv/x.sock:mode=600:lockfile=0", "/srv/x.sock"),
    ("unix:mode=600:/srv/y.sock", "/srv/y.sock"),
    (r"unix:/srv/odd\:name.sock", "/srv/odd:name.sock"),
])
def test_client_endpoint_for_unix(listen, path):
    reactor = MemoryReactorClock()
    endpoint = client_endpoint_for(reactor, listen, timeout=7)
    endpoint.connect(courier_module._ClientFactory(lambda: None))
    (address, _, timeout, _), = reactor.unixClients
    assert (address, timeout) == (path, 7)


@pytest.mark.parametrize("listen, host, port", [
    ("tcp:2400:interface=127.0.0.1", "127.0.0.1", 2400),
    ("tcp:2400", "127.0.0.1", 2400),
    ("tcp:port=2401:interface=0.0.0.0", "127.0.0.1", 2401),
    ("tcp:2402:interface=10.1.2.3:backlog=5", "10.1.2.3", 2402),
    ("tcp:2403:10.1.2.4", "10.1.2.4", 2403),
    ("tcp6:2404", "::1", 2404),
    ("tcp6:2405:interface=\\:\\:", "::1", 2405),
    ("tcp6:2406:interface=fd00\\:\\:5", "fd00::5", 2406),
    ("TCP:2407:interface=127.0.0.2", "127.0.0.2", 2407),
])
def test_client_endpoint_for_tcp(listen, host, port):
    reactor = MemoryReactorClock()
    client_endpoint_for(reactor, listen).connect(courier_module._ClientFactory(lambda: None))
    (got_host, got_port, _, timeout, _), = reactor.tcpClients
    assert (got_host, got_port, timeout) == (host, port, courier_module.CONNECT_TIMEOUT)


@pytest.mark.parametrize("listen", ["ssl:465", "tcp:0", "tcp:abc", "tcp:70000", "unix:",
                                    "systemd:domain=INET:index=0", "tcp:25:interface=mx.example",
                                    "lmtp.sock"])
def test_client_endpoint_for_refuses(listen):
    with pytest.raises(ValueError):
        client_endpoint_for(MemoryReactorClock(), listen)


# --- the courier ---------------------------------------------------------------------------------

class Harness:
    """A courier on MemoryReactorClock: connections are answered by hand."""

    def __init__(self, max_sessions=2, timeout=300, max_messages=1):
        self.reactor = MemoryReactorClock()
        self.courier = LMTPCourier(self.reactor, "unix:/run/lmtp.sock", HOST, timeout=timeout,
                                   max_sessions=max_sessions, max_messages=max_messages)
        self.accepted = 0

    def deliver(self, recipients, message=MSG, sender="alice@example.org", params=None):
        results = []
        self.courier.deliver(sender, rcpts(*recipients) if recipients and isinstance(recipients[0], str)
                             else recipients, message, params or {}).addBoth(results.append)
        return results

    @property
    def attempts(self):
        return len(self.reactor.unixClients)

    def accept(self, index):
        """Complete connection ``index``: (client protocol, transport)."""
        factory = self.reactor.unixClients[index][1]
        wrapper = factory.buildProtocol(None)
        t = StringTransportWithDisconnection()
        t.protocol = wrapper
        wrapper.makeConnection(t)
        return wrapper._wrappedProtocol, t

    def refuse(self, index):
        factory = self.reactor.unixClients[index][1]
        factory.clientConnectionFailed(self.reactor.connectors[index],
                                       Failure(ConnectionRefusedError("Connection refused")))


def converse(proto, t, finals):
    proto.dataReceived(GREETING + LHLO_FULL)
    n = t.value().count(b"RCPT TO:")
    proto.dataReceived(MAIL_OK + RCPT_OK * n + START + finals + BYE)
    return t.value()


def test_courier_delivers_and_frees_the_slot():
    h = Harness()
    results = h.deliver(["joe@example.com"])
    assert h.attempts == 1 and h.courier.active == 1
    proto, t = h.accept(0)
    converse(proto, t, DELIVERED)
    assert results == [[Delivered(Reply(250, "2.0.0", "Ok: delivered"))]]
    assert h.courier.active == 0


def test_courier_at_most_max_sessions_then_fifo():
    h = Harness(max_sessions=2)
    results = [h.deliver([f"u{i}@example.com"]) for i in range(5)]
    assert h.attempts == 2 and h.courier.waiting == 3
    sessions = {0: h.accept(0), 1: h.accept(1)}
    # The second session ends first: the third delivery takes its slot.
    converse(*sessions[1], DELIVERED)
    assert results[1][0][0].delivered and results[0] == []
    assert h.attempts == 3
    sessions[2] = h.accept(2)
    assert h.attempts == 3                 # still two at a time
    converse(*sessions[0], DELIVERED)
    assert h.attempts == 4
    converse(*sessions[2], DELIVERED)
    sessions[3] = h.accept(3)
    sessions[4] = h.accept(4)
    converse(*sessions[3], DELIVERED)
    converse(*sessions[4], DELIVERED)
    # Connections were made in delivery order.
    for i in range(5):
        assert f"RCPT TO:<u{i}@example.com>".encode() in sessions[i][1].value()
        assert results[i][0][0].delivered
    assert h.courier.active == 0 and h.courier.waiting == 0


def test_slot_is_held_until_the_connection_closes():
    h = Harness(max_sessions=1)
    first = h.deliver(["joe@example.com"])
    h.deliver(["ann@example.com"])
    proto, t = h.accept(0)
    proto.dataReceived(GREETING + LHLO_FULL + MAIL_OK + RCPT_OK + START + DELIVERED)
    assert first[0][0].delivered          # the outcome is known...
    assert h.attempts == 1                # ...but QUIT is not answered yet
    proto.dataReceived(BYE)
    assert h.attempts == 2


def test_connection_refused():
    h = Harness()
    results = h.deliver(["joe@example.com", "ann@example.com"])
    h.refuse(0)
    a, b = results[0]
    assert a == b and isinstance(a, TempFail)
    assert (a.reply.code, a.reply.status) == (451, "4.4.1")
    assert a.reply.text.startswith("LMTP connection failed: unix:/run/lmtp.sock: ")
    assert "refused" in a.reply.text
    assert h.courier.active == 0


def test_connect_timeout():
    h = Harness(timeout=60)
    results = h.deliver(["joe@example.com"])
    waiting = h.deliver(["ann@example.com"])
    h.reactor.advance(59)
    assert results == []
    h.reactor.advance(1)
    (o,) = results[0]
    assert o == TempFail(Reply(451, "4.4.1", "LMTP connection failed: unix:/run/lmtp.sock: "
                                             "timeout after 60 s"))
    assert h.reactor.connectors[0].stoppedConnecting
    assert waiting[0][0].reply.status == "4.4.1"
    assert h.courier.active == 0


def test_refusals_queue_in_order_without_recursion():
    h = Harness(max_sessions=1)
    results = [h.deliver([f"u{i}@example.com"]) for i in range(300)]
    for i in range(300):
        assert h.attempts == i + 1
        h.refuse(i)
    assert all(r[0][0].reply.status == "4.4.1" for r in results)
    assert h.courier.active == 0


def test_duplicate_recipients_are_sent_once_and_share_the_outcome():
    h = Harness()
    results = h.deliver(["joe@example.com", "ann@example.com", "joe@EXAMPLE.com", '"joe"@example.com'])
    proto, t = h.accept(0)
    out = converse(proto, t, DELIVERED + b"452 4.2.2 <ann@example.com>: over quota\r\n")
    assert out.count(b"RCPT TO:") == 2
    joe, ann, joe2, joe3 = results[0]
    assert joe.delivered and joe == joe2 == joe3
    assert ann == TempFail(Reply(452, "4.2.2", "<ann@example.com>: over quota"))


@pytest.mark.parametrize("bad", ["joe@example.com>\r\nRSET", "joe@example.com\r\nDATA", "", "no at sign",
                                 "a@b@c", "joe@exa mple.com"])
def test_bad_recipient_never_reaches_the_wire(bad):
    h = Harness()
    results = h.deliver([bad, "joe@example.com"])
    proto, t = h.accept(0)
    out = converse(proto, t, DELIVERED)
    assert out.count(b"RCPT TO:") == 1 and b"RSET" not in out and b"DATA\r\nDATA" not in out
    refused, ok = results[0]
    assert refused.permanent and refused.reply.status == "5.1.3"
    assert ok.delivered


def test_only_bad_recipients_means_no_connection():
    h = Harness()
    results = h.deliver(["bad\r\nx", "nope"])
    assert h.attempts == 0
    assert all(o.permanent for o in results[0]) and len(results[0]) == 2


def test_bad_sender_fails_everyone_without_connecting():
    h = Harness()
    results = h.deliver(["joe@example.com", "ann@example.com"], sender="x>\r\nRSET")
    assert h.attempts == 0
    assert [o.reply.status for o in results[0]] == ["5.1.7", "5.1.7"]


def test_no_recipients():
    h = Harness()
    assert h.deliver([]) == [[]]
    assert h.attempts == 0


def test_deliver_never_raises():
    h = Harness()
    results = h.deliver(["joe@example.com"], message=None)
    (o,) = results[0]
    assert isinstance(o, TempFail) and o.reply.code == 451
    assert h.attempts == 0


def test_courier_session_timeout_frees_the_slot():
    h = Harness(max_sessions=1, timeout=100)
    results = h.deliver(["joe@example.com"])
    h.deliver(["ann@example.com"])
    proto, t = h.accept(0)
    proto.dataReceived(GREETING)
    h.reactor.advance(100)
    assert isinstance(results[0][0], TempFail) and "timeout after LHLO" in results[0][0].reply.text
    assert h.attempts == 2 and h.courier.active == 1


# --- against our own LMTP server protocol, in memory --------------------------------------------

class Accounts:
    def __init__(self):
        self.users = {a: User(a, "{ARGON2ID}x", quota=q) for a, q in
                      [("joe@example.com", None), ("ann@example.com", 300)]}

    def user(self, address):
        local, _, domain = address.rpartition("@")
        return self.users.get(f"{local.lower()}@{domain.lower()}")

    def expand(self, address):
        user = self.user(address)
        return Expansion(local_users=(user.address,)) if user else Expansion()


def shuttle(client, ct, server_proto, st_):
    """Move bytes both ways (and run the producer) until nothing moves."""
    for _ in range(100000):
        moved = False
        if ct.producer is not None:
            ct.producer.resumeProducing()
            moved = True
        data = ct.value()
        if data:
            ct.clear()
            server_proto.dataReceived(data)
            moved = True
        data = st_.value()
        if data:
            st_.clear()
            client.dataReceived(data)
            moved = True
        if not moved:
            return
    raise AssertionError("no quiescence")


@pytest.fixture
def mda_session(tmp_path):
    config = SimpleNamespace(mailbox=SimpleNamespace(root=str(tmp_path), default_store="maildir", quota=0),
                             domains=SimpleNamespace(local=("example.com",)))
    store = MemoryStore()
    mda = MDA(config, Accounts(), reactor=None, stores={"maildir": store, "mbox": MemoryStore()},
              run=defer.maybeDeferred)
    limits = SimpleNamespace(message_size=10_000_000, recipients=100, command_timeout=300,
                             data_timeout=600, auth_failures=3)

    def run(recipients, message, sender="alice@example.org"):
        clock = task.Clock()
        server_proto = LMTPFactory(mda, limits, "mda.example.com", clock).buildProtocol(None)
        st_ = StringTransportWithDisconnection()
        st_.protocol = server_proto
        plan = courier_module._Plan(sender, rcpts(*recipients), {})
        client = LMTPClientProtocol(HOST, sender, plan.unique, message, {}, clock=clock)
        ct = StringTransportWithDisconnection()
        ct.protocol = client
        results = []
        client.result.addCallback(lambda o: results.append(plan.expand(o)))
        server_proto.makeConnection(st_)
        client.makeConnection(ct)
        shuttle(client, ct, server_proto, st_)
        return results[0]

    def run_many(deliveries, sender="alice@example.org"):
        """Every delivery over one reused session: the outcomes of each."""
        clock = task.Clock()
        server_proto = LMTPFactory(mda, limits, "mda.example.com", clock).buildProtocol(None)
        st_ = StringTransportWithDisconnection()
        st_.protocol = server_proto
        plans = [courier_module._Plan(sender, rcpts(*r), {}) for r, _ in deliveries]
        pending = list(zip(plans, (m for _, m in deliveries)))
        results = []

        def ready(proto):
            if pending:
                plan, message = pending.pop(0)
                proto.send(sender, plan.unique, message, {}).addCallback(
                    lambda o, plan=plan: results.append(plan.expand(o)))
            else:
                proto.quit()

        plan, message = pending.pop(0)
        client = LMTPClientProtocol(HOST, sender, plan.unique, message, {}, clock=clock,
                                    on_ready=ready)
        client.result.addCallback(lambda o: results.append(plan.expand(o)))
        ct = StringTransportWithDisconnection()
        ct.protocol = client
        server_proto.makeConnection(st_)
        client.makeConnection(ct)
        shuttle(client, ct, server_proto, st_)
        assert client.transactions == len(deliveries) and client.closed.called
        return results

    def box(address):
        local, _, domain = address.partition("@")
        return store.messages(f"{tmp_path}/{domain}/{local}/Maildir")

    return SimpleNamespace(run=run, run_many=run_many, box=box)


def test_against_our_server_protocol(mda_session):
    message = b"Subject: hi\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n"
    outcomes = mda_session.run(["joe@example.com", "nobody@example.com", "ann@example.com"], message)
    assert outcomes[0] == Delivered(Reply(250, "2.0.0", "Ok: delivered"))
    assert outcomes[1] == PermFail(Reply(550, "5.1.1", "<nobody@example.com>: User unknown in local "
                                                       "recipient table"))
    assert outcomes[2].delivered
    expected = (b"Return-Path: <alice@example.org>\r\nDelivered-To: joe@example.com\r\n"
                + message).replace(b"\r\n", b"\n")
    assert mda_session.box("joe@example.com") == [expected]


def test_against_our_server_over_quota_and_large(mda_session):
    message = b"Subject: big\r\n\r\n" + b".x\r\n" * 200_000
    outcomes = mda_session.run(["joe@example.com", "ann@example.com"], message)
    assert outcomes[0].delivered
    assert outcomes[1] == PermFail(Reply(552, "5.2.2", "<ann@example.com>: Mailbox full: over quota"))
    (stored,) = mda_session.box("joe@example.com")
    assert stored.endswith(b"\n.x\n.x\n") and stored.count(b"\n.x\n") >= 100_000


def test_against_our_server_duplicates_give_one_copy(mda_session):
    outcomes = mda_session.run(["joe@example.com", "joe@example.com"], MSG)
    assert outcomes[0].delivered and outcomes[1].delivered
    assert len(mda_session.box("joe@example.com")) == 1


def test_idle_fires_when_every_connection_is_closed():
    h = Harness(max_sessions=1)
    assert h.courier.idle().called
    h.deliver(["joe@example.com"])
    h.deliver(["ann@example.com"])
    idle = h.courier.idle()
    proto, t = h.accept(0)
    converse(proto, t, DELIVERED)
    assert not idle.called
    proto, t = h.accept(1)
    proto.dataReceived(GREETING + LHLO_FULL + MAIL_OK + RCPT_OK + START + DELIVERED)
    assert not idle.called                # QUIT not answered yet
    proto.dataReceived(BYE)
    assert idle.called


@pytest.mark.parametrize("hostname", ["", "a b", "x\r\nRSET", None])
def test_courier_refuses_a_bad_lhlo_name(hostname):
    with pytest.raises(ValueError):
        LMTPCourier(MemoryReactorClock(), "unix:/run/lmtp.sock", hostname)


def test_courier_refuses_a_bad_endpoint_or_limit():
    with pytest.raises(ValueError):
        LMTPCourier(MemoryReactorClock(), "ssl:465", HOST)
    with pytest.raises(ValueError):
        LMTPCourier(MemoryReactorClock(), "unix:/run/lmtp.sock", HOST, max_sessions=0)


class HalfClosingTransport(StringTransportWithDisconnection):
    """loseConnection waits (as for unsent data to a peer that reads nothing);
    only abortConnection ends the connection."""

    def loseConnection(self):
        self.disconnecting = True

    def abortConnection(self):
        StringTransportWithDisconnection.loseConnection(self)


def test_a_close_that_never_completes_is_aborted_after_the_timeout():
    clock = task.Clock()
    proto = LMTPClientProtocol(HOST, "", rcpts("joe@example.com"), MSG, {}, clock=clock)
    t = HalfClosingTransport()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(GREETING + LHLO_FULL + MAIL_OK + RCPT_OK + START + DELIVERED + BYE)
    assert t.disconnecting and t.connected and not proto.closed.called
    clock.advance(300)
    assert not t.connected and proto.closed.called
    assert proto.result.result[0].delivered


# --- session reuse ------------------------------------------------------------------------------

def one_delivery(proto, t):
    """Answer one pipelined transaction on an established session: what the client
    wrote for it; what it wrote after the final replies stays in ``t``."""
    sent = t.value()
    t.clear()
    n = sent.count(b"RCPT TO:")
    proto.dataReceived(MAIL_OK + RCPT_OK * n + START)
    sent += t.value()
    t.clear()
    proto.dataReceived(DELIVERED * n)
    return sent


def idle_session(max_sessions):
    """A courier (up to 5 deliveries a session) with one session that has made
    one delivery and is now idle: (harness, protocol, transport)."""
    h = Harness(max_sessions=max_sessions, max_messages=5)
    h.deliver(["joe@example.com"])
    proto, t = h.accept(0)
    proto.dataReceived(GREETING + LHLO_FULL)
    one_delivery(proto, t)
    return h, proto, t


def test_reused_session_carries_the_next_delivery_without_a_new_lhlo():
    h = Harness(max_sessions=1, max_messages=5)
    first = h.deliver(["joe@example.com"])
    second = h.deliver(["ann@example.com"], sender="bob@example.org")
    proto, t = h.accept(0)
    proto.dataReceived(GREETING + LHLO_FULL)
    wrote = one_delivery(proto, t)
    assert wrote.startswith(b"LHLO queue.example.org\r\nMAIL FROM:<alice@example.org> SIZE=")
    assert first == [[Delivered(Reply(250, "2.0.0", "Ok: delivered"))]]
    # The second delivery went out on the same connection at once: no QUIT, no LHLO.
    assert t.value().startswith(b"MAIL FROM:<bob@example.org> SIZE=")
    assert b"RCPT TO:<ann@example.com>\r\n" in t.value()
    wrote = one_delivery(proto, t)
    assert second[0][0].delivered
    assert h.attempts == 1 and proto.transactions == 2
    assert b"QUIT" not in wrote and b"LHLO" not in wrote
    assert h.courier.active == 1 and h.courier.idle_sessions == 1


def test_idle_session_quits_after_the_idle_timeout():
    h, proto, t = idle_session(max_sessions=1)
    t.clear()
    h.reactor.advance(courier_module.IDLE_TIMEOUT - 0.1)
    assert t.value() == b"" and h.courier.idle_sessions == 1
    h.reactor.advance(0.1)
    assert t.value() == b"QUIT\r\n" and h.courier.idle_sessions == 0
    proto.dataReceived(BYE)
    assert not t.connected and h.courier.active == 0


def test_an_idle_session_takes_a_later_delivery():
    h, proto, t = idle_session(max_sessions=3)
    t.clear()
    h.reactor.advance(1)
    later = h.deliver(["ann@example.com"])
    assert h.attempts == 1 and t.value().startswith(b"MAIL FROM:<alice@example.org>")
    one_delivery(proto, t)
    assert later[0][0].delivered
    # The idle timer restarted: a full IDLE_TIMEOUT from the second delivery.
    t.clear()
    h.reactor.advance(courier_module.IDLE_TIMEOUT - 0.5)
    assert t.value() == b""


def test_session_quits_after_max_messages():
    h = Harness(max_sessions=1, max_messages=2)
    results = [h.deliver([f"u{i}@example.com"]) for i in range(3)]
    proto, t = h.accept(0)
    proto.dataReceived(GREETING + LHLO_FULL)
    one_delivery(proto, t)
    one_delivery(proto, t)
    assert t.value() == b"QUIT\r\n"
    assert results[0][0][0].delivered and results[1][0][0].delivered and results[2] == []
    assert h.attempts == 1
    proto.dataReceived(BYE)
    assert h.attempts == 2          # the third delivery on a new connection
    proto2, t2 = h.accept(1)
    proto2.dataReceived(GREETING + LHLO_FULL)
    one_delivery(proto2, t2)
    assert results[2][0][0].delivered


@pytest.mark.parametrize("reply", [b"550 5.1.8 Bad sender\r\n", b"451 4.3.0 Try later\r\n"])
def test_a_delivery_without_final_replies_ends_the_session(reply):
    h = Harness(max_sessions=1, max_messages=5)
    first = h.deliver(["joe@example.com"])
    second = h.deliver(["ann@example.com"])
    proto, t = h.accept(0)
    proto.dataReceived(GREETING + LHLO_FULL)
    t.clear()
    proto.dataReceived(reply + RCPT_OK)
    assert t.value() == b""                         # the pipelined DATA's reply is due
    proto.dataReceived(b"503 5.5.1 Error: need RCPT command\r\n")
    assert t.value() == b"QUIT\r\n" and not first[0][0].delivered
    assert second == [] and h.attempts == 1
    proto.dataReceived(BYE)
    assert h.attempts == 2 and second == []


def test_reused_session_lost_before_mail_is_answered_retries_on_a_new_connection():
    h, proto, t = idle_session(max_sessions=1)
    later = h.deliver(["ann@example.com"])
    assert t.value().startswith(b"MAIL FROM:")
    t.loseConnection()              # the server had closed the idle connection
    assert later == [] and h.attempts == 2
    proto2, t2 = h.accept(1)
    proto2.dataReceived(GREETING + LHLO_FULL)
    one_delivery(proto2, t2)
    assert later[0][0].delivered


def test_reused_session_lost_after_mail_is_answered_is_a_temporary_failure():
    h, proto, t = idle_session(max_sessions=1)
    later = h.deliver(["ann@example.com"])
    proto.dataReceived(MAIL_OK + RCPT_OK + START)
    t.loseConnection()              # the body may have arrived: never "delivered", never retried here
    (o,) = later[0]
    assert isinstance(o, TempFail) and (o.reply.code, o.reply.status) == (451, "4.4.2")
    assert h.attempts == 1 and h.courier.active == 0


def test_retries_on_dead_sessions_are_bounded():
    h = Harness(max_sessions=3, max_messages=5)
    for i in range(3):
        h.deliver([f"u{i}@example.com"])
    sessions = [h.accept(i) for i in range(3)]
    for proto, t in sessions:
        proto.dataReceived(GREETING + LHLO_FULL)
        one_delivery(proto, t)
        t.clear()
    assert h.courier.idle_sessions == 3
    later = h.deliver(["ann@example.com"])
    # Each idle session in turn takes the delivery and dies before MAIL is answered.
    for n in range(courier_module.MAX_RETRIES + 1):
        (proto, t), = [(p, t) for p, t in sessions if t.value()]
        assert later == [] and t.value().startswith(b"MAIL FROM:")
        t.clear()
        t.loseConnection()
    (o,) = later[0]
    assert isinstance(o, TempFail) and (o.reply.code, o.reply.status) == (451, "4.4.2")
    assert h.attempts == 3 and h.courier.active == 0


def test_idle_session_lost_is_forgotten():
    h, proto, t = idle_session(max_sessions=1)
    t.loseConnection()
    assert h.courier.idle_sessions == 0 and h.courier.active == 0
    h.deliver(["ann@example.com"])
    assert h.attempts == 2


def test_idle_closes_idle_sessions_and_fires_when_they_are_gone():
    h, proto, t = idle_session(max_sessions=2)
    t.clear()
    done = h.courier.idle()
    assert t.value() == b"QUIT\r\n" and not done.called
    proto.dataReceived(BYE)
    assert done.called and h.courier.active == 0


def test_reuse_against_our_server_protocol(mda_session):
    """Three deliveries over one session to our own LMTP server: three copies, and
    the server took them as three transactions on one connection."""
    outcomes = mda_session.run_many([(["joe@example.com"], b"Subject: 1\r\n\r\none\r\n"),
                                     (["joe@example.com", "nobody@example.com"],
                                      b"Subject: 2\r\n\r\ntwo\r\n"),
                                     (["joe@example.com"], b"Subject: 3\r\n\r\n.three\r\n")])
    assert [o[0].delivered for o in outcomes] == [True, True, True]
    assert isinstance(outcomes[1][1], PermFail) and outcomes[1][1].reply.status == "5.1.1"
    assert [m.split(b"\n")[2] for m in mda_session.box("joe@example.com")] == [
        b"Subject: 1", b"Subject: 2", b"Subject: 3"]
    assert mda_session.box("joe@example.com")[2].endswith(b"\n.three\n")
