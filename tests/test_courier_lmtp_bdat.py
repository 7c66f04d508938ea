"""The LMTP courier with a server that offers CHUNKING (RFC 3030; our MDA does):
the envelope, ``BDAT <size> LAST`` and the message as it is in one write, the
final replies straight after the RCPT replies.  Scripted replies on
StringTransport, as in tests/test_courier_lmtp.py; the conversations with our
own server protocol there run over BDAT as well."""
from unittest import mock

from tests.test_courier_lmtp import (BYE, DELIVERED, GREETING, LHLO_FULL, MAIL_OK, MSG,
                                     RCPT_OK, STUFFED, feed_cut, outcome, server, start)
from mailsys.couriers import lmtp as courier_module
from mailsys.couriers.lmtp import plain_chunks
from mailsys.delivery import Delivered, PermFail, TempFail
from mailsys.smtp.reply import Reply

LHLO_CHUNKING = LHLO_FULL.replace(b"250 HELP", b"250-CHUNKING\r\n250 HELP")
ENVELOPE = (b"MAIL FROM:<alice@example.org> SIZE=%d\r\n"
            b"RCPT TO:<joe@example.com>\r\nRCPT TO:<ann@example.com>\r\n" % len(MSG))
UNKNOWN = b"550 5.1.1 <ann@example.com>: User unknown in local recipient table\r\n"


def test_envelope_and_message_in_one_write_and_no_stuffing():
    s = start()
    assert server(s, GREETING) == b"LHLO queue.example.org\r\n"
    assert server(s, LHLO_CHUNKING) == ENVELOPE + b"BDAT %d LAST\r\n" % len(MSG) + MSG
    assert server(s, MAIL_OK + RCPT_OK + RCPT_OK + DELIVERED) == b""
    assert s.results == []
    assert server(s, b"250 2.0.0 Ok: delivered too\r\n") == b"QUIT\r\n"
    assert outcome(s) == [Delivered(Reply(250, "2.0.0", "Ok: delivered")),
                          Delivered(Reply(250, "2.0.0", "Ok: delivered too"))]
    server(s, BYE)
    assert not s.t.connected


SCRIPT = GREETING + LHLO_CHUNKING + MAIL_OK + RCPT_OK + UNKNOWN + DELIVERED + BYE
CLIENT = (b"LHLO queue.example.org\r\n" + ENVELOPE + b"BDAT %d LAST\r\n" % len(MSG) + MSG
          + b"QUIT\r\n")


def test_whole_conversation_split_at_every_byte():
    for cut in range(len(SCRIPT) + 1):
        s = start()
        feed_cut(s.proto, SCRIPT, [cut])
        assert s.t.value() == CLIENT, cut
        assert outcome(s) == [Delivered(Reply(250, "2.0.0", "Ok: delivered")),
                              PermFail(Reply(550, "5.1.1", "<ann@example.com>: User unknown in "
                                                           "local recipient table"))]
        assert not s.t.connected


def test_no_recipient_accepted_ends_without_waiting_for_the_bdat_reply():
    """The outcomes are complete at the last RCPT reply; QUIT follows whether the
    server answers the BDAT once (ours: 554) or not at all."""
    for after in (b"554 5.5.1 Error: no valid recipients\r\n" + BYE, BYE):
        s = start()
        server(s, GREETING)
        server(s, LHLO_CHUNKING)
        assert server(s, MAIL_OK + UNKNOWN + UNKNOWN.replace(b"ann", b"joe")) == b"QUIT\r\n"
        assert [type(o) for o in outcome(s)] == [PermFail, PermFail]
        server(s, after)
        assert not s.t.connected


def test_mail_refused_fails_everyone_and_quits():
    s = start()
    server(s, GREETING)
    server(s, LHLO_CHUNKING)
    out = server(s, b"451 4.3.0 Try later\r\n" + b"503 5.5.1 Error: need MAIL command\r\n" * 2)
    assert out == b"QUIT\r\n"
    assert outcome(s) == [TempFail(Reply(451, "4.3.0", "Try later"))] * 2


def test_message_without_final_crlf_gets_one_and_an_empty_one_is_bdat_0():
    s = start(["joe@example.com"], message=b"Subject: x\r\n\r\nno newline")
    server(s, GREETING)
    assert server(s, LHLO_CHUNKING).endswith(b"BDAT 26 LAST\r\nSubject: x\r\n\r\nno newline\r\n")
    s = start(["joe@example.com"], message=b"")
    server(s, GREETING)
    assert server(s, LHLO_CHUNKING).endswith(b"RCPT TO:<joe@example.com>\r\nBDAT 0 LAST\r\n")


def test_chunking_without_pipelining_keeps_data():
    s = start(["joe@example.com"])
    server(s, GREETING)
    assert server(s, b"250-mda.example.com\r\n250 CHUNKING\r\n") == b"MAIL FROM:<alice@example.org>\r\n"
    assert server(s, MAIL_OK) == b"RCPT TO:<joe@example.com>\r\n"
    assert server(s, RCPT_OK) == b"DATA\r\n"
    assert server(s, b"354 go\r\n") == STUFFED


def test_large_message_through_the_producer_as_it_is():
    line = b".starts with a dot and is long enough to matter here\r\n"
    message = b"Subject: big\r\n\r\n" + line * 60000          # ~3.3 MB
    s = start(["joe@example.com"], message=message)
    server(s, GREETING)
    s.t.clear()
    s.proto.dataReceived(LHLO_CHUNKING.replace(b"SIZE 10000", b"SIZE 10000000"))
    head = b"RCPT TO:<joe@example.com>\r\nBDAT %d LAST\r\n" % len(message)
    assert s.t.value().endswith(head) and s.t.producer is not None
    writes = 0
    while s.t.producer is not None:
        s.t.producer.resumeProducing()
        writes += 1
    assert writes == -(-len(message) // courier_module.CHUNK)
    assert s.t.value().split(head, 1)[1] == message
    assert server(s, MAIL_OK + RCPT_OK + DELIVERED) == b"QUIT\r\n"
    assert outcome(s) == [Delivered(Reply(250, "2.0.0", "Ok: delivered"))]


def test_refusals_during_a_large_message_quit_only_after_it():
    with mock.patch.object(courier_module, "CHUNK", 16):
        s = start(["joe@example.com"])
        server(s, GREETING)
        s.proto.dataReceived(LHLO_CHUNKING)
        s.t.producer.resumeProducing()
        s.t.clear()
        s.proto.dataReceived(MAIL_OK + UNKNOWN.replace(b"ann", b"joe"))
        assert [type(o) for o in outcome(s)] == [PermFail]
        assert s.t.value() == b""                 # no QUIT inside the chunk
        while s.t.producer is not None:
            s.t.producer.resumeProducing()
        assert s.t.value().endswith(MSG[-(len(MSG) - 16):] + b"QUIT\r\n")


def test_a_final_reply_before_the_message_was_sent_is_a_protocol_error():
    with mock.patch.object(courier_module, "CHUNK", 16):
        s = start(["joe@example.com"])
        server(s, GREETING)
        s.proto.dataReceived(LHLO_CHUNKING)
        s.proto.dataReceived(MAIL_OK + RCPT_OK + DELIVERED)
        (o,) = outcome(s)
        assert isinstance(o, TempFail) and o.reply.status == "4.5.0"
        assert "before the message was sent" in o.reply.text
        assert not s.t.connected


def test_plain_chunks():
    assert list(plain_chunks(b"abcdefg", 3)) == [b"abc", b"def", b"g"]
    assert list(plain_chunks(b"", 3)) == []
