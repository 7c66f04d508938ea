"""BDAT chunk framing (RFC 3030) on the MDA's LMTP: the chunk size is the only
thing that says where the next command starts, so a client must never get
bytes inside a chunk read as commands, nor a command read as message bytes.

* A chunk that cannot be taken (no MAIL, no recipient, a refused transaction)
  is still read to its last byte and then refused: commands hidden in it are
  never run, and the command after it is.
* A BDAT line whose size cannot be read gets 501 and the connection is closed:
  there is no safe place to go on from.
* A huge size with few bytes behind it holds no memory beyond the limit and
  ends with the DATA timeout; more than ``limits.message_size`` in chunks is
  refused for every recipient and nothing is stored.
"""
import pytest

from tests.helpers import FakeService, receive_connect
from tests.test_lmtp import make_session, run
from tests.test_lmtp_bdat import stored


@pytest.fixture
def session(tmp_path):
    return make_session(tmp_path)

HIDDEN = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<joe@example.com>\r\nBDAT 4 LAST\r\nowned\r\n"
BARE_OK = b"250 2.0.0 Ok\r\n"


def test_a_chunk_without_mail_is_skipped_whole_and_hidden_commands_never_run(session):
    out = run(session, b"LHLO x\r\nBDAT %d\r\n" % len(HIDDEN) + HIDDEN + b"NOOP\r\n")
    assert out.endswith(b"250 HELP\r\n503 5.5.1 Error: need MAIL command\r\n" + BARE_OK)
    assert stored(session, "joe") == []


def test_a_chunk_without_recipients_is_skipped_and_ends_the_transaction(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<nobody@example.com>\r\n"
                       b"BDAT %d LAST\r\n" % len(HIDDEN) + HIDDEN + b"BDAT 2 LAST\r\nhi" + b"NOOP\r\n")
    assert out.endswith(b"550 5.1.1 <nobody@example.com>: User unknown in local recipient table\r\n"
                        b"554 5.5.1 Error: no valid recipients\r\n"
                        b"503 5.5.1 Error: need MAIL command\r\n" + BARE_OK)
    assert stored(session, "joe") == []


def test_a_chunk_after_a_lost_one_never_makes_a_message(session):
    """A transaction whose first chunk was refused is over: its later chunks are
    skipped, so no message is made of the rest."""
    session.proto.handler.data = lambda proto, txn: __import__(
        "mailsys.smtp.reply", fromlist=["Reply"]).Reply(451, "4.3.0", "Try later")
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"BDAT 3\r\nabcBDAT 5 LAST\r\nrest\n")
    assert out.endswith(b"250 2.1.5 Ok\r\n451 4.3.0 Try later\r\n503 5.5.1 Error: need MAIL command\r\n")
    assert stored(session, "joe") == []


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 1 LASTX", b"BDAT 1 LAST x",
                                  b"BDAT 1e3", b"BDAT " + b"9" * 21, b"BDAT  1"])
def test_an_unreadable_size_closes_the_session(session, line):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       + line + b"\r\nNOOP\r\n")
    assert out.endswith(b"250 2.1.5 Ok\r\n501 5.5.4 Syntax: BDAT size [LAST]\r\n")
    assert session.t.connected is False
    assert stored(session, "joe") == []


def test_a_huge_size_holds_no_more_than_the_limit_and_times_out(session):
    chunks = []
    session.proto.handler.data_chunk = lambda proto, txn, chunk: chunks.append(chunk)
    run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n")
    out = run(session, b"BDAT 99999999999999999999 LAST\r\n")
    assert out == b""
    for _ in range(40):
        session.proto.dataReceived(b"x" * 998 + b"\r\n")
    # message_size is 10000: the handler got no more than that, the rest is skipped.
    assert sum(map(len, chunks)) <= 10000
    assert session.t.value() == b""
    session.proto.clock.advance(700)          # data_timeout is 600 s
    assert session.t.value().endswith(b"421 4.4.2 mda.example.com Error: timeout exceeded\r\n")
    assert session.t.connected is False
    assert stored(session, "joe") == []


def test_a_command_after_the_last_chunk_is_a_command(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"BDAT 6 LAST\r\nhi\r\n\r\nQUIT\r\n")
    assert out.endswith(b"250 2.0.0 Ok: delivered\r\n221 2.0.0 Bye\r\n")
    assert stored(session, "joe") == [b"Return-Path: <a@b.org>\nDelivered-To: joe@example.com\nhi\n\n"]


def test_bdat_is_an_unknown_command_where_chunking_is_not_offered():
    """The MX-facing listener does not offer CHUNKING: BDAT is refused as an
    unknown command, and its would-be chunk is read as (bad) commands, not mail."""
    svc = FakeService(users=("alice@example.com",))
    proto, t = receive_connect(svc, "203.0.113.66")
    proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<alice@example.com>\r\n"
                       b"BDAT 6 LAST\r\nhello\r\n")
    out = t.value()
    assert b"CHUNKING" not in out
    assert out.endswith(b"250 2.1.5 Ok\r\n500 5.5.2 Error: command not recognized\r\n"
                       b"500 5.5.2 Error: command not recognized\r\n")
    assert svc.spool.commits == []
