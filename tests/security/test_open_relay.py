"""Open-relay tricks from a client outside mynetworks: every one is refused.

Our local domain is example.com (user alice), the relay domain relay.example, and
the client 203.0.113.66 is not in mynetworks.  A trick aimed at our own domain
gets 550 5.1.1 (the parsed address is not a user); one aimed elsewhere gets
554 5.7.1; one that is not an address at all gets 501 5.1.3.  None is accepted,
and none is accepted "for later": nothing would ever be relayed.
"""
import pytest

from tests.helpers import FakeService, receive_connect, take

UNKNOWN = b"550 5.1.1 <%s>: Recipient address rejected: User unknown in local recipient table\r\n"
DENIED = b"554 5.7.1 <%s>: Relay access denied\r\n"
SYNTAX = b"501 5.1.3 Bad recipient address syntax\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"

TRICKS = [
    # percent hack
    (b"<user%other.org@example.com>", UNKNOWN % b"user%other.org@example.com"),
    (b"<victim%other.org@EXAMPLE.COM>", UNKNOWN % b"victim%other.org@example.com"),
    (b"<victim%other.org@[203.0.113.1]>", DENIED % b"victim%other.org@[203.0.113.1]"),
    # source routes: the route is dropped, the final mailbox decides
    (b"<@a.example:b@c.example>", DENIED % b"b@c.example"),
    (b"<@example.com:victim@other.org>", DENIED % b"victim@other.org"),
    (b"<@example.com,@relay.example:victim@other.org>", DENIED % b"victim@other.org"),
    (b"<@other.org:nobody@example.com>", UNKNOWN % b"nobody@example.com"),
    # quoted local parts holding an address
    (b'<"user@other.org"@example.com>', UNKNOWN % b'"user@other.org"@example.com'),
    (b'<"victim@other.org">', SYNTAX),
    (b'<"victim%other.org"@example.com>', UNKNOWN % b"victim%other.org@example.com"),
    # bang paths
    (b"<other.org!user>", SYNTAX),
    (b"<other.org!user@example.com>", UNKNOWN % b"other.org!user@example.com"),
    (b"<other.org!user@other.org>", DENIED % b"other.org!user@other.org"),
    # IP literals, ours or not
    (b"<user@[127.0.0.1]>", DENIED % b"user@[127.0.0.1]"),
    (b"<user@[203.0.113.1]>", DENIED % b"user@[203.0.113.1]"),
    (b"<user@[IPv6:::1]>", DENIED % b"user@[IPv6:::1]"),
    (b"<user@[IPv6:0:0:0:0:0:0:0:1]>", DENIED % b"user@[IPv6:::1]"),
    (b"<user@[0177.0.0.1]>", SYNTAX),
    (b"<user@[2130706433]>", SYNTAX),
    (b"<user@127.0.0.1>", DENIED % b"user@127.0.0.1"),
    # case and dots
    (b"<victim@OTHER.ORG>", DENIED % b"victim@other.org"),
    (b"<victim@Other.Org>", DENIED % b"victim@other.org"),
    (b"<nobody@EXAMPLE.COM>", UNKNOWN % b"nobody@example.com"),
    (b"<victim@other.org.>", SYNTAX),
    (b"<victim@example.com.>", SYNTAX),
    (b"<victim@example.com..>", SYNTAX),
    (b"<victim@.example.com>", SYNTAX),
    (b"<victim@sub.example.com>", DENIED % b"victim@sub.example.com"),
    (b"<victim@example.com.other.org>", DENIED % b"victim@example.com.other.org"),
    (b"<victim@xexample.com>", DENIED % b"victim@xexample.com"),
    (b"<victim@sub.relay.example>", DENIED % b"victim@sub.relay.example"),
    # forms outside the grammar
    (b"victim@other.org", SYNTAX),
    (b"<victim@other.org", SYNTAX),
    (b"<victim@other.org>>", b"501 5.5.4 Bad parameter syntax: >\r\n"),
    (b"<<victim@other.org>>", SYNTAX),
    (b"<victim@other.org@example.com>", SYNTAX),
    (b"<victim@other.org\x00@example.com>", SYNTAX),
    (b" <victim@other.org>", DENIED % b"victim@other.org"),
    # postmaster only for our domains
    (b"<postmaster@other.org>", DENIED % b"postmaster@other.org"),
    (b"<@other.org:postmaster>", RCPT_OK),     # bare postmaster after a route: ours
]


@pytest.mark.parametrize("rcpt, reply", TRICKS, ids=[t[0].decode("latin-1") for t in TRICKS])
def test_relay_trick_refused(rcpt, reply):
    svc = FakeService()
    proto, t = receive_connect(svc, "203.0.113.66")
    proto.dataReceived(b"EHLO attacker.example\r\nMAIL FROM:<spammer@spam.example>\r\n")
    take(t)
    proto.dataReceived(b"RCPT TO:" + rcpt + b"\r\nDATA\r\n")
    out = t.value()
    assert out.startswith(reply)
    if reply != RCPT_OK:
        assert out == reply + b"554 5.5.1 Error: no valid recipients\r\n"
        assert proto.txn.recipients == []


def test_the_same_addresses_relay_from_mynetworks():
    """Control: the refusal above is the relay policy, not a broken parser."""
    svc = FakeService()
    proto, t = receive_connect(svc, "10.0.0.5")
    proto.dataReceived(b"EHLO inside.example\r\nMAIL FROM:<a@inside.example>\r\n")
    take(t)
    proto.dataReceived(b"RCPT TO:<@example.com:victim@other.org>\r\nRCPT TO:<victim@OTHER.ORG>\r\n"
                       b"RCPT TO:<user@[127.0.0.1]>\r\n")
    assert t.value() == RCPT_OK * 3
    # the same mailbox twice is acknowledged twice but kept once (one copy)
    assert [str(m) for m, _ in proto.txn.recipients] == ["victim@other.org", "user@[127.0.0.1]"]


def test_queued_recipient_is_the_parsed_address():
    """The relay decision and the queue record use one parsed address."""
    svc = FakeService(users=("alice@example.com", "user%other.org@example.com"))
    proto, t = receive_connect(svc, "203.0.113.66")
    proto.dataReceived(b"EHLO attacker.example\r\nMAIL FROM:<s@spam.example>\r\n"
                       b"RCPT TO:<@other.org:user%other.org@EXAMPLE.com>\r\nDATA\r\nx\r\n.\r\n")
    assert t.value().endswith(b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    envelope = svc.spool.commits[0][1]
    assert [r["rcpt"] for r in envelope["recipients"]] == ["user%other.org@example.com"]
    assert svc.accounts.asked == ["user%other.org@example.com"]
